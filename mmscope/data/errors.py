"""Errors raised while reading or writing data files.

Every message names the file (and the question id, object id or CSV row inside it) and says what would be
valid, so that a bad record in a 1.4 GB questions file can be found without a debugger. All of them are
`mmscope.errors.MMScopeError`s; the file-not-found ones are also `FileNotFoundError`s and the content ones
`ValueError`s, so callers can catch them the standard way.
"""

from __future__ import annotations

from mmscope.errors import MMScopeError


class DataError(MMScopeError, ValueError):
    """A data file or argument whose content mmscope cannot use."""


class DataFileNotFoundError(MMScopeError, FileNotFoundError):
    """A questions, scene-graph, CSV or annotation file (or folder) that does not exist."""


class MissingImageError(DataFileNotFoundError):
    """A question or probe example whose image file is absent from the images folder."""


class MalformedFileError(DataError):
    """A file that is not valid JSON/CSV or not a readable image, or a record that lacks a field the format
    requires."""


class UnknownCategoryError(DataError):
    """A category name that is not one of the study's six (`mmscope.data.CATEGORIES`)."""
