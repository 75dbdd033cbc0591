"""The study's six question categories and the GQA `types.detailed` values that make them up.

GQA labels every question with a fine-grained `types.detailed` (about a hundred values: `chooseAttr`,
`relChooser`, `directOf` …). The cross-modal information-flow study grouped six families of them into the
categories its figures are drawn for. This module is the one place that mapping lives; a detailed type that is
not listed here belongs to no category (`category_of` returns None).
"""

from __future__ import annotations

from collections.abc import Iterable

from mmscope.data.errors import DataError, UnknownCategoryError
from mmscope.errors import known, suggest

CATEGORIES: tuple[str, ...] = ("ChooseAttr", "ChooseCat", "ChooseRel", "CompareAttr", "LogicalObj", "QueryAttr")

DETAILED_TYPE_TO_CATEGORY: dict[str, str] = {
    "chooseAttr": "ChooseAttr",
    "materialChoose": "ChooseAttr",
    "typeChoose": "ChooseAttr",
    "activityChoose": "ChooseAttr",
    "objThisChoose": "ChooseCat",
    "categoryThatChoose": "ChooseCat",
    "categoryThisChoose": "ChooseCat",
    "relChooser": "ChooseRel",
    "twoCommon": "CompareAttr",
    "existThatOr": "LogicalObj",
    "existThatOrC": "LogicalObj",
    "positionQuery": "QueryAttr",
}


def category_of(detailed_type: str) -> str | None:
    """The study category of a GQA `types.detailed` value, or None when it is outside the six."""
    return DETAILED_TYPE_TO_CATEGORY.get(detailed_type)


def check_category(name: str, where: str = "") -> str:
    """Return `name` if it is one of `CATEGORIES`; otherwise raise an error naming it, the valid names and the
    closest one.

    `where` (a file, a CSV row …) is added to the message so the bad value can be found.
    """
    if name not in CATEGORIES:
        place = f" in {where}" if where else ""
        raise UnknownCategoryError(f"unknown category {name!r}{place}; known: {known(CATEGORIES)}"
                                   f"{suggest(name, CATEGORIES)}")
    return name


def check_categories(names: Iterable[str] | None) -> tuple[str, ...]:
    """Validate a user's category selection; None means all six, an empty one is refused (it selects nothing)."""
    if names is None:
        return CATEGORIES
    if isinstance(names, str):
        names = (names,)
    selected = tuple(check_category(name) for name in names)
    if not selected:
        raise DataError(f"an empty category selection selects no questions; name some of {known(CATEGORIES)}, "
                        "or none at all for all six")
    return selected
