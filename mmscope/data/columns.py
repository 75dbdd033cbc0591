"""The roles a column of a table of questions fills, and the names it has when `columns` does not map it
(`mmscope.data.table` reads tables by them). Importing nothing, so that the command line's `--columns` can
name and check the roles without the `datasets` library."""

# Role -> the column names that fill it when `columns` does not map it, first match wins.
TABLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "question_id": ("question_id",),
    "image": ("image", "file_name", "image_path"),
    "image_id": ("image_id",),
    "question": ("question",),
    "answer": ("answer",),
    "category": ("category",),
    "boxes": ("boxes", "object_boxes"),
}
