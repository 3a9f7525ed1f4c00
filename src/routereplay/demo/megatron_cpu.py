"""DEMO ONLY: the monkeypatches megatron-core 0.16.1 needs to run on a CPU.

`run_megatron_demo` applies them inside its own spawned worker processes, never in the
process that imports routereplay, and no library module imports this one. Everything
that configuration can avoid is avoided instead (see `megatron_model.transformer_config`):
no Transformer Engine, no fused kernels, the allgather dispatcher (the alltoall one
needs CUDA streams), an explicit causal mask (the implicit one is built on "cuda").
What is left are hard-coded CUDA calls on the path a pipelined GPTModel takes:

- `torch.cuda.current_device()`: routers move CPU weights there on every call;
  attention's memory buffer and the pipeline's receive buffers are allocated there.
- `moe_utils.te_general_gemm`: without Transformer Engine its import fails and the name
  is never bound, yet router gating tests it against None (a NameError).
- `schedules.py` counts tokens in `torch.zeros([], device="cuda")`.
- Full activation recompute saves and restores CUDA RNG states around each recomputed
  layer; on CPU the states are the CPU generator's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


class CpuRNGStatesTracker:
    """megatron's RNG states tracker (`add`, `fork`, `get_states`, `set_states`) over the
    CPU generator; its own keeps CUDA generator states."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_ or name in self.states_:
            raise RuntimeError(f"RNG state {name!r} or seed {seed} is already tracked")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        if name not in self.states_:
            raise RuntimeError(f"RNG state {name!r} is not tracked")
        outside = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outside)


class _TorchWithCpuZeros:
    """The `torch` module as `schedules.py` sees it, except that `zeros` stays on CPU."""

    def __init__(self, module: Any) -> None:
        self._module = module

    def zeros(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if str(kwargs.get("device", "cpu")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return self._module.zeros(*args, **kwargs)  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def patch_megatron_for_cpu() -> None:
    """Apply the patches above. Call only in a process of its own (a demo worker)."""
    import megatron.core.pipeline_parallel.schedules as schedules
    import megatron.core.tensor_parallel.random as megatron_random
    import megatron.core.transformer.moe.moe_utils as moe_utils

    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment,return-value]
    moe_utils.te_general_gemm = None
    schedules.torch = _TorchWithCpuZeros(torch)
    megatron_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    megatron_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    megatron_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    megatron_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
