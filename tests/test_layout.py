"""MoELayout: which global layers route, read from every supported config family."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hf_models import FAMILIES, router_of, tiny_config, tiny_model

from routereplay import LayoutError, MoELayout, PipelineSplit

# Hybrid variants: (family, overrides, expected routed layers of 6 decoder layers).
HYBRIDS = [
    ("deepseek_v3", {"first_k_dense_replace": 3}, (3, 4, 5)),
    ("glm4_moe", {"first_k_dense_replace": 2}, (2, 3, 4, 5)),
    ("qwen2_moe", {"mlp_only_layers": [0, 3]}, (1, 2, 4, 5)),
    ("qwen3_moe", {"decoder_sparse_step": 2}, (1, 3, 5)),
    ("qwen3_next", {"mlp_only_layers": [5]}, (0, 1, 2, 3, 4)),
    ("mixtral", {}, (0, 1, 2, 3, 4, 5)),
    ("olmoe", {}, (0, 1, 2, 3, 4, 5)),
    ("gpt_oss", {}, (0, 1, 2, 3, 4, 5)),
]


@pytest.mark.parametrize("family", FAMILIES)
def test_layout_matches_the_routers_transformers_builds(family: str) -> None:
    model = tiny_model(family)
    layout = MoELayout.from_hf_config(model.config)
    built = tuple(i for i, layer in enumerate(model.model.layers) if router_of(layer) is not None)
    assert layout.moe_layers == built
    assert layout.num_layers == len(model.model.layers)
    assert layout.top_k == model.config.num_experts_per_tok
    assert layout.family == family


@pytest.mark.parametrize(("family", "overrides", "routed"), HYBRIDS)
def test_hybrid_dense_patterns_follow_the_model(
    family: str, overrides: dict, routed: tuple
) -> None:
    model = tiny_model(family, num_hidden_layers=6, **overrides)
    built = tuple(i for i, layer in enumerate(model.model.layers) if router_of(layer) is not None)
    assert built == routed
    assert MoELayout.from_hf_config(model.config).moe_layers == routed


@pytest.mark.parametrize(("family", "overrides", "routed"), HYBRIDS)
def test_a_config_json_dict_reads_like_the_config_object(
    family: str, overrides: dict, routed: tuple
) -> None:
    as_dict = tiny_config(family, num_hidden_layers=6, **overrides).to_dict()
    assert MoELayout.from_hf_config(as_dict) == MoELayout.from_hf_config(
        tiny_config(family, num_hidden_layers=6, **overrides)
    )
    assert MoELayout.from_hf_config(as_dict).moe_layers == routed


def test_deepseek_v3_full_size_shape_has_58_routed_layers_and_an_mtp_layer() -> None:
    config = {
        "model_type": "deepseek_v3",
        "num_hidden_layers": 61,
        "first_k_dense_replace": 3,
        "moe_layer_freq": 1,
        "n_routed_experts": 256,
        "num_experts_per_tok": 8,
        "num_nextn_predict_layers": 1,
    }
    layout = MoELayout.from_hf_config(config)
    assert layout.moe_layers == tuple(range(3, 61))
    assert layout.dense_layers == (0, 1, 2)
    assert layout.mtp_layers == (61,)
    assert not layout.is_moe(2) and layout.is_moe(3)
    assert layout.moe_ordinal(3) == 0 and layout.moe_ordinal(60) == 57


def test_moe_layer_freq_in_a_deepseek_config_skips_layers() -> None:
    config = {
        "model_type": "deepseek_v2",
        "num_hidden_layers": 6,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 2,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
    }
    assert MoELayout.from_hf_config(config).moe_layers == (2, 4)


def test_mtp_layers_are_kept_apart_from_decoder_layers() -> None:
    config = tiny_config("deepseek_v3", num_nextn_predict_layers=2)
    assert (
        MoELayout.from_hf_config(tiny_config("deepseek_v3", num_nextn_predict_layers=0)).mtp_layers
        == ()
    )
    layout = MoELayout.from_hf_config(config)
    assert layout.mtp_layers == (4, 5)
    assert 4 not in layout.moe_layers
    with pytest.raises(LayoutError, match="outside the 4 decoder layers"):
        layout.is_moe(4)


def test_qwen3_next_mtp_key_is_read() -> None:
    config = tiny_config("qwen3_next").to_dict() | {"mtp_num_hidden_layers": 1}
    assert MoELayout.from_hf_config(config).mtp_layers == (4,)


def test_multimodal_config_is_read_through_its_text_config() -> None:
    text = tiny_config("qwen3_moe").to_dict()
    assert MoELayout.from_hf_config(
        {"model_type": "qwen3_vl_moe", "text_config": text}
    ).moe_layers == (
        0,
        1,
        2,
        3,
    )


def test_megatron_int_moe_layer_freq_routes_multiples() -> None:
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=6,
        hidden_size=32,
        num_attention_heads=4,
        num_moe_experts=8,
        moe_router_topk=2,
        moe_layer_freq=2,
        mtp_num_layers=1,
    )
    layout = MoELayout.from_megatron_config(config)
    assert layout.moe_layers == (0, 2, 4)
    assert layout.mtp_layers == (6,)
    assert (layout.num_experts, layout.top_k) == (8, 2)


def test_megatron_list_moe_layer_freq_is_one_flag_per_layer() -> None:
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=8,
        hidden_size=32,
        num_attention_heads=4,
        num_moe_experts=8,
        moe_router_topk=2,
        moe_layer_freq=[0, 0, 1, 1, 1, 1, 1, 1],
    )
    assert MoELayout.from_megatron_config(config).moe_layers == (2, 3, 4, 5, 6, 7)


# -- errors -------------------------------------------------------------------------


def test_unknown_family_with_router_fields_names_the_supported_ones() -> None:
    config = {"model_type": "jamba", "num_hidden_layers": 4, "num_experts": 16}
    with pytest.raises(
        LayoutError, match=r"'jamba' is an MoE config .*num_experts.*Supported: .*mixtral"
    ):
        MoELayout.from_hf_config(config)


def test_dense_model_config_is_rejected() -> None:
    with pytest.raises(LayoutError, match="not an MoE config"):
        MoELayout.from_hf_config({"model_type": "llama", "num_hidden_layers": 4})


def test_megatron_config_without_experts_is_rejected() -> None:
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(num_layers=4, hidden_size=32, num_attention_heads=4)
    with pytest.raises(LayoutError, match="num_moe_experts is not set"):
        MoELayout.from_megatron_config(config)


def test_dense_pattern_of_the_wrong_length_is_rejected() -> None:
    # A TransformerConfig refuses this itself; this checks our own guard.
    config = SimpleNamespace(
        num_layers=4, num_moe_experts=8, moe_router_topk=2, moe_layer_freq=[1, 1, 0]
    )
    with pytest.raises(LayoutError, match="lists 3 flags but num_layers is 4"):
        MoELayout.from_megatron_config(config)


def test_top_k_above_expert_count_is_rejected() -> None:
    with pytest.raises(LayoutError, match="top_k must be in \\[1, num_experts=4\\], found 8"):
        MoELayout(num_layers=2, moe_layers=(0, 1), num_experts=4, top_k=8)


def test_missing_expert_count_is_named() -> None:
    with pytest.raises(
        LayoutError,
        match="mixtral config has no n_routed_experts or num_experts or num_local_experts",
    ):
        MoELayout.from_hf_config(
            {"model_type": "mixtral", "num_hidden_layers": 2, "num_experts_per_tok": 2}
        )


def test_mlp_only_layers_outside_the_model_are_rejected() -> None:
    config = tiny_config("qwen2_moe").to_dict() | {"mlp_only_layers": [4]}
    with pytest.raises(
        LayoutError, match=r"mlp_only_layers \[4\] lie outside the 4 decoder layers"
    ):
        MoELayout.from_hf_config(config)


def test_a_model_with_no_routed_layer_is_rejected() -> None:
    with pytest.raises(LayoutError, match="no layer routes"):
        MoELayout.from_dense_pattern([0, 0], num_experts=4, top_k=2)


def test_moe_ordinal_of_a_dense_layer_is_an_error(hybrid_layout: MoELayout) -> None:
    with pytest.raises(LayoutError, match="Layer 1 is dense"):
        hybrid_layout.moe_ordinal(1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pp_size": 3, "pp_rank": 0}, "8 layers do not divide over pp_size=3"),
        ({"pp_size": 2, "pp_rank": 0, "vp_size": 3}, "4 layers per pipeline rank do not divide"),
        ({"pp_size": 1, "pp_rank": 0, "vp_size": 2}, "need pp_size > 1"),
        ({"pp_size": 2, "pp_rank": 2}, "outside a pipeline of pp_size=2"),
        ({"pp_size": 3, "pp_rank": 0, "first_stage_layers": 3}, "5 middle layers must divide"),
        (
            {"pp_size": 2, "pp_rank": 0, "first_stage_layers": 3, "last_stage_layers": 3},
            "2 layers remain for 0 middle pipeline ranks",
        ),
        (
            {"pp_size": 2, "pp_rank": 0, "first_stage_layers": 2, "account_for_loss": True},
            "cannot be combined",
        ),
    ],
)
def test_impossible_pipeline_splits_say_what_to_fix(
    hybrid_layout: MoELayout, kwargs: dict, message: str
) -> None:
    split = dict(kwargs)
    pp_rank = split.pop("pp_rank")
    with pytest.raises(LayoutError, match=message):
        hybrid_layout.stage_layers(PipelineSplit(**split), pp_rank)


def test_dense_prefix_does_not_shift_stage_moe_layers(hybrid_layout: MoELayout) -> None:
    # Stage 0 of PP=2 holds layers 0-3, of which only 2 and 3 route.
    assert hybrid_layout.stage_moe_layers(PipelineSplit(pp_size=2), 0) == (2, 3)
    assert hybrid_layout.stage_moe_layers(PipelineSplit(pp_size=2), 1) == (4, 5, 6, 7)
    # Interleaved: rank 0 holds chunks 0 and 2.
    interleaved = PipelineSplit(pp_size=2, vp_size=2)
    assert hybrid_layout.stage_moe_layers(interleaved, 0, vp_stage=0) == ()
    assert hybrid_layout.stage_moe_layers(interleaved, 0, vp_stage=1) == (4, 5)
    assert hybrid_layout.rank_moe_layers(interleaved, 0) == (4, 5)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"pp_size": 0}, "pp_size and vp_size must be at least 1"),
        ({"pp_size": 2.0}, r"pp_size must be an integer, found 2\.0"),
        ({"pp_size": 2, "first_stage_layers": "3"}, "first_stage_layers must be an integer"),
        ({"pp_size": 2, "account_for_loss": 1}, "account_for_loss must be True or False"),
    ],
)
def test_a_pipeline_split_of_wrong_values_is_refused_when_built(fields: dict, message: str) -> None:
    with pytest.raises(LayoutError, match=message):
        PipelineSplit(**fields)


def test_a_pipeline_split_reads_every_field_of_a_megatron_config() -> None:
    config = SimpleNamespace(
        pipeline_model_parallel_size=4,
        virtual_pipeline_model_parallel_size=2,
        num_layers_in_first_pipeline_stage=2,
        num_layers_in_last_pipeline_stage=4,
        account_for_embedding_in_pipeline_split=False,
        account_for_loss_in_pipeline_split=False,
    )
    assert PipelineSplit.from_megatron_config(config) == PipelineSplit(
        pp_size=4, vp_size=2, first_stage_layers=2, last_stage_layers=4
    )
    accounted = SimpleNamespace(
        pipeline_model_parallel_size=2,
        virtual_pipeline_model_parallel_size=None,
        account_for_embedding_in_pipeline_split=True,
        account_for_loss_in_pipeline_split=True,
    )
    assert PipelineSplit.from_megatron_config(accounted) == PipelineSplit(
        pp_size=2, account_for_embedding=True, account_for_loss=True
    )


def test_one_pipeline_rank_builds_every_layer_whatever_else_the_config_says() -> None:
    config = SimpleNamespace(pipeline_model_parallel_size=1, virtual_pipeline_model_parallel_size=2)
    assert PipelineSplit.from_megatron_config(config) == PipelineSplit()
    assert PipelineSplit.from_megatron_config(SimpleNamespace()) == PipelineSplit()


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: MoELayout(0, (0,), 4, 2), "num_layers must be at least 1, found 0"),
        (
            lambda: MoELayout(4, (2, 1), 4, 2),
            "moe_layers must be strictly increasing, found 2 before 1",
        ),
        (lambda: MoELayout(4, (1, 4), 4, 2), r"moe_layers must lie in \[0, 4\), found \[1, 4\]"),
        (lambda: MoELayout(4, (1,), 4, 2, mtp_layers=(5,)), r"mtp_layers must lie in \[4, 5\)"),
        (lambda: MoELayout(4, (1,), 0, 1), "num_experts must be at least 1, found 0"),
        (lambda: MoELayout.from_dense_pattern([0, 2], 4, 2), r"holds only 0 and 1, found \[2\]"),
        (
            lambda: MoELayout.from_megatron_config(
                SimpleNamespace(
                    num_layers=4, num_moe_experts=8, moe_router_topk=2, moe_layer_freq=0
                )
            ),
            "moe_layer_freq must be at least 1, found 0",
        ),
    ],
)
def test_malformed_layouts_are_rejected(build: object, message: str) -> None:
    with pytest.raises(LayoutError, match=message):
        build()  # type: ignore[operator]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_experts", 8.5),
        ("num_experts", "8"),
        ("top_k", 2.0),
        ("moe_layers", (1.7, 2.2)),
        ("moe_layers", "12"),
    ],
)
def test_a_layout_of_numbers_that_are_not_integers_is_refused(field: str, value: object) -> None:
    kwargs: dict[str, object] = {
        "num_layers": 4,
        "moe_layers": (1, 2),
        "num_experts": 8,
        "top_k": 2,
    }
    with pytest.raises(
        LayoutError, match=rf"{field}( item)? must be (an integer|a sequence of integers), found"
    ):
        MoELayout(**kwargs | {field: value})  # type: ignore[arg-type]
