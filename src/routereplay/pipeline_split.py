"""`PipelineSplit`: how megatron-core cuts the decoder layers into pipeline model chunks.

A split is plain data: the pipeline-parallel size, the virtual stages per rank, the
optional uneven first/last stages and whether the embedding and the loss count as
layers. `chunk_layers(num_layers, pp_rank, vp_stage)` gives the global decoder layers a
chunk builds, matching megatron-core's `get_transformer_layer_offset` /
`get_num_layers_to_build`. Which of those layers route is `MoELayout`'s business
(`MoELayout.stage_layers` takes a split).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from routereplay.checks import exact_int
from routereplay.errors import LayoutError


@dataclass(frozen=True)
class PipelineSplit:
    """A pipeline split of the decoder layers, in megatron-core's terms.

    pp_size:               pipeline ranks (`pipeline_model_parallel_size`).
    vp_size:               model chunks (virtual stages) per rank
                           (`virtual_pipeline_model_parallel_size`, 1 without VPP).
    first_stage_layers:    layers of pipeline rank 0, or None to split evenly
                           (`num_layers_in_first_pipeline_stage`).
    last_stage_layers:     layers of the last pipeline rank, or None
                           (`num_layers_in_last_pipeline_stage`).
    account_for_embedding: the embedding counts as one layer of the first chunk
                           (`account_for_embedding_in_pipeline_split`).
    account_for_loss:      the loss counts as one layer of the last chunk
                           (`account_for_loss_in_pipeline_split`).

    Megatron places chunks round by round: virtual stage 0 of every rank, then virtual
    stage 1 of every rank, and so on; chunk `vp_stage * pp_size + pp_rank` in that order.
    """

    pp_size: int = 1
    vp_size: int = 1
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None
    account_for_embedding: bool = False
    account_for_loss: bool = False

    def __post_init__(self) -> None:
        for name in ("pp_size", "vp_size"):
            object.__setattr__(self, name, exact_int(getattr(self, name), name, LayoutError))
        for name in ("first_stage_layers", "last_stage_layers"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, exact_int(value, name, LayoutError))
        for name in ("account_for_embedding", "account_for_loss"):
            if not isinstance(getattr(self, name), bool):
                raise LayoutError(f"{name} must be True or False, found {getattr(self, name)!r}.")
        if self.pp_size < 1 or self.vp_size < 1:
            raise LayoutError(
                f"pp_size and vp_size must be at least 1, found {self.pp_size}, {self.vp_size}."
            )
        if self.vp_size > 1 and self.pp_size == 1:
            raise LayoutError("Virtual pipeline stages (vp_size > 1) need pp_size > 1.")
        if self.uneven and self.pp_size == 1:
            raise LayoutError("first/last stage layer counts need pp_size > 1.")
        if self.uneven and (self.account_for_embedding or self.account_for_loss):
            raise LayoutError(
                "Uneven first/last stages cannot be combined with account_for_embedding/loss "
                "(megatron-core rejects it too)."
            )

    @classmethod
    def from_megatron_config(cls, config: Any) -> PipelineSplit:
        """The split of a megatron-core `TransformerConfig` (or anything with its fields).

        With one pipeline rank every layer is built in one chunk: the virtual-stage,
        uneven-stage and accounting fields then place nothing and are not read.
        """
        pp_size = exact_int(
            getattr(config, "pipeline_model_parallel_size", None) or 1,
            "pipeline_model_parallel_size",
            LayoutError,
        )
        if pp_size == 1:
            return cls()
        return cls(
            pp_size=pp_size,
            vp_size=getattr(config, "virtual_pipeline_model_parallel_size", None) or 1,
            first_stage_layers=getattr(config, "num_layers_in_first_pipeline_stage", None),
            last_stage_layers=getattr(config, "num_layers_in_last_pipeline_stage", None),
            account_for_embedding=bool(
                getattr(config, "account_for_embedding_in_pipeline_split", False)
            ),
            account_for_loss=bool(getattr(config, "account_for_loss_in_pipeline_split", False)),
        )

    @property
    def uneven(self) -> bool:
        """True when the first or the last stage holds a layer count of its own."""
        return self.first_stage_layers is not None or self.last_stage_layers is not None

    @property
    def num_chunks(self) -> int:
        """Model chunks over all ranks: `pp_size * vp_size`."""
        return self.pp_size * self.vp_size

    def chunk_sizes(self, num_layers: int) -> tuple[int, ...]:
        """Layers per model chunk of a `num_layers`-layer decoder, in Megatron's
        placement order (vp_stage major, pp_rank minor): `[num_chunks]`."""
        if self.uneven:
            return self._uneven_chunk_sizes(num_layers)
        embedding, loss = int(self.account_for_embedding), int(self.account_for_loss)
        # Embedding and loss count as pseudo-layers at the two ends of the split.
        slots = num_layers + embedding + loss
        if slots % self.pp_size:
            raise LayoutError(
                f"{slots} layers{self._pseudo()} do not divide over pp_size={self.pp_size}: "
                f"use a layer count divisible by {self.pp_size}, or set first/last stage "
                "layer counts."
            )
        per_rank = slots // self.pp_size
        if per_rank % self.vp_size:
            raise LayoutError(
                f"{per_rank} layers per pipeline rank do not divide into vp_size="
                f"{self.vp_size} virtual stages."
            )
        sizes = [per_rank // self.vp_size] * self.num_chunks
        # Every chunk holds at least one slot here, so neither can go negative.
        sizes[0] -= embedding
        sizes[-1] -= loss
        return tuple(sizes)

    def chunk_layers(self, num_layers: int, pp_rank: int, vp_stage: int = 0) -> tuple[int, ...]:
        """Global 0-based decoder layers that (pp_rank, vp_stage) builds."""
        sizes = self.chunk_sizes(num_layers)
        if not (0 <= pp_rank < self.pp_size and 0 <= vp_stage < self.vp_size):
            raise LayoutError(
                f"(pp_rank={pp_rank}, vp_stage={vp_stage}) is outside a pipeline of "
                f"pp_size={self.pp_size}, vp_size={self.vp_size}."
            )
        chunk = vp_stage * self.pp_size + pp_rank
        offset = sum(sizes[:chunk])
        return tuple(range(offset, offset + sizes[chunk]))

    def _uneven_chunk_sizes(self, num_layers: int) -> tuple[int, ...]:
        first, last, vp_size = self.first_stage_layers, self.last_stage_layers, self.vp_size
        middle_ranks = self.pp_size - (first is not None) - (last is not None)
        middle_layers = num_layers - (first or 0) - (last or 0)
        for name, count in (("first", first), ("last", last)):
            if count is not None and (count <= 0 or count % vp_size):
                raise LayoutError(
                    f"The {name} stage holds {count} layers; it must be positive and "
                    f"divisible by vp_size={vp_size}."
                )
        if middle_layers < 0 or bool(middle_layers) != bool(middle_ranks):
            raise LayoutError(
                f"{middle_layers} layers remain for {middle_ranks} middle pipeline ranks after "
                f"the first ({first}) and last ({last}) stages: both must be zero or both "
                "positive."
            )
        per_middle = middle_layers // middle_ranks if middle_ranks else 0
        if middle_ranks and (middle_layers % middle_ranks or per_middle % vp_size):
            raise LayoutError(
                f"{middle_layers} middle layers must divide over {middle_ranks} middle ranks "
                f"and then over vp_size={vp_size} virtual stages."
            )
        per_rank = [per_middle] * self.pp_size
        if first is not None:
            per_rank[0] = first
        if last is not None:
            per_rank[-1] = last
        return tuple(n // vp_size for _ in range(vp_size) for n in per_rank)

    def _pseudo(self) -> str:
        counted = (("embedding", self.account_for_embedding), ("loss", self.account_for_loss))
        extra = [name for name, on in counted if on]
        return f" (counting {' and '.join(extra)})" if extra else ""
