"""Real megatron-core GPT models through megatron-core's real pipeline schedules, on CPU.

Tests that check router replay under pipeline parallelism use this module to:

- `run_on_ranks`: spawn gloo processes, set up megatron's `parallel_state` (TP=1, CP=1,
  the PP/VPP asked for), make megatron-core run on CPU, run a function on every rank and
  return what each rank returned, or fail with every rank's traceback (never hang);
- `build_gpt`: build this rank's `GPTModel` chunks (one per virtual stage) of a tiny
  hybrid dense + MoE model whose weights depend only on the global parameter name, so a
  PP=1 build and a PP=2 / VPP=2 build of the same model hold the same numbers;
- `run_schedule`: push micro-batches through `get_forward_backward_func()` (no
  pipelining, 1F1B or interleaved 1F1B, as megatron picks from `parallel_state`) and
  return the per-micro-batch losses on the last stage;
- `watch_routers`: log every `TopKRouter` call (layer, phase, input, chosen experts).

megatron-core 0.16.1 assumes CUDA in a handful of places; `patch_megatron_for_cpu` works
around each of them. It runs only inside the spawned rank processes: neither the library
nor the pytest process ever sees a patched megatron.

Megatron conventions worth knowing when reading results:

- hidden states, and so a router's input, are `[seq, micro_batch_size, hidden]`; the
  router flattens them to `[seq * micro_batch_size, experts]`, so router row `r` is the
  token at `(position, sample) = divmod(r, micro_batch_size)` (sequence-major);
- `TransformerLayer.layer_number` and `TopKRouter.layer_number` are global and 1-based;
  parameter names are per chunk (`decoder.layers.0` is the chunk's first layer), see
  `global_parameter_name`;
- with PP=2, VPP=2 and 8 layers, rank 0 builds layers 1-2 and 5-6, rank 1 builds 3-4
  and 7-8 (virtual stage major, pipeline rank minor).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from gloo_ranks import spawn_ranks
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.tensor_parallel.random import is_checkpointing
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.transformer_layer import TransformerLayer
from torch import nn

from routereplay.demo.megatron_cpu import patch_megatron_for_cpu as patch_demo_cpu

MicroBatch = dict[str, torch.Tensor]
LossFunc = Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]

DEFAULT_MOE_PATTERN = (0, 0, 1, 1, 1, 1, 1, 1)  # 8 layers, a dense prefix of 2
VOCAB_SIZE = 64
INIT_STD = 0.02
# Router weights start wider than the rest, so that router scores are far from uniform
# and top-k choices do not hinge on rounding.
ROUTER_INIT_STD = 0.5


# -- making megatron-core run on CPU ---------------------------------------------------


class _DoneCudaEvent:
    """A `torch.cuda.Event` that has always completed: CPU work runs in program order."""

    def synchronize(self) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass


class _CpuStream:
    """A `torch.cuda.Stream` with nothing to order: CPU work runs in program order."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event: Any = None) -> _DoneCudaEvent:
        return _DoneCudaEvent()


def _cpu_causal_mask(sq: int) -> torch.Tensor:
    """`transformer.utils.get_default_causal_mask` on CPU: True above the diagonal."""
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def patch_megatron_for_cpu() -> None:
    """Work around each place megatron-core 0.16.1 needs CUDA on our path. Ranks only.

    Every patch here was checked to be needed (removing it fails a run) for GPTModel with
    dense + MoE layers, the alltoall dispatcher, full recompute, attention_mask=None and
    the no-pipelining, 1F1B and interleaved schedules over gloo. The ones the demo needs
    too (current_device, te_general_gemm, the schedules' zeros, the RNG tracker) have
    one home, `routereplay.demo.megatron_cpu`; the tests add what their configurations
    need beyond the demo's.
    """
    from megatron.core.fusions import fused_softmax

    patch_demo_cpu()

    # With attention_mask=None (megatron's usual causal case) the unfused softmax builds
    # its causal mask on "cuda". fused_softmax imported the function by name.
    fused_softmax.get_default_causal_mask = _cpu_causal_mask

    # The alltoall dispatcher makes a side stream (at MoELayer construction) for
    # device-to-host copies of its split sizes, and syncs on an event recorded there.
    # The allgather dispatcher does not need these.
    torch.cuda.Stream = _CpuStream  # type: ignore[assignment,misc]
    torch.cuda.current_stream = lambda *args, **kwargs: _CpuStream()  # type: ignore[assignment]
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()  # type: ignore[assignment]


# -- processes -------------------------------------------------------------------------


def initialize_model_parallel(pp_size: int, vp_size: int | None = None, seed: int = 1234) -> None:
    """(Re)initialise megatron's model-parallel state in a rank: TP=1, CP=1, DP = the rest.

    Collective: every rank calls it, in the same order. A rank function may call it again
    to switch layout in the same processes, e.g. PP=1 on both ranks of a 2-rank world
    (DP=2; without a DDP wrapper nothing reduces gradients, so each rank is a full
    single-stage reference run).
    """
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=pp_size,
        virtual_pipeline_model_parallel_size=vp_size,
        context_parallel_size=1,
    )
    # Dropout and recompute fork the tracker's named states; this registers them.
    model_parallel_cuda_manual_seed(seed)


def _megatron_rank(
    rank: int,
    fn: Callable[..., Any],
    pp_size: int | None,
    vp_size: int | None,
    kwargs: dict[str, Any],
) -> Any:
    """Inside a rank (gloo already joined): make megatron-core run on CPU, set up its
    parallel state, run `fn(rank, **kwargs)`, tear the state down."""
    # Megatron without Transformer Engine or Apex warns on every config and layer.
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    patch_megatron_for_cpu()
    try:
        if pp_size is not None:
            initialize_model_parallel(pp_size, vp_size)
        return fn(rank, **kwargs)
    finally:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int = 2,
    *,
    pp_size: int | None = None,
    vp_size: int | None = None,
    timeout_s: float = 45.0,
    **kwargs: Any,
) -> list[Any]:
    """Run `fn(rank, **kwargs)` on `world_size` spawned gloo processes; return each result.

    Args:
        fn: a module-level function (it is pickled into the ranks) returning something
            `torch.save` can write; tensors should be detached CPU tensors.
        world_size: number of processes; 1 gives a PP=1 reference run in a clean process.
        pp_size: pipeline size set up in `parallel_state` before `fn` runs (default:
            `world_size`); `fn` may switch with `initialize_model_parallel`.
        vp_size: virtual pipeline stages per rank (the interleaved schedule), or None.
        timeout_s: deadline for the whole run; ranks still alive then are killed.
        kwargs: passed to `fn`; they must pickle.

    Returns one result per rank, in rank order. If a rank raises, dies or runs past the
    deadline, fails the calling test with every rank's traceback.
    """
    pp = world_size if pp_size is None else pp_size
    body = functools.partial(_megatron_rank, fn=fn, pp_size=pp, vp_size=vp_size, kwargs=kwargs)
    return spawn_ranks(body, world_size, timeout_s=timeout_s, what="megatron ranks")


# -- the model -------------------------------------------------------------------------


def gpt_config(
    pp_size: int,
    vp_size: int | None = None,
    *,
    num_layers: int = 8,
    moe_pattern: Sequence[int] = DEFAULT_MOE_PATTERN,
    num_experts: int = 8,
    top_k: int = 2,
    hidden: int = 32,
    heads: int = 4,
    ffn_hidden: int = 64,
    moe_ffn_hidden: int = 32,
    dispatcher: str = "alltoall",
    recompute: bool = False,
    **overrides: Any,
) -> TransformerConfig:
    """A tiny fp32 hybrid dense + MoE config that runs on CPU; `overrides` win."""
    if len(moe_pattern) != num_layers:
        raise ValueError(f"moe_pattern has {len(moe_pattern)} entries for {num_layers} layers")
    settings: dict[str, Any] = {
        "num_layers": num_layers,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "ffn_hidden_size": ffn_hidden,
        "num_moe_experts": num_experts,
        "moe_router_topk": top_k,
        "moe_ffn_hidden_size": moe_ffn_hidden,
        "moe_layer_freq": list(moe_pattern),
        "moe_token_dispatcher_type": dispatcher,
        "moe_router_load_balancing_type": "none",
        "pipeline_model_parallel_size": pp_size,
        "virtual_pipeline_model_parallel_size": vp_size,
        "pipeline_dtype": torch.float32,
        "params_dtype": torch.float32,
        "use_cpu_initialization": True,
        "perform_initialization": False,  # `reset_parameters_by_name` sets every weight
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        # Linear biases crash 0.16.1's SequentialMLP experts (an in-place add on a custom
        # autograd Function's view output); MoE models rarely have them anyway.
        "add_bias_linear": False,
        # With PP=2 the previous and the next stage are one peer. Batched p2p posts
        # [send_prev, recv_prev, send_next, recv_next] on both ranks and same-peer ops
        # pair in posting order, so in the interleaved steady state activations and
        # gradients (same shape) are silently swapped (Megatron-LM issues #750, #1450):
        # losses after the warm-up and all gradients come out wrong. Unbatched p2p orders
        # even and odd ranks apart and uses a second communicator for groups of 2;
        # overlapping it with compute is Megatron-LM's own default under VPP.
        "batch_p2p_comm": False,
        "overlap_p2p_comm": vp_size is not None,
    }
    if recompute:
        settings |= {
            "recompute_granularity": "full",
            "recompute_method": "uniform",
            "recompute_num_layers": 1,
        }
    settings |= overrides
    return TransformerConfig(**settings)


_LOCAL_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def global_parameter_name(chunk: GPTModel, name: str) -> str:
    """The name a PP=1 model gives the parameter `name` of `chunk`.

    A chunk numbers its own layers from 0 (`decoder.layers.0`); the global name uses the
    layer's 0-based global index, `layer_number - 1`. Embedding, final norm and output
    layer names are already global (they exist on the first or the last stage only).
    """
    match = _LOCAL_LAYER.match(name)
    if match is None:
        return name
    layer = chunk.decoder.layers[int(match.group(1))]
    return f"decoder.layers.{layer.layer_number - 1}.{name[match.end() :]}"


def parameters_by_global_name(chunks: Sequence[GPTModel]) -> dict[str, nn.Parameter]:
    """This rank's parameters, keyed by `global_parameter_name`."""
    return {
        global_parameter_name(chunk, name): param
        for chunk in chunks
        for name, param in chunk.named_parameters()
    }


def reset_parameters_by_name(chunks: Sequence[GPTModel], seed: int) -> None:
    """Draw every parameter from a generator seeded by (seed, global name).

    The same global parameter gets the same values under any pipeline layout.
    """
    with torch.no_grad():
        for name, param in parameters_by_global_name(chunks).items():
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if name.endswith("router.weight"):
                param.copy_(ROUTER_INIT_STD * noise)
            elif "norm" in name:
                # Norm scales near 1, not exactly 1: layers differ, and so do their grads.
                param.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
            else:
                param.copy_(INIT_STD * noise)


def build_gpt(
    pp_size: int,
    vp_size: int | None = None,
    *,
    num_layers: int = 8,
    moe_pattern: Sequence[int] = DEFAULT_MOE_PATTERN,
    num_experts: int = 8,
    top_k: int = 2,
    hidden: int = 32,
    seq_length: int = 16,
    vocab_size: int = VOCAB_SIZE,
    dispatcher: str = "alltoall",
    recompute: bool = False,
    seed: int = 0,
    **config_overrides: Any,
) -> list[GPTModel]:
    """This rank's `GPTModel` chunks, one per virtual stage, in vp_stage order.

    Call after `initialize_model_parallel(pp_size, vp_size)`. Layer `i` (1-based) is MoE
    when `moe_pattern[i - 1]` is 1. Weights depend only on `seed` and the global parameter
    name. `dispatcher` is "alltoall" or "allgather"; `recompute` turns on full, uniform,
    one-layer activation recompute; `config_overrides` go to `TransformerConfig` (e.g.
    `moe_enable_routing_replay=True`). The chunks are in training mode.
    """
    config = gpt_config(
        pp_size,
        vp_size,
        num_layers=num_layers,
        moe_pattern=moe_pattern,
        num_experts=num_experts,
        top_k=top_k,
        hidden=hidden,
        dispatcher=dispatcher,
        recompute=recompute,
        **config_overrides,
    )
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    chunks = []
    for vp_stage in range(vp_size) if vp_size else [None]:
        spec = get_gpt_decoder_block_spec(
            config, use_transformer_engine=False, vp_stage=vp_stage, pp_rank=pp_rank
        )
        chunk = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=vocab_size,
            max_sequence_length=seq_length,
            pre_process=parallel_state.is_pipeline_first_stage(
                ignore_virtual=False, vp_stage=vp_stage
            ),
            post_process=parallel_state.is_pipeline_last_stage(
                ignore_virtual=False, vp_stage=vp_stage
            ),
            # Untied: tied weights on two stages would need megatron's embedding all-reduce.
            share_embeddings_and_output_weights=False,
            vp_stage=vp_stage,
        )
        chunk.train()
        chunks.append(chunk)
    reset_parameters_by_name(chunks, seed)
    return chunks


def built_layers(chunks: Sequence[GPTModel]) -> list[int]:
    """Global 1-based numbers of the decoder layers these chunks built, in chunk order."""
    return [
        module.layer_number
        for chunk in chunks
        for module in chunk.modules()
        if isinstance(module, TransformerLayer)
    ]


def routers(chunks: Sequence[GPTModel]) -> dict[int, TopKRouter]:
    """This rank's `TopKRouter`s, keyed by their own global 1-based `layer_number`."""
    found = [
        module for chunk in chunks for module in chunk.modules() if isinstance(module, TopKRouter)
    ]
    by_layer = {router.layer_number: router for router in found}
    if len(by_layer) != len(found):
        raise AssertionError(f"routers share layer numbers: {[r.layer_number for r in found]}")
    return by_layer


@dataclass(frozen=True)
class RouterCall:
    """One `TopKRouter.forward` call, as `watch_routers` saw it."""

    layer: int  # the router's global 1-based layer_number
    recomputing: bool  # inside full recompute's backward re-run
    layer_micro_batch: int | None  # the layer's `current_microbatch` at call time
    input: torch.Tensor  # [seq, micro_batch_size, hidden]
    experts: torch.Tensor  # [seq * micro_batch_size, top_k] int64, ascending per row


def watch_routers(chunks: Sequence[GPTModel]) -> list[RouterCall]:
    """Log every router call on these chunks, in call order, into the returned list.

    `layer_micro_batch` is what megatron's schedule last set on the router's decoder
    layer (`set_current_microbatch`, done before each forward step, not before recompute).
    """
    calls: list[RouterCall] = []
    for chunk in chunks:
        for layer in chunk.decoder.layers:
            router = getattr(layer.mlp, "router", None)
            if not isinstance(router, TopKRouter):
                continue

            def log_call(
                router: TopKRouter,
                args: tuple[Any, ...],
                output: tuple[torch.Tensor, torch.Tensor],
                layer: TransformerLayer = layer,
            ) -> None:
                _, routing_map = output  # [tokens, experts] bool
                experts = routing_map.nonzero()[:, 1].view(routing_map.shape[0], -1)
                calls.append(
                    RouterCall(
                        layer=router.layer_number,
                        recomputing=is_checkpointing() and torch.is_grad_enabled(),
                        layer_micro_batch=getattr(layer, "current_microbatch", None),
                        input=args[0].detach().clone(),
                        experts=experts.clone(),
                    )
                )

            router.register_forward_hook(log_call)
    return calls


# -- data and schedule -----------------------------------------------------------------


def make_micro_batches(
    num_micro_batches: int,
    micro_batch_size: int,
    seq_length: int,
    *,
    vocab_size: int = VOCAB_SIZE,
    seed: int = 0,
    causal_mask: bool = True,
) -> list[MicroBatch]:
    """Random next-token micro-batches; the same seed gives the same batches on any rank.

    Each dict holds `tokens`, `labels`, `position_ids` (`[micro_batch_size, seq]`
    int64), `index` (the micro-batch number, 0-d int64) and, when `causal_mask`,
    `attention_mask` (`[1, 1, seq, seq]` bool, True = masked out; without it megatron
    builds the causal mask itself).
    """
    generator = torch.Generator().manual_seed(seed)
    mask = torch.triu(torch.ones(seq_length, seq_length, dtype=torch.bool), diagonal=1)
    positions = torch.arange(seq_length).expand(micro_batch_size, seq_length)
    micro_batches = []
    for index in range(num_micro_batches):
        stream = torch.randint(
            0, vocab_size, (micro_batch_size, seq_length + 1), generator=generator
        )
        micro_batch = {
            "tokens": stream[:, :-1].contiguous(),
            "labels": stream[:, 1:].contiguous(),
            "position_ids": positions.clone(),
            "index": torch.tensor(index),
        }
        if causal_mask:
            micro_batch["attention_mask"] = mask.view(1, 1, seq_length, seq_length).clone()
        micro_batches.append(micro_batch)
    return micro_batches


def mean_token_loss(per_token_loss: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """megatron's loss_func: the mean over `[micro_batch_size, seq]` per-token losses.

    The schedule divides the returned loss by the number of micro-batches before backward,
    and collects the dict (on the last stage) as the micro-batch's result.
    """
    loss = per_token_loss.float().mean()
    return loss, {"loss": loss.detach().clone()}


def forward_step(
    data_iterator: Iterator[MicroBatch], model: GPTModel
) -> tuple[torch.Tensor, LossFunc]:
    """megatron's forward_step_func: the next micro-batch through one chunk.

    Every chunk draws from its own iterator, so each sees the micro-batches in order.
    Chunks without the embedding ignore the tokens (the schedule has handed them the
    previous stage's activations); chunks without the output layer ignore the labels.
    """
    micro_batch = next(data_iterator)
    output = model(
        micro_batch["tokens"],
        micro_batch["position_ids"],
        micro_batch.get("attention_mask"),
        labels=micro_batch["labels"],
    )
    return output, mean_token_loss


def run_schedule(
    chunks: Sequence[GPTModel],
    micro_batches: Sequence[MicroBatch],
    *,
    forward_only: bool = False,
    forward_step_func: Callable[..., tuple[torch.Tensor, LossFunc]] = forward_step,
) -> list[torch.Tensor]:
    """Run `micro_batches` through megatron's schedule for the current parallel state.

    Zeroes the chunks' gradients first; after a forward and backward each parameter's
    `.grad` is d(mean of the micro-batch losses)/d(parameter). The interleaved schedule
    needs the number of micro-batches to be a multiple of the pipeline size.

    Returns the per-micro-batch losses (0-d, detached) on the last stage, [] elsewhere.
    """
    if not micro_batches:
        raise ValueError("run_schedule needs at least one micro-batch")
    micro_batch_size, seq_length = micro_batches[0]["tokens"].shape
    for chunk in chunks:
        chunk.zero_grad(set_to_none=True)
    iterators = [iter(micro_batches) for _ in chunks]
    results = get_forward_backward_func()(
        forward_step_func=forward_step_func,
        # The interleaved schedule takes one iterator per virtual stage.
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=list(chunks),
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    return [result["loss"] for result in results]


def gradients(chunks: Sequence[GPTModel], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Copies of the gradients this rank holds, of those of `names` (global names) it has."""
    params = parameters_by_global_name(chunks)
    found = {}
    for name in names:
        if name not in params:
            continue
        grad = params[name].grad
        if grad is None:
            raise AssertionError(f"{name} is on this rank but received no gradient")
        found[name] = grad.detach().clone()
    return found
