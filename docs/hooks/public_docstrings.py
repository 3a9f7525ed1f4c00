"""MkDocs hook: every public name the API reference shows must have a docstring.

mkdocstrings renders a name without a docstring as a bare signature; in a strict build
this hook turns each such name into a warning, and so into a failed build. It walks what
the reference pages render: each `::: identifier` (a module's `__all__`, or the
`members:` the page lists), and the public functions, classes, methods and properties
of each. Plain data (constants, dataclass fields) is shown with its type and value.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import griffe

log = logging.getLogger("mkdocs.hooks.public_docstrings")

# Methods that implement a framework's hook (torch's nn.Module and pipeline stages,
# TRL's Trainer): their contract is the framework's documentation.
FRAMEWORK_OVERRIDES = frozenset(
    {
        "forward",
        "forward_one_chunk",
        "backward_one_chunk",
        "backward_weight_one_chunk",
        "training_step",
    }
)
# Public names without a docstring in modules being rewritten by others as this check
# landed (ingestion: trace, store, align, engines; the controller). The list can only
# shrink: an entry that has gained its docstring is itself a warning.
KNOWN_GAPS: frozenset[str] = frozenset()
DIRECTIVE = re.compile(r"^::: ([\w.]+)\n((?:[ \t]+.*\n)*)", re.MULTILINE)
MEMBERS = re.compile(r"members:\s*\[([^\]]*)\]")


def on_pre_build(config: Any) -> None:
    source = Path(config["config_file_path"]).parent / "src"
    package = griffe.load("routereplay", search_paths=[str(source)])
    missing: set[str] = set()
    for page in sorted((Path(config["docs_dir"]) / "reference").glob("*.md")):
        for identifier, options in DIRECTIVE.findall(page.read_text()):
            listed = MEMBERS.search(options)
            members = [m.strip() for m in listed.group(1).split(",")] if listed else None
            missing.update(undocumented(package, identifier, members))
    for path in sorted(missing - KNOWN_GAPS):
        log.warning(f"{path} is public but has no docstring")
    for path in sorted(KNOWN_GAPS - missing):
        log.warning(f"{path} has a docstring now: remove it from KNOWN_GAPS in {__file__}")


def undocumented(package: Any, identifier: str, members: list[str] | None) -> list[str]:
    """Paths of the public objects `::: identifier` renders that lack a docstring."""
    root = package if identifier == "routereplay" else package[identifier.split(".", 1)[1]]
    missing = [] if root.docstring else [root.path]
    if root.is_module:
        names = members or (
            [str(n) for n in root.exports]
            if root.exports is not None
            else [n for n, m in root.members.items() if not n.startswith("_") and not m.is_alias]
        )
        for name in names:
            member = root[name]
            missing += _undocumented_object(member.final_target if member.is_alias else member)
    else:
        missing += _undocumented_object(root)
    return missing


def _undocumented_object(obj: Any) -> list[str]:
    if obj.is_module or (obj.is_attribute and "property" not in obj.labels):
        return []  # submodules have pages of their own; data shows its value
    missing = [] if obj.docstring else [obj.path]
    if obj.is_class:
        for name, member in obj.members.items():
            if name.startswith("_") or name in FRAMEWORK_OVERRIDES or member.is_alias:
                continue
            is_method = member.is_function
            is_property = member.is_attribute and "property" in member.labels
            if (is_method or is_property) and not member.docstring:
                missing.append(member.path)
    return missing
