"""MoELayout.stage_layers and PipelineSplit against megatron-core's own placement functions.

megatron-core is the reference: for every pipeline split it accepts and places as a
partition of the layers, our stage slices must equal its
`get_transformer_layer_offset` / `get_num_layers_to_build`, chunk by chunk.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st

from routereplay import LayoutError, MoELayout, PipelineSplit

Stages = dict[tuple[int, int], tuple[int, ...]]


def megatron_config(split: dict[str, Any]) -> Any:
    """megatron-core's `TransformerConfig` of `split`; raises what it raises."""
    from megatron.core.transformer import TransformerConfig

    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return TransformerConfig(
                num_layers=split["num_layers"],
                hidden_size=8,
                num_attention_heads=2,
                pipeline_dtype=torch.float32,
                pipeline_model_parallel_size=split["pp_size"],
                virtual_pipeline_model_parallel_size=split["vp"],
                num_layers_in_first_pipeline_stage=split["first"],
                num_layers_in_last_pipeline_stage=split["last"],
                account_for_embedding_in_pipeline_split=split["embedding"],
                account_for_loss_in_pipeline_split=split["loss"],
            )
    finally:
        logging.disable(logging.NOTSET)


def megatron_stages(split: dict[str, Any]) -> Stages:
    """Layer ids megatron-core builds on every (pp_rank, vp_stage); raises what it raises."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    config = megatron_config(split)
    stages: Stages = {}
    for rank in range(split["pp_size"]):
        for stage in range(split["vp"] or 1):
            vp_stage = stage if split["vp"] else None
            offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=rank)
            count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=rank)
            stages[(rank, stage)] = tuple(range(offset, offset + count))
    return stages


def pipeline_split(split: dict[str, Any]) -> PipelineSplit:
    return PipelineSplit(
        pp_size=split["pp_size"],
        vp_size=split["vp"] or 1,
        first_stage_layers=split["first"],
        last_stage_layers=split["last"],
        account_for_embedding=split["embedding"],
        account_for_loss=split["loss"],
    )


def our_stages(layout: MoELayout, split: dict[str, Any]) -> Stages:
    pipeline = pipeline_split(split)
    return {
        (rank, stage): layout.stage_layers(pipeline, rank, stage)
        for rank in range(split["pp_size"])
        for stage in range(split["vp"] or 1)
    }


def in_placement_order(stages: Stages, pp_size: int) -> list[int]:
    """All layer ids in Megatron's chunk order: vp_stage major, pp_rank minor."""
    return [
        i
        for (rank, stage) in sorted(stages, key=lambda k: (k[1], k[0]))
        for i in stages[(rank, stage)]
    ]


@st.composite
def pipeline_splits(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly splits Megatron accepts, plus arbitrary ones to exercise the rejections."""
    pp_size = draw(st.integers(1, 4))
    vp = draw(st.sampled_from([None, 1, 2, 3]))
    unit = vp or 1
    uneven = draw(st.booleans())
    first = (
        draw(st.one_of(st.none(), st.integers(1, 3).map(lambda n: n * unit))) if uneven else None
    )
    last = draw(st.one_of(st.none(), st.integers(1, 3).map(lambda n: n * unit))) if uneven else None
    embedding = draw(st.booleans()) if not uneven else False
    loss = draw(st.booleans()) if not uneven else False
    if draw(st.booleans()):
        middle_ranks = pp_size - (first is not None) - (last is not None)
        per_rank = draw(st.integers(1, 3)) * unit if middle_ranks > 0 else 0
        num_layers = (first or 0) + (last or 0) + max(middle_ranks, 0) * per_rank
        num_layers -= int(embedding) + int(loss)
    else:
        num_layers = draw(st.integers(1, 24))
    return {
        "num_layers": max(num_layers, 1),
        "pp_size": pp_size,
        "vp": vp,
        "first": first,
        "last": last,
        "embedding": embedding,
        "loss": loss,
    }


@given(split=pipeline_splits(), data=st.data())
def test_stage_layers_match_megatron_core(split: dict[str, Any], data: st.DataObject) -> None:
    pattern = data.draw(
        st.lists(st.booleans(), min_size=split["num_layers"], max_size=split["num_layers"]).filter(
            any
        )
    )
    layout = MoELayout.from_dense_pattern(pattern, num_experts=4, top_k=2)
    try:
        theirs: Stages | None = megatron_stages(split)
        megatron_error: Exception | None = None
    except (ValueError, AssertionError, ZeroDivisionError) as error:
        theirs, megatron_error = None, error
    everything = list(range(split["num_layers"]))
    megatron_partitions = (
        theirs is not None and in_placement_order(theirs, split["pp_size"]) == everything
    )

    try:
        ours = our_stages(layout, split)
    except LayoutError:
        event("refused")
        # We refuse exactly what Megatron refuses, places as garbage (overlapping or
        # missing layers), or what is meaningless (uneven stages with a single stage).
        uneven_single_stage = split["pp_size"] == 1 and (split["first"] or split["last"])
        assert not megatron_partitions or uneven_single_stage, (split, theirs)
        return

    event("placed, megatron agrees" if theirs is not None else "placed, megatron crashes")
    assert in_placement_order(ours, split["pp_size"]) == everything
    if theirs is not None:
        assert ours == theirs, split
    else:
        # The one split we place that Megatron cannot: uneven first AND last stages
        # with VPP and no middle stage divides by zero in get_transformer_layer_offset.
        assert isinstance(megatron_error, ZeroDivisionError), (split, megatron_error)
        assert split["first"] and split["last"] and split["vp"] and split["pp_size"] == 2

    for (rank, stage), layers in ours.items():
        moe = layout.stage_moe_layers(pipeline_split(split), rank, stage)
        assert moe == tuple(i for i in layers if pattern[i])


@pytest.mark.parametrize(
    ("split", "expected"),
    [
        # 8 layers, PP=2 x VPP=2: rank 0 holds chunks 0 and 2.
        (
            {
                "num_layers": 8,
                "pp_size": 2,
                "vp": 2,
                "first": None,
                "last": None,
                "embedding": False,
                "loss": False,
            },
            {(0, 0): (0, 1), (1, 0): (2, 3), (0, 1): (4, 5), (1, 1): (6, 7)},
        ),
        # Uneven: 2 layers first, 2 last, 6 over 2 middle ranks.
        (
            {
                "num_layers": 10,
                "pp_size": 4,
                "vp": None,
                "first": 2,
                "last": 2,
                "embedding": False,
                "loss": False,
            },
            {(0, 0): (0, 1), (1, 0): (2, 3, 4), (2, 0): (5, 6, 7), (3, 0): (8, 9)},
        ),
        # Embedding and loss count as pseudo-layers at the two ends.
        (
            {
                "num_layers": 6,
                "pp_size": 2,
                "vp": None,
                "first": None,
                "last": None,
                "embedding": True,
                "loss": True,
            },
            {(0, 0): (0, 1, 2), (1, 0): (3, 4, 5)},
        ),
    ],
)
def test_known_splits_match_megatron_core(split: dict[str, Any], expected: Stages) -> None:
    layout = MoELayout.from_dense_pattern([1] * split["num_layers"], num_experts=4, top_k=2)
    assert megatron_stages(split) == expected
    assert our_stages(layout, split) == expected


@pytest.mark.parametrize(
    "split",
    [
        {"pp_size": 2, "vp": 2, "first": None, "last": None, "embedding": False, "loss": False},
        {"pp_size": 4, "vp": None, "first": 2, "last": 2, "embedding": False, "loss": False},
        {"pp_size": 2, "vp": None, "first": None, "last": None, "embedding": True, "loss": True},
    ],
)
def test_a_pipeline_split_reads_megatron_cores_own_config(split: dict[str, Any]) -> None:
    config = megatron_config({"num_layers": 10 if split["first"] else 8, **split})
    assert PipelineSplit.from_megatron_config(config) == pipeline_split(split)
