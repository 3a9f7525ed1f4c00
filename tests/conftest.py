"""Shared fixtures: tiny layouts and router specs used across the core tests."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

from routereplay import MoELayout, RouterSpec

settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def hybrid_layout() -> MoELayout:
    """8 decoder layers, the first 2 dense (DeepSeek-style prefix), 16 experts, top-4."""
    return MoELayout.from_dense_pattern([0, 0, 1, 1, 1, 1, 1, 1], num_experts=16, top_k=4)


@pytest.fixture
def softmax_spec() -> RouterSpec:
    return RouterSpec(top_k=4, score="softmax", renormalize=True)


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _quiet_transformers() -> None:
    """Tiny models trip transformers' advice about optional fast kernels; it is noise here."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.set_verbosity_error()
