"""The megatron demo's model: a tiny DeepSeek-V3-style megatron-core `GPTModel`.

Like the seed's model: a dense prefix (`dense_layers`), then MoE layers routing each
token to `top_k` of `num_experts` experts (plus a shared expert) with sigmoid scores,
an expert bias that shifts selection only, and group-limited top-k (`num_groups`
groups, the best `group_top_k` eligible). Split over pipeline ranks and virtual stages
as a `PipelineSplit` says; weights depend only on the seed and each parameter's global
name, so every split of the model holds the same numbers.

Everything megatron-core can do on a CPU by configuration is configured here: no
Transformer Engine or fused kernels, the allgather token dispatcher, untied embeddings
(no embedding all-reduce across stages), unbatched p2p (see `transformer_config`).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from routereplay.errors import LayoutError
from routereplay.layout import MoELayout
from routereplay.pipeline_split import PipelineSplit

VOCAB_SIZE = 32


@dataclass(frozen=True)
class MegatronModel:
    """The model's shape. Layers `0 .. dense_layers - 1` are dense, the rest route."""

    num_layers: int = 8
    dense_layers: int = 1
    hidden_size: int = 64
    ffn_hidden_size: int = 128
    moe_ffn_hidden_size: int = 32
    shared_expert_size: int = 32
    num_experts: int = 8
    top_k: int = 2
    num_groups: int = 4
    group_top_k: int = 2
    scaling_factor: float = 2.5
    num_attention_heads: int = 4
    vocab_size: int = VOCAB_SIZE
    max_sequence_length: int = 32

    def __post_init__(self) -> None:
        if not 0 <= self.dense_layers < self.num_layers:
            raise LayoutError(
                f"dense_layers must be in [0, num_layers={self.num_layers}), found "
                f"{self.dense_layers}: the model needs at least one MoE layer."
            )

    @property
    def moe_pattern(self) -> list[int]:
        """megatron's `moe_layer_freq` list: 0 dense, 1 MoE, per layer."""
        return [0] * self.dense_layers + [1] * (self.num_layers - self.dense_layers)

    @property
    def layout(self) -> MoELayout:
        return MoELayout.from_dense_pattern(
            self.moe_pattern, num_experts=self.num_experts, top_k=self.top_k
        )


@dataclass(frozen=True)
class WeightScales:
    """Initial weight scales: routers wider than the rest, so that router scores are far
    from uniform and routing carries structure from the start."""

    weight_std: float = 0.02
    router_std: float = 0.3
    expert_bias_std: float = 0.05


def pipeline_split(
    model: MegatronModel, pp: int, vp: int | None, first: int | None, last: int | None
) -> PipelineSplit:
    """The split `--pp/--vp/--first-stage-layers/--last-stage-layers` ask for, checked
    against the model's layer count (a LayoutError names what does not fit)."""
    if pp != 2:
        raise LayoutError(
            f"The megatron demo runs on 2 processes, one per pipeline rank: --pp must be 2, "
            f"found {pp}."
        )
    split = PipelineSplit(
        pp_size=pp, vp_size=vp or 1, first_stage_layers=first, last_stage_layers=last
    )
    sizes = split.chunk_sizes(model.num_layers)  # raises on a split that does not fit
    if min(sizes) < 1:
        raise LayoutError(
            f"{model.num_layers} layers over {split.num_chunks} model chunks leave a chunk "
            f"empty ({list(sizes)}): use fewer virtual stages or more layers."
        )
    return split


def transformer_config(
    model: MegatronModel,
    split: PipelineSplit,
    *,
    dtype: torch.dtype = torch.float32,
    recompute: bool = False,
) -> Any:
    """A megatron-core `TransformerConfig` for `model` under `split` in `dtype`."""
    from megatron.core.transformer import TransformerConfig

    settings: dict[str, Any] = {
        "num_layers": model.num_layers,
        "hidden_size": model.hidden_size,
        "num_attention_heads": model.num_attention_heads,
        "normalization": "RMSNorm",
        "ffn_hidden_size": model.ffn_hidden_size,
        "num_moe_experts": model.num_experts,
        "moe_router_topk": model.top_k,
        "moe_ffn_hidden_size": model.moe_ffn_hidden_size,
        "moe_shared_expert_intermediate_size": model.shared_expert_size,
        "moe_layer_freq": model.moe_pattern,
        "moe_router_score_function": "sigmoid",
        "moe_router_enable_expert_bias": True,
        "moe_router_num_groups": model.num_groups,
        "moe_router_group_topk": model.group_top_k,
        "moe_router_topk_scaling_factor": model.scaling_factor,
        # Router logits in fp32 whatever the model's dtype, as DeepSeek-V3 recipes do.
        "moe_router_dtype": "fp32",
        "moe_router_load_balancing_type": "none",
        # The alltoall dispatcher makes CUDA side streams; allgather runs on CPU as is.
        "moe_token_dispatcher_type": "allgather",
        "pipeline_model_parallel_size": split.pp_size,
        "virtual_pipeline_model_parallel_size": split.vp_size if split.vp_size > 1 else None,
        "num_layers_in_first_pipeline_stage": split.first_stage_layers,
        "num_layers_in_last_pipeline_stage": split.last_stage_layers,
        "pipeline_dtype": dtype,
        "params_dtype": dtype,
        "bf16": dtype == torch.bfloat16,
        "use_cpu_initialization": True,
        "perform_initialization": False,  # `init_weights` sets every weight by name
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        # Linear biases crash 0.16.1's SequentialMLP experts (an in-place add on a
        # custom autograd Function's view); MoE models rarely have them anyway.
        "add_bias_linear": False,
        "gradient_accumulation_fusion": False,
        "bias_dropout_fusion": False,
        "masked_softmax_fusion": False,
        "persist_layer_norm": False,
        "apply_rope_fusion": False,
        # With PP=2 the previous and the next stage are one peer: batched p2p pairs
        # same-peer posts in order and, under VPP, silently swaps activations and
        # gradients (Megatron-LM issues #750, #1450). Unbatched p2p, overlapped with
        # compute as Megatron-LM itself does under VPP, orders them correctly.
        "batch_p2p_comm": False,
        "overlap_p2p_comm": split.vp_size > 1,
    }
    if recompute:
        settings |= {
            "recompute_granularity": "full",
            "recompute_method": "uniform",
            "recompute_num_layers": 1,
        }
    return TransformerConfig(**settings)


def build_chunks(
    model: MegatronModel, config: Any, pp_rank: int, *, single_process: bool = False
) -> list[nn.Module]:
    """This rank's `GPTModel` chunks under `config`, one per virtual stage.

    `single_process`: one chunk holding every layer, embedding and output layer (the
    engine's copy), whatever megatron's parallel state says.
    """
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    split = PipelineSplit.from_megatron_config(config)
    chunks: list[nn.Module] = []
    for vp_stage in range(split.vp_size):
        stage = None if split.vp_size == 1 else vp_stage
        spec = get_gpt_decoder_block_spec(
            config, use_transformer_engine=False, vp_stage=stage, pp_rank=pp_rank
        )
        first = single_process or (pp_rank == 0 and vp_stage == 0)
        last = single_process or (pp_rank == split.pp_size - 1 and vp_stage == split.vp_size - 1)
        chunk = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=model.vocab_size,
            max_sequence_length=model.max_sequence_length,
            pre_process=first,
            post_process=last,
            # Tied weights on two stages would need megatron's embedding all-reduce.
            share_embeddings_and_output_weights=False,
            vp_stage=stage,
        )
        if config.bf16:
            # megatron builds norms and position embeddings in fp32 whatever params_dtype
            # says (its Float16Module casts them later); the expert bias stays fp32.
            chunk.to(torch.bfloat16)
            for name, buffer in chunk.named_buffers():
                if name.endswith("expert_bias"):
                    buffer.data = buffer.data.float()
        chunks.append(chunk)
    return chunks


_LOCAL_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def global_name(chunk: nn.Module, name: str) -> str:
    """The name a single-process model gives `chunk`'s parameter or buffer `name`: a
    chunk numbers its layers from 0, the global name uses `layer_number - 1`."""
    match = _LOCAL_LAYER.match(name)
    if match is None:
        return name  # embedding, final norm and output layer names are already global
    layer: Any = chunk.decoder.layers[int(match.group(1))]  # type: ignore[index,union-attr]
    return f"decoder.layers.{layer.layer_number - 1}.{name[match.end() :]}"


def named_weights(chunks: Sequence[nn.Module]) -> dict[str, torch.Tensor]:
    """Parameters and expert biases of `chunks` by global name (live tensors)."""
    weights: dict[str, torch.Tensor] = {}
    for chunk in chunks:
        for name, tensor in [*chunk.named_parameters(), *chunk.named_buffers()]:
            if isinstance(tensor, nn.Parameter) or name.endswith("expert_bias"):
                weights[global_name(chunk, name)] = tensor
    return weights


def init_weights(chunks: Sequence[nn.Module], seed: int, scales: WeightScales) -> None:
    """Draw every weight from a generator seeded by (seed, global name)."""
    with torch.no_grad():
        for name, tensor in named_weights(chunks).items():
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith("expert_bias"):
                tensor.copy_(scales.expert_bias_std * noise)
            elif name.endswith("router.weight"):
                tensor.copy_(scales.router_std * noise)
            elif "norm" in name or "layernorm" in name:
                tensor.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                tensor.copy_(scales.weight_std * noise)


def causal_mask(seq_len: int) -> torch.Tensor:
    """`[1, 1, seq, seq]` bool, True where attention is masked out. Given explicitly:
    megatron builds the implicit one on "cuda". Right padding needs nothing more."""
    mask = torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool), diagonal=1)
    return mask.view(1, 1, seq_len, seq_len)


def position_ids(batch: int, seq_len: int) -> torch.Tensor:
    """`[batch, seq]` int64: 0 .. seq - 1 on every row (right padding)."""
    return torch.arange(seq_len).expand(batch, seq_len).contiguous()
