"""Pipeline stages of a transformers MoE causal LM, torchtitan style.

`split_model` cuts a model into this rank's `StageModule`s: each keeps its decoder
layers in an `nn.ModuleDict` under their global ids, the first stage keeps the
embeddings, the last the final norm and `lm_head`, and every stage recomputes position
ids, rotary `(cos, sin)` and the causal mask from its input. The stages reference the
modules of the full model (nothing is copied), so `routereplay.attach(model)` on the
full model, before or after splitting, keys every router by its global layer.

Which layers a stage holds is megatron-core's placement (`PipelineSplit`) in the loop
layout of torch's multi-stage schedules: stage s runs on rank s % pp_size. Nothing here
knows about replay; `integrations.pipelining` runs these stages under a controller.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from routereplay.errors import LayoutError
from routereplay.layout import MoELayout
from routereplay.pipeline_split import PipelineSplit


class StageModule(nn.Module):
    """One pipeline stage of a transformers causal LM.

    First stage: input ids `[batch, seq]` (int64) -> hidden states `[batch, seq,
    hidden]`; middle stages: hidden -> hidden; last stage: hidden -> logits `[batch,
    seq, vocab]`. Full sequences only: no attention mask, no KV cache.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[int],
        *,
        first: bool,
        last: bool,
        checkpoint_layers: bool = False,
    ) -> None:
        super().__init__()
        decoder: Any = model.model
        self.config: Any = model.config
        self.global_layers = tuple(layers)
        # Global ids as names: routers stay at `layers.<global id>.mlp.gate`.
        self.layers = nn.ModuleDict({str(i): decoder.layers[i] for i in self.global_layers})
        self.embed_tokens: nn.Module | None = decoder.embed_tokens if first else None
        self.norm: nn.Module | None = decoder.norm if last else None
        self.lm_head: nn.Module | None = model.lm_head if last else None  # type: ignore[assignment]
        # Rotary holds no parameters (inv_freq is a buffer): every stage may share it.
        self.rotary_emb: nn.Module = decoder.rotary_emb
        self.checkpoint_layers = checkpoint_layers

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        hidden = self.embed_tokens(inputs) if self.embed_tokens is not None else inputs
        seq = hidden.shape[1]
        position_ids = torch.arange(seq, device=hidden.device).unsqueeze(0)
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=None,
            cache=None,
            position_ids=position_ids,
        )
        position_embeddings = self.rotary_emb(hidden, position_ids)
        for layer in self.layers.values():
            kwargs = {
                "position_embeddings": position_embeddings,
                "attention_mask": mask,
                "position_ids": position_ids,
            }
            if self.checkpoint_layers and torch.is_grad_enabled():
                hidden = checkpoint(layer, hidden, use_reentrant=False, **kwargs)
            else:
                hidden = layer(hidden, **kwargs)
        if self.norm is not None:
            hidden = self.norm(hidden)
        if self.lm_head is not None:
            hidden = self.lm_head(hidden)
        return hidden


def split_model(
    model: nn.Module,
    pp_size: int,
    pp_rank: int,
    *,
    stages_per_rank: int = 1,
    checkpoint_layers: bool = False,
) -> dict[int, StageModule]:
    """This rank's stages of `model`, by stage index: `pp_rank`, `pp_rank + pp_size`, ...

    Stage `virtual * pp_size + pp_rank` holds the layers megatron-core places on
    (pp_rank, vp_stage=virtual) with `stages_per_rank` virtual stages.
    `checkpoint_layers` wraps every decoder layer in `torch.utils.checkpoint`
    (non-reentrant); transformers' `gradient_checkpointing_enable()` on the full model
    works too, the stages run its layers.
    """
    if not 0 <= pp_rank < pp_size or stages_per_rank < 1:
        raise LayoutError(
            f"pp_rank={pp_rank} with stages_per_rank={stages_per_rank} is not a rank of a "
            f"pipeline of pp_size={pp_size}: pp_rank lies in [0, pp_size), and a rank "
            "holds at least one stage."
        )
    layout = MoELayout.from_hf_config(model.config)
    # Megatron's chunk k is the loop layout's stage k; cutting as over one rank per
    # stage places the same layers and also lets a single rank hold several stages.
    num_stages = pp_size * stages_per_rank
    split = PipelineSplit(pp_size=num_stages)
    stages = {}
    for virtual in range(stages_per_rank):
        index = virtual * pp_size + pp_rank
        stages[index] = StageModule(
            model,
            layout.stage_layers(split, pp_rank=index),
            first=index == 0,
            last=index == num_stages - 1,
            checkpoint_layers=checkpoint_layers,
        )
    return stages
