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
        self,
        pp_size: int,
        pp_rank: int,
        vp_size: int = 1,
        vp_stage: int = 0,
        first_stage_layers: int | None = None,
        last_stage_layers: int | None = None,
        account_for_embedding: bool = False,
        account_for_loss: bool = False,
    ) -> tuple[int, ...]:
        """Global decoder layer ids that megatron-core builds on (pp_rank, vp_stage).

        Matches `get_transformer_layer_offset` / `get_num_layers_to_build`, including
        uneven first/last stages (`num_layers_in_{first,last}_pipeline_stage`) and the
        embedding/loss pseudo-layers (`account_for_{embedding,loss}_in_pipeline_split`).
        """
        sizes = _chunk_sizes(
            self.num_layers,
            pp_size,
            vp_size,
            first_stage_layers,
            last_stage_layers,
            account_for_embedding,
            account_for_loss,
        )
        if not (0 <= pp_rank < pp_size and 0 <= vp_stage < vp_size):
            raise LayoutError(
                f"(pp_rank={pp_rank}, vp_stage={vp_stage}) is outside a pipeline of "
                f"pp_size={pp_size}, vp_size={vp_size}."
            )
        # Megatron places chunks round by round: virtual stage 0 of every rank, then
        # virtual stage 1 of every rank, and so on.
        chunk = vp_stage * pp_size + pp_rank
        offset = sum(sizes[:chunk])
        return tuple(range(offset, offset + sizes[chunk]))

    def stage_moe_layers(self, *args: Any, **kwargs: Any) -> tuple[int, ...]:
        """The routed subset of `stage_layers(...)`, same arguments."""
        return tuple(i for i in self.stage_layers(*args, **kwargs) if i in self._moe_set)

    def rank_moe_layers(
        self, pp_size: int, pp_rank: int, vp_size: int = 1, **split: Any
    ) -> tuple[int, ...]:
        """The routed layers of every virtual stage pipeline rank `pp_rank` builds, in
        layer order: the layers whose routes that rank replays. `split` takes the
        keyword arguments of `stage_layers` after `vp_stage`."""
        stages = (
            self.stage_moe_layers(pp_size, pp_rank, vp_size, vp_stage, **split)
            for vp_stage in range(vp_size)
        )
        return tuple(sorted(layer for stage in stages for layer in stage))

    # -- internals --------------------------------------------------------------------

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise LayoutError(
                f"Layer {layer} is outside the {self.num_layers} decoder layers of this "
                f"{self.family} layout (ids are global and 0-based)."
            )


def _chunk_sizes(
    num_layers: int,
    pp_size: int,
    vp_size: int,
    first: int | None,
    last: int | None,
    account_for_embedding: bool,
    account_for_loss: bool,
) -> list[int]:
    """Layers per model chunk, in Megatron's placement order (vp_stage major, pp_rank minor)."""
    if pp_size < 1 or vp_size < 1:
        raise LayoutError(f"pp_size and vp_size must be at least 1, found {pp_size}, {vp_size}.")
    if vp_size > 1 and pp_size == 1:
        raise LayoutError("Virtual pipeline stages (vp_size > 1) need pp_size > 1.")
    uneven = first is not None or last is not None
    if uneven and pp_size == 1:
        raise LayoutError("first/last stage layer counts need pp_size > 1.")
    if uneven and (account_for_embedding or account_for_loss):
        raise LayoutError(
            "Uneven first/last stages cannot be combined with account_for_embedding/loss "
            "(megatron-core rejects it too)."
        )
    if uneven:
        return _uneven_chunk_sizes(num_layers, pp_size, vp_size, first, last)

    # Embedding and loss count as pseudo-layers at the two ends of the split.
    slots = num_layers + int(account_for_embedding) + int(account_for_loss)
    if slots % pp_size:
        raise LayoutError(
            f"{slots} layers{_pseudo(account_for_embedding, account_for_loss)} do not divide "
            f"over pp_size={pp_size}: use a layer count divisible by {pp_size}, or set "
            "first/last stage layer counts."
        )
    per_rank = slots // pp_size
    if per_rank % vp_size:
        raise LayoutError(
            f"{per_rank} layers per pipeline rank do not divide into vp_size={vp_size} "
            "virtual stages."
        )
    sizes = [per_rank // vp_size] * (pp_size * vp_size)
    # Every chunk holds at least one slot here, so neither can go negative.
    sizes[0] -= int(account_for_embedding)
    sizes[-1] -= int(account_for_loss)
    return sizes


def _uneven_chunk_sizes(
    num_layers: int, pp_size: int, vp_size: int, first: int | None, last: int | None
) -> list[int]:
    middle_ranks = pp_size - (first is not None) - (last is not None)
    middle_layers = num_layers - (first or 0) - (last or 0)
    for name, count in (("first", first), ("last", last)):
        if count is not None and (count <= 0 or count % vp_size):
            raise LayoutError(
                f"The {name} stage holds {count} layers; it must be positive and divisible "
                f"by vp_size={vp_size}."
            )
    if middle_layers < 0 or bool(middle_layers) != bool(middle_ranks):
        raise LayoutError(
            f"{middle_layers} layers remain for {middle_ranks} middle pipeline ranks after the "
            f"first ({first}) and last ({last}) stages: both must be zero or both positive."
        )
    per_middle = middle_layers // middle_ranks if middle_ranks else 0
    if middle_ranks and (middle_layers % middle_ranks or per_middle % vp_size):
        raise LayoutError(
            f"{middle_layers} middle layers must divide over {middle_ranks} middle ranks and "
            f"then over vp_size={vp_size} virtual stages."
        )
    per_rank = [per_middle] * pp_size
    if first is not None:
        per_rank[0] = first
    if last is not None:
        per_rank[-1] = last
    return [n // vp_size for _ in range(vp_size) for n in per_rank]


def _pseudo(embedding: bool, loss: bool) -> str:
    extra = [name for name, on in (("embedding", embedding), ("loss", loss)) if on]
    return f" (counting {' and '.join(extra)})" if extra else ""


def _check_increasing(ids: tuple[int, ...], lo: int, hi: int, name: str) -> None:
    for a, b in itertools.pairwise(ids):
        if b <= a:
            raise LayoutError(f"{name} must be strictly increasing, found {a} before {b}.")
    if ids and not (lo <= ids[0] and ids[-1] < hi):
        raise LayoutError(f"{name} must lie in [{lo}, {hi}), found {_short(ids)}.")
