"""Griffe extension: the docstrings' aligned field lists render as lists.

routereplay's docstrings describe fields and arguments as plain aligned text,

    replayed:   rows whose ids came from the trace.
    native:     rows routed by the live router (-1 rows, or every row when
                recording).

which Markdown would run together into one paragraph. A paragraph that starts with
such a field line and holds at least two becomes a list, one item per field; an item's
indented lines join it, and a field given alone on its line (`score:`) lists its
indented values under it. The source docstrings stay plain text.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

FIELD = re.compile(r"^`?(?P<label>[A-Za-z_]\w*(?:, [A-Za-z_]\w*)*)`?:(?:\s+(?P<text>\S.*))?$")


class FieldLists(griffe.Extension):
    """Rewrites field-list paragraphs of every docstring as Markdown lists."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = field_lists(obj.docstring.value)


def field_lists(text: str) -> str:
    """`text` with each field-list paragraph as a Markdown list."""
    return "\n\n".join(_paragraph(p) for p in text.split("\n\n"))


def _paragraph(paragraph: str) -> str:
    lines = paragraph.splitlines()
    if not lines or not FIELD.match(lines[0]) or sum(bool(FIELD.match(x)) for x in lines) < 2:
        return paragraph
    items: list[str] = []
    rest: list[str] = []
    nested = False  # the current field stood alone: its indented lines are values
    for line in lines:
        field = FIELD.match(line)
        if rest:
            rest.append(line)
        elif field:
            text = field["text"]
            nested = text is None
            items.append(f"- `{field['label']}`" + ("" if nested else f": {text}"))
        elif line[:1].isspace() and items:
            if nested and (len(line) - len(line.lstrip())) <= 4:
                items.append(f"    - {line.strip()}")
            elif nested and not items[-1].startswith("    "):
                items[-1] += f": {line.strip()}"  # the field's text, aligned below it
                nested = False
            else:
                items[-1] += f" {line.strip()}"
        else:  # prose after the list
            rest.append(line)
    return "\n".join(items) + ("\n\n" + "\n".join(rest) if rest else "")
