"""`routereplay layout CONFIG.json`: which layers route, overall and per pipeline stage."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

from routereplay.cli.common import EXIT_OK, bad_input

if TYPE_CHECKING:
    from routereplay.cli.common import Commands


def add(commands: Commands) -> None:
    layout = commands.add_parser(
        "layout",
        help="show which decoder layers route, overall and per pipeline stage",
        description=(
            "Read a Hugging Face config.json and print its routed layers (global, 0-based), "
            "its dense layers, and, with --pp, the layers megatron-core places on each "
            "(pipeline rank, virtual stage). Use it to check that an engine's all-layer "
            "routes line up with the trainer's routers before a run."
        ),
    )
    layout.add_argument("config", type=Path, help="a model's config.json")
    layout.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    layout.add_argument("--vp", type=int, default=1, help="virtual stages per pipeline rank")
    layout.add_argument(
        "--first-stage-layers",
        type=int,
        default=None,
        help="layers of pipeline rank 0 (num_layers_in_first_pipeline_stage); default even",
    )
    layout.add_argument(
        "--last-stage-layers",
        type=int,
        default=None,
        help="layers of the last pipeline rank (num_layers_in_last_pipeline_stage)",
    )
    layout.add_argument(
        "--account-for-embedding",
        action="store_true",
        help="count the embedding as a layer of the first stage "
        "(account_for_embedding_in_pipeline_split)",
    )
    layout.add_argument(
        "--account-for-loss",
        action="store_true",
        help="count the loss as a layer of the last stage (account_for_loss_in_pipeline_split)",
    )
    layout.add_argument("--json", action="store_true", help="print JSON for machines")
    layout.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from routereplay.errors import RouteReplayError
    from routereplay.layout import MoELayout
    from routereplay.pipeline_split import PipelineSplit

    try:
        config = json.loads(args.config.read_text())
        layout = MoELayout.from_hf_config(config)
        split = PipelineSplit(
            pp_size=args.pp,
            vp_size=args.vp,
            first_stage_layers=args.first_stage_layers,
            last_stage_layers=args.last_stage_layers,
            account_for_embedding=args.account_for_embedding,
            account_for_loss=args.account_for_loss,
        )
        stages = [
            {
                "pp_rank": rank,
                "vp_stage": stage,
                "layers": list(layers),
                "moe_layers": [i for i in layers if layout.is_moe(i)],
            }
            for stage in range(split.vp_size)
            for rank in range(split.pp_size)
            for layers in [layout.stage_layers(split, rank, stage)]
        ]
    except (OSError, json.JSONDecodeError, RouteReplayError) as error:
        return bad_input("layout", error)
    report = {
        "family": layout.family,
        **layout.fingerprint,
        "pipeline": dataclasses.asdict(split),
        "stages": stages,
    }
    if args.json:
        print(json.dumps(report))
        return EXIT_OK
    print(
        f"{layout.family}: {layout.num_layers} decoder layers, {layout.num_experts} experts, "
        f"top_k={layout.top_k}"
    )
    print(f"  routed: {list(layout.moe_layers)}")
    print(f"  dense:  {list(layout.dense_layers)}")
    if layout.mtp_layers:
        print(f"  MTP:    {list(layout.mtp_layers)}")
    if split.pp_size > 1:
        for stage in stages:
            print(
                f"  pp_rank {stage['pp_rank']} vp_stage {stage['vp_stage']}: "
                f"layers {stage['layers']}, routed {stage['moe_layers']}"
            )
    return EXIT_OK
