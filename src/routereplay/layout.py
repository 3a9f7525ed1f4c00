"""Which decoder layers route, and which of them each pipeline stage builds.

Layer ids are global and 0-based everywhere in routereplay. Megatron numbers its
routers 1-based (`TopKRouter.layer_number`); convert at the adapter, never here.
MTP (multi-token-prediction) layers sit after the decoder layers
(`num_layers ... num_layers + mtp - 1`), as DeepSeek-V3 checkpoints number them,
and are kept apart from `moe_layers` so that decoder routes never reach them.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from routereplay.checks import exact_int, exact_ints
from routereplay.errors import LayoutError
from routereplay.errors import short_ids as _short
from routereplay.pipeline_split import PipelineSplit


@dataclass(frozen=True)
class MoELayout:
    """The routing shape of a model: which global layers route, to how many experts.

    `moe_layers` are global 0-based decoder layer ids that have a router;
    `mtp_layers` are the ids of routed MTP layers, numbered after the decoder.
    """

    num_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    mtp_layers: tuple[int, ...] = ()
    family: str = "custom"
    _moe_set: frozenset[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_experts", "top_k"):
            object.__setattr__(self, name, exact_int(getattr(self, name), name, LayoutError))
        object.__setattr__(
            self, "moe_layers", exact_ints(self.moe_layers, "moe_layers", LayoutError)
        )
        object.__setattr__(self, "_moe_set", frozenset(self.moe_layers))
        object.__setattr__(
            self, "mtp_layers", exact_ints(self.mtp_layers, "mtp_layers", LayoutError)
        )
        if self.num_layers < 1:
            raise LayoutError(f"num_layers must be at least 1, found {self.num_layers}.")
        if not self.moe_layers:
            raise LayoutError(
                f"{self.family}: no layer routes (moe_layers is empty); a dense model "
                "has nothing to replay."
            )
        _check_increasing(self.moe_layers, 0, self.num_layers, "moe_layers")
        mtp_end = self.num_layers + len(self.mtp_layers)
        _check_increasing(self.mtp_layers, self.num_layers, mtp_end, "mtp_layers")
        if self.num_experts < 1:
            raise LayoutError(f"num_experts must be at least 1, found {self.num_experts}.")
        if not 1 <= self.top_k <= self.num_experts:
            raise LayoutError(
                f"top_k must be in [1, num_experts={self.num_experts}], found {self.top_k}: "
                "a router cannot pick more distinct experts than exist."
            )

    # -- constructors -----------------------------------------------------------------

    @classmethod
    def from_dense_pattern(
        cls,
        pattern: Sequence[int | bool],
        num_experts: int,
        top_k: int,
        mtp_layers: int = 0,
        family: str = "custom",
    ) -> MoELayout:
        """Layout from one flag per decoder layer: 1 (or True) where the layer routes."""
        bad = [v for v in pattern if v not in (0, 1)]
        if bad:
            raise LayoutError(f"A dense/MoE pattern holds only 0 and 1, found {bad[:4]}.")
        n = len(pattern)
        return cls(
            num_layers=n,
            moe_layers=tuple(i for i, v in enumerate(pattern) if v),
            num_experts=num_experts,
            top_k=top_k,
            mtp_layers=tuple(range(n, n + mtp_layers)),
            family=family,
        )

    @classmethod
    def from_hf_config(cls, config: Any) -> MoELayout:
        """Layout of a transformers config object or a config.json dict, by the rules of
        its family (`routereplay.families`). Multimodal configs are read through their
        `text_config`."""
        from routereplay.families import hf_layout

        return hf_layout(config)

    @classmethod
    def from_megatron_config(cls, config: Any) -> MoELayout:
        """Layout of a megatron-core `TransformerConfig` (or anything with its fields).

        `moe_layer_freq` as an int f routes layer i when i % f == 0 (Megatron's rule,
        not Hugging Face's); as a list it is one 0/1 flag per layer.
        """
        num_experts = getattr(config, "num_moe_experts", None)
        if not num_experts:
            raise LayoutError(
                "TransformerConfig.num_moe_experts is not set: this Megatron model has no routers."
            )
        num_layers = int(config.num_layers)
        freq = getattr(config, "moe_layer_freq", 1)
        if isinstance(freq, int):
            if freq < 1:
                raise LayoutError(f"moe_layer_freq must be at least 1, found {freq}.")
            pattern = [int(i % freq == 0) for i in range(num_layers)]
        else:
            pattern = list(freq)
            if len(pattern) != num_layers:
                raise LayoutError(
                    f"moe_layer_freq lists {len(pattern)} flags but num_layers is {num_layers}: "
                    "give exactly one 0/1 flag per decoder layer."
                )
        mtp = int(getattr(config, "mtp_num_layers", None) or 0)
        return cls.from_dense_pattern(
            pattern, int(num_experts), int(config.moe_router_topk), mtp, family="megatron"
        )

    # -- queries ----------------------------------------------------------------------

    def is_moe(self, layer: int) -> bool:
        """True when decoder layer `layer` (global, 0-based) has a router."""
        self._check_layer(layer)
        return layer in self._moe_set

    def moe_ordinal(self, layer: int) -> int:
        """Position of `layer` among the routed layers: the index on a routed-only axis."""
        self._check_layer(layer)
        try:
            return self.moe_layers.index(layer)
        except ValueError:
            raise LayoutError(
                f"Layer {layer} is dense in this {self.family} layout; routed layers are "
                f"{_short(self.moe_layers)}."
            ) from None

    def layer_axis(self, width: int) -> Literal["all_layers", "routed_layers"]:
        """What an engine's layer axis of `width` slots covers for this model.

        "all_layers": one slot per decoder layer, dense ones as zeros (vLLM and SGLang by
        default); "routed_layers": one slot per routed layer, in `moe_layers` order. When
        every layer routes the two coincide and the answer is "all_layers".
        """
        if width == self.num_layers:
            return "all_layers"
        if width == len(self.moe_layers):
            return "routed_layers"
        raise LayoutError(
            f"The layer axis has {width} slots; expected {self.num_layers} (every decoder "
            f"layer, dense ones as zeros) or {len(self.moe_layers)} (the routed layers "
            f"{_short(self.moe_layers)} only) for this {self.family} layout. Build the layout "
            "from the config of the model the engine served."
        )

    @property
    def dense_layers(self) -> tuple[int, ...]:
        """Global ids of the decoder layers without a router."""
        return tuple(i for i in range(self.num_layers) if i not in self._moe_set)

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What a trace must agree with to be replayed on this model."""
        return {
            "num_layers": self.num_layers,
            "moe_layers": list(self.moe_layers),
            "mtp_layers": list(self.mtp_layers),
            "num_experts": self.num_experts,
            "top_k": self.top_k,
        }

    def stage_layers(
        self, split: PipelineSplit, pp_rank: int, vp_stage: int = 0
    ) -> tuple[int, ...]:
        """Global decoder layer ids that megatron-core builds on (pp_rank, vp_stage) of
        `split`: even, interleaved (VPP), uneven first/last and embedding/loss-accounted
        splits alike (see `PipelineSplit`)."""
        return split.chunk_layers(self.num_layers, pp_rank, vp_stage)

    def stage_moe_layers(
        self, split: PipelineSplit, pp_rank: int, vp_stage: int = 0
    ) -> tuple[int, ...]:
        """The routed subset of `stage_layers(split, pp_rank, vp_stage)`."""
        return tuple(i for i in self.stage_layers(split, pp_rank, vp_stage) if i in self._moe_set)

    def rank_moe_layers(self, split: PipelineSplit, pp_rank: int) -> tuple[int, ...]:
        """The routed layers of every virtual stage pipeline rank `pp_rank` builds, in
        layer order: the layers whose routes that rank replays."""
        stages = (
            self.stage_moe_layers(split, pp_rank, vp_stage) for vp_stage in range(split.vp_size)
        )
        return tuple(sorted(layer for stage in stages for layer in stage))

    # -- internals --------------------------------------------------------------------

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise LayoutError(
                f"Layer {layer} is outside the {self.num_layers} decoder layers of this "
                f"{self.family} layout (ids are global and 0-based)."
            )


def _check_increasing(ids: tuple[int, ...], lo: int, hi: int, name: str) -> None:
    for a, b in itertools.pairwise(ids):
        if b <= a:
            raise LayoutError(f"{name} must be strictly increasing, found {a} before {b}.")
    if ids and not (lo <= ids[0] and ids[-1] < hi):
        raise LayoutError(f"{name} must lie in [{lo}, {hi}), found {_short(ids)}.")
