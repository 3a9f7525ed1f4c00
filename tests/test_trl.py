"""Router replay in TRL's real GRPOTrainer: R2 and R3 reach mlp.experts in every loss
pass (two iterations, two steps per generation, gradient checkpointing, padding on
both sides), R3 through TRL's own vLLM client against a stand-in vLLM server."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("trl")

from trl_harness import (
    ObservedTrainer,
    Pass,
    config,
    experts_by_sequence,
    length_reward,
    policy,
    prompts,
    tokenizer,
)

from routereplay.engines.hf import RecordingEngine
from routereplay.engines.serving import CompletionsServer

Experts = dict[tuple[int, ...], dict[int, torch.Tensor]]


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    # Tiny matrices: one thread is several times faster than two contending ones.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train(tmp_path: Path, mode: str, model: Any = None, **overrides: Any) -> ObservedTrainer:
    trainer = ObservedTrainer(
        model=policy() if model is None else model,
        reward_funcs=length_reward,
        args=config(tmp_path, **overrides),
        train_dataset=prompts(),
        processing_class=tokenizer(),
        router_replay=mode,
    )
    trainer.train()
    return trainer


def assert_ran(
    reference: Experts, batch: Pass, calls: dict[int, list[torch.Tensor]], rows: int
) -> int:
    """Every real token's experts in `calls` are the reference's, on its first `rows`
    tokens (all: `rows` = 0; R3's final token has no route); returns how many compared."""
    compared = 0
    for tokens, layers in experts_by_sequence(batch, calls).items():
        for layer, ids in layers.items():
            expected = reference[tokens][layer]
            assert torch.equal(ids[: len(expected)], expected), (tokens, layer)
            compared += len(expected)
    return compared


def assert_padded_both_sides(batch: Pass) -> None:
    mask = batch.attention_mask.bool()
    assert (~mask[:, 0]).any(), "no row has a left-padded prompt"
    assert (~mask[:, -1]).any(), "no row has a right-padded completion"


def loss_passes(trainer: ObservedTrainer) -> list[Pass]:
    passes = [p for p in trainer.passes if p.grad]
    assert len(passes) == 4  # 2 iterations x 2 steps per generation, one generation
    return passes


def metric(trainer: ObservedTrainer, name: str) -> list[float]:
    return [log[name] for log in trainer.logged if name in log]


def test_r2_every_loss_pass_runs_the_old_logps_experts(tmp_path: Path) -> None:
    trainer = train(tmp_path, "R2")
    (old,) = [p for p in trainer.passes if not p.grad]
    assert_padded_both_sides(old)
    reference = experts_by_sequence(old, old.experts)
    for batch in loss_passes(trainer):
        assert assert_ran(reference, batch, batch.experts, 0) > 0
        assert assert_ran(reference, batch, batch.recomputed, 0) > 0  # checkpointing
    # The live routers moved off the recorded routes: replay was needed.
    assert max(metric(trainer, "router_replay/loss/disagreement")) > 0


def test_r3_without_vllm_replays_what_the_sampling_forwards_chose(tmp_path: Path) -> None:
    trainer = train(tmp_path, "R3")
    (generation,) = trainer.generations
    reference = generation.by_sequence()  # observed while model.generate() sampled
    (old,) = [p for p in trainer.passes if not p.grad]
    assert_padded_both_sides(old)
    assert assert_ran(reference, old, old.experts, 0) > 0
    for batch in loss_passes(trainer):
        assert assert_ran(reference, batch, batch.experts, 0) > 0
        assert assert_ran(reference, batch, batch.recomputed, 0) > 0
    assert max(metric(trainer, "router_replay/loss/disagreement")) > 0
    # Each sequence's final token was never forwarded while sampling: routed natively.
    assert min(metric(trainer, "router_replay/loss/native_rows")) > 0


class LoggedServer(CompletionsServer):
    """The stand-in, keeping every completions exchange as sent on the wire."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[dict[str, Any]] = []

    def completions(self, request: Mapping[str, Any]) -> dict[str, Any]:
        body = super().completions(request)
        self.sent.append(json.loads(json.dumps(body)))
        return body


@pytest.fixture
def vllm_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[LoggedServer]:
    """A stand-in `vllm serve` on 127.0.0.1 over a bf16 copy of the policy, and TRL's
    own server-mode code, but for the two steps that need vLLM's CUDA build."""
    from trl.generation import vllm_client, vllm_generation

    # TRL refuses server mode unless the vllm package imports, though it only speaks
    # HTTP to the server; vLLM's CPU build cannot capture routes (see FACTS).
    monkeypatch.setattr(vllm_generation, "is_vllm_available", lambda *a, **k: True)
    monkeypatch.setattr(vllm_client, "is_vllm_available", lambda *a, **k: True)
    with LoggedServer(RecordingEngine(policy())) as server:
        # Weight sync goes through vLLM's NCCL weight-transfer engine (CUDA only): the
        # trainer hands the stand-in its weights in-process instead.
        monkeypatch.setattr(vllm_client.VLLMClient, "init_communicator", lambda self, device: None)
        monkeypatch.setattr(
            vllm_client.VLLMClient,
            "update_named_params",
            lambda self, metadata, named_params: server.update_weights(named_params),
        )
        yield server


def wire_experts(sent: list[dict[str, Any]], layers: Sequence[int]) -> Experts:
    """Sequence tokens -> layer -> ids, read straight off the responses' base64 .npy."""
    found: Experts = {}
    for body in sent:
        for choice in body["choices"]:
            rows = np.load(io.BytesIO(base64.b64decode(choice["routed_experts"])))
            tokens = (*choice["prompt_token_ids"], *choice["token_ids"])
            assert rows.shape[0] == len(tokens) - 1  # the final token has no row
            found[tokens] = {i: torch.from_numpy(rows[:, i].astype(np.int64)) for i in layers}
    return found


def test_r3_through_trls_vllm_client_replays_the_servers_routes(
    tmp_path: Path, vllm_server: LoggedServer
) -> None:
    trainer = train(
        tmp_path,
        "R3",
        max_steps=8,  # two generation batches, the weights synced in between
        use_vllm=True,
        vllm_mode="server",
        vllm_server_base_url=vllm_server.url,
    )
    assert len(vllm_server.sent) == 2
    reference = wire_experts(vllm_server.sent, layers=(1, 2, 3))
    old_passes = [p for p in trainer.passes if not p.grad]
    assert len(old_passes) == 2
    for old in old_passes:
        assert_padded_both_sides(old)
        assert assert_ran(reference, old, old.experts, 0) > 0
    loss = [p for p in trainer.passes if p.grad]
    assert len(loss) == 8
    for batch in loss:
        assert assert_ran(reference, batch, batch.experts, 0) > 0
        assert assert_ran(reference, batch, batch.recomputed, 0) > 0
    assert metric(trainer, "router_replay/old_logps/disagreement")  # the engine gap, logged
    assert max(metric(trainer, "router_replay/loss/disagreement")) > 0
