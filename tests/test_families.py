"""The family table is the one home of a transformers family's routing knowledge."""

from __future__ import annotations

import inspect

import pytest
import torch
from hf_models import ExpertIds, tiny_config, tiny_model

from routereplay import LayoutError, MoELayout, RouterSpec, attach
from routereplay.engines.hf import RecordingEngine, SamplingParams
from routereplay.families import FAMILIES, SUPPORTED_FAMILIES, Family
from routereplay.families.routers import find_routers
from routereplay.families.table import first_k_dense, sparse_step


def test_every_family_in_the_table_is_supported() -> None:
    assert tuple(FAMILIES) == SUPPORTED_FAMILIES
    assert all(isinstance(family, Family) for family in FAMILIES.values())


def test_a_new_family_is_one_table_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    # A family transformers would ship later under another name, routing like Qwen3.
    model = tiny_model("qwen3_moe")
    model.config.model_type = "qwen3_5_moe"
    monkeypatch.setitem(FAMILIES, "qwen3_5_moe", FAMILIES["qwen3_moe"])
    controller = attach(model)
    ids = torch.randint(3, 90, (2, 7))
    experts = ExpertIds(model)
    with controller.record() as recording:
        model(ids)
    assert controller.layout.family == "qwen3_5_moe"
    trace = recording.trace
    assert trace.layers == controller.layout.moe_layers
    for layer in trace.layers:
        recorded = trace.layer_experts(layer).reshape(-1, trace.top_k).long()
        assert torch.equal(experts.last(layer), recorded)


def test_an_unknown_family_is_refused_until_it_has_an_entry() -> None:
    config = tiny_config("qwen3_moe")
    config.model_type = "qwen3_5_moe"
    with pytest.raises(LayoutError, match="qwen3_5_moe"):
        MoELayout.from_hf_config(config)


def test_layout_and_router_spec_are_read_from_the_table() -> None:
    config = {
        "model_type": "deepseek_v3",
        "num_hidden_layers": 5,
        "num_experts_per_tok": 2,
        "n_routed_experts": 8,
        "first_k_dense_replace": 2,
        "n_group": 4,
        "topk_group": 2,
        "routed_scaling_factor": 2.5,
    }
    assert MoELayout.from_hf_config(config).moe_layers == (2, 3, 4)
    spec = RouterSpec.from_hf_config(config)
    assert (spec.score, spec.n_group, spec.topk_group, spec.scaling_factor) == (
        "sigmoid",
        4,
        2,
        2.5,
    )
    assert FAMILIES["deepseek_v3"].routed is first_k_dense
    assert FAMILIES["qwen3_moe"].routed is sparse_step


def test_gpt_oss_routers_are_found_by_the_family_router_name() -> None:
    assert FAMILIES["gpt_oss"].router_name == "router"
    model = tiny_model("gpt_oss")
    assert list(find_routers(model)) == list(MoELayout.from_hf_config(model.config).moe_layers)


def test_the_recording_engine_patches_routers_without_the_trainer_adapter() -> None:
    # engines/ sits beside integrations/, not above it: both patch routers through
    # routereplay.families.routers.
    import routereplay.engines.hf as engine_module

    assert "routereplay.integrations" not in inspect.getsource(engine_module)
    engine = RecordingEngine(tiny_model("qwen3_moe"), dtype=torch.float32)
    (rollout,) = engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=3, seed=1))
    assert rollout.routes.layers == engine.controller.layout.moe_layers
