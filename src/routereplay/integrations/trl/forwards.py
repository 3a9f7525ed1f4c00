"""Micro-batch keys for the forwards TRL runs in a loop it owns.

The controller keys routes by (micro-batch, layer). TRL's log-prob pass runs its batch
in row chunks, and `model.generate()` runs one forward per new token, both inside
TRL's code: a pre-forward hook on the model names each forward's micro-batch before
routereplay's own hook publishes its tokens.

    row_chunks:       key = the chunk's first row in the batch, checked against the ids
    generation_steps: key = the forward's step (0 is the prefill, t the t-th decode)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from routereplay.controller import ReplayController
from routereplay.errors import ReplayError


@contextmanager
def row_chunks(
    model: nn.Module, controller: ReplayController, input_ids: torch.Tensor
) -> Iterator[None]:
    """Every forward of `model` in this context runs consecutive rows of `input_ids
    [batch, seq]`, as TRL's `_get_per_token_logps_and_entropies` chunks them; each is
    micro-batch `first row`. A forward of rows the batch does not hold next is an error:
    its routes would be another chunk's."""
    next_row = 0

    def name_chunk(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        nonlocal next_row
        ids = kwargs.get("input_ids", args[0] if args else None)
        rows = 0 if ids is None else ids.shape[0]
        expected = input_ids[next_row : next_row + rows]
        if ids is None or ids.shape != expected.shape or not torch.equal(ids, expected):
            raise ReplayError(
                f"The log-prob pass ran a forward that is not rows {next_row}.. of its "
                f"batch {list(input_ids.shape)} (found input ids "
                f"{None if ids is None else list(ids.shape)}): TRL no longer runs the pass "
                "in consecutive row chunks, so its routes cannot be told apart."
            )
        controller.set_micro_batch(next_row)
        next_row += rows

    with _prepended_pre_hook(model, name_chunk):
        yield


@contextmanager
def generation_steps(model: nn.Module, controller: ReplayController) -> Iterator[None]:
    """Every forward of `model` in this context is one generation step: micro-batch
    0 is the prefill, t the t-th decode step (as `engines.hf.RecordingEngine` keys it)."""
    step = 0

    def name_step(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        nonlocal step
        controller.set_micro_batch(step)
        step += 1

    with _prepended_pre_hook(model, name_step):
        yield


@contextmanager
def _prepended_pre_hook(model: nn.Module, hook: Any) -> Iterator[None]:
    # First of the model's pre-forward hooks: routereplay's own hook, registered by
    # attach(), publishes the tokens of the forward under the key set here.
    handle = model.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    try:
        yield
    finally:
        handle.remove()
