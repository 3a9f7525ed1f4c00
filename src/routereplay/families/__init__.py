"""Transformers MoE families: the routing knowledge of each, and how their routers are
found and patched in a model. Framework-neutral types (`MoELayout`, `RouterSpec`) are
built here from a transformers config; nothing here imports transformers."""

from routereplay.families.config import ConfigView
from routereplay.families.table import (
    FAMILIES,
    SUPPORTED_FAMILIES,
    Family,
    family_of,
    hf_layout,
    hf_router_spec,
)

__all__ = [
    "FAMILIES",
    "SUPPORTED_FAMILIES",
    "ConfigView",
    "Family",
    "family_of",
    "hf_layout",
    "hf_router_spec",
]
