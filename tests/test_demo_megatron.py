"""`routereplay demo --trainer megatron`: the seed's scenario, measured end to end.

A megatron-core GPTModel with a dense prefix, split PP=2 x VPP=2 over 2 gloo processes
with full recompute, trained from a bf16 engine copy's vLLM-format routes. One short
run (a tiny warm-up, 2 GRPO steps of 16 sequences per scheme) feeds most tests.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("megatron.core")

from routereplay.cli import EXIT_BAD_INPUT, main
from routereplay.demo.grpo import GRPOSettings
from routereplay.demo.megatron_model import MegatronModel, pipeline_split
from routereplay.demo.megatron_run import run_megatron_demo
from routereplay.demo.model import WarmUp
from routereplay.demo.report import render_table
from routereplay.demo.verl_mapping import misplaced_layers, verl_slots
from routereplay.errors import LayoutError

pytestmark = pytest.mark.timeout(240)

SMALL = {
    "grpo": GRPOSettings(prompts_per_step=4, group_size=4),
    "warm_up": WarmUp(steps=10, batch_size=16),
    "timeout_s": 180.0,
}


@pytest.fixture(scope="module")
def result() -> dict[str, Any]:
    """The default split (PP=2 x VPP=2), every scheme, 2 steps (about 40 s on 2 cores)."""
    return run_megatron_demo(steps=2, seed=0, **SMALL)


def test_every_chunk_of_both_ranks_holds_routed_layers(result: dict[str, Any]) -> None:
    chunks = result["settings"]["pipeline"]["chunk_layers"]
    moe = set(result["settings"]["moe_layers"])
    assert len(chunks) == 4  # 2 pipeline ranks x 2 virtual stages
    assert all(moe & set(layers) for layers in chunks.values())


def test_under_r3_the_trainer_runs_the_engines_experts_on_every_routed_layer(
    result: dict[str, Any],
) -> None:
    # Read from the routing_map each megatron router handed its dispatcher, on both
    # ranks and both virtual chunks, against the routes decoded from the vLLM payload.
    moe = {str(layer) for layer in result["settings"]["moe_layers"]}
    for report in result["modes"]["R3"]["steps"]:
        assert set(report["routing_per_layer"]) == moe
        assert set(report["routing_per_layer"].values()) == {0.0}
        assert report["routing_disagreement"] == 0.0


def test_without_replay_the_trainer_routes_differently(result: dict[str, Any]) -> None:
    assert result["modes"]["none"]["summary"]["routing_disagreement"] > 0


def test_r3_lowers_the_training_inference_kl(result: dict[str, Any]) -> None:
    k3 = {scheme: run["summary"]["mismatch"]["k3_kl"] for scheme, run in result["modes"].items()}
    assert k3["R3"] < k3["none"]


def test_r2_replays_its_own_log_prob_pass_in_the_updates(result: dict[str, Any]) -> None:
    for report in result["modes"]["R2"]["steps"]:
        # Replayed rows in the updates, counted on both ranks' routers.
        assert report["update_counterfactual_disagreement"] is not None


def test_verls_mapping_misplaces_every_moe_layer_after_the_dense_prefix(
    result: dict[str, Any],
) -> None:
    verl = result["modes"]["R3"]["summary"]["verl_mapping"]
    chunks = result["settings"]["pipeline"]["chunk_layers"]
    first_chunk = set(chunks["pp_rank 0, vp_stage 0"])
    after_prefix_chunk = [
        layer for layer in result["settings"]["moe_layers"] if layer not in first_chunk
    ]
    assert verl["misplaced_layers"] == after_prefix_chunk
    assert verl["unplaced_layers"] == [7]  # slot 7 of 7 routed layers: past the end
    for layer in after_prefix_chunk[:-1]:
        assert verl["routing_per_layer"][str(layer)] > 0.3  # another layer's experts
    assert verl["routing_per_layer"]["7"] > 0  # routed natively: the engine gap is back
    assert verl["k3_kl"] > result["modes"]["R3"]["summary"]["mismatch"]["k3_kl"]


def test_the_table_shows_both_mappings(result: dict[str, Any]) -> None:
    table = render_table(result)
    assert "PP=2 x VPP=2" in table
    assert "verl (i + offset)" in table and "routereplay" in table


def test_verls_slots_count_dense_layers_in_the_offset() -> None:
    model = MegatronModel()
    split = pipeline_split(model, 2, 2, None, None)
    # Chunks hold layers 0-1, 2-3 (rank 1), 4-5 (rank 0), 6-7; layer 0 is dense.
    assert verl_slots(model.layout, split) == {1: 0, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6, 7: None}
    assert misplaced_layers(model.layout, pipeline_split(model, 2, None, None, None)) != []


@pytest.mark.parametrize(
    ("pp", "vp", "first", "last", "message"),
    [
        (3, None, None, None, "--pp must be 2"),
        (2, 3, None, None, "do not divide into vp_size=3"),
        (2, 8, None, None, "do not divide into vp_size=8"),
        (2, None, 3, 4, "first"),
    ],
)
def test_an_impossible_split_is_refused_before_any_process_starts(
    pp: int, vp: int | None, first: int | None, last: int | None, message: str
) -> None:
    with pytest.raises(LayoutError, match=message):
        pipeline_split(MegatronModel(), pp, vp, first, last)


def test_the_cli_refuses_an_impossible_split(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--trainer", "megatron", "--vp", "3"]) == EXIT_BAD_INPUT
    assert "vp_size=3" in capsys.readouterr().err


def test_an_uneven_split_without_vpp_replays_exactly_too() -> None:
    result = run_megatron_demo(
        steps=1,
        pp=2,
        vp=None,
        first_stage_layers=3,
        last_stage_layers=5,
        schemes=("R3",),
        **SMALL,
    )
    chunks = result["settings"]["pipeline"]["chunk_layers"]
    assert chunks == {"pp_rank 0, vp_stage 0": [0, 1, 2], "pp_rank 1, vp_stage 0": [3, 4, 5, 6, 7]}
    report = result["modes"]["R3"]["steps"][0]
    assert set(report["routing_per_layer"].values()) == {0.0}
    assert result["modes"]["R3"]["summary"]["verl_mapping"]["misplaced_layers"] == [3, 4, 5, 6, 7]
