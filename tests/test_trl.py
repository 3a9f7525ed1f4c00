"""Router replay in TRL's real GRPOTrainer: R2 and R3 reach mlp.experts in every loss
pass (two iterations, two steps per generation, gradient checkpointing, padding on
both sides), R3 through TRL's own vLLM client against a stand-in vLLM server."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("trl")

from trl import GRPOConfig
from trl.trainer.grpo_trainer import GRPOTrainer as TRLGRPOTrainer
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

import routereplay
from routereplay import MoELayout, Rollout, RoutingTrace
from routereplay.engines.hf import RecordingEngine
from routereplay.engines.serving import CompletionsServer
from routereplay.errors import ReplayError, SetupError, TraceError
from routereplay.integrations.trl import RoutedVLLMClient
from routereplay.integrations.trl.batch import from_batch_fields, lay_out_rollouts, to_batch_fields
from routereplay.integrations.trl.forwards import row_chunks
from routereplay.integrations.trl.generation import generated_rollouts

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
def serve(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., LoggedServer]]:
    """Starts a stand-in `vllm serve` on 127.0.0.1 over a bf16 copy of the policy, for
    TRL's own server-mode code but the two steps that need vLLM's CUDA build."""
    from trl.generation import vllm_client, vllm_generation

    # TRL refuses server mode unless the vllm package imports, though it only speaks
    # HTTP to the server; vLLM's CPU build cannot capture routes (see FACTS).
    monkeypatch.setattr(vllm_generation, "is_vllm_available", lambda *a, **k: True)
    monkeypatch.setattr(vllm_client, "is_vllm_available", lambda *a, **k: True)
    servers: list[LoggedServer] = []

    def start(kind: type[LoggedServer] = LoggedServer) -> LoggedServer:
        server = kind(RecordingEngine(policy())).start()
        servers.append(server)
        # Weight sync goes through vLLM's NCCL weight-transfer engine (CUDA only): the
        # trainer hands the stand-in its weights in-process instead.
        monkeypatch.setattr(vllm_client.VLLMClient, "init_communicator", lambda self, device: None)
        monkeypatch.setattr(
            vllm_client.VLLMClient,
            "update_named_params",
            lambda self, metadata, named_params: server.update_weights(named_params),
        )
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def vllm_server(serve: Callable[..., LoggedServer]) -> LoggedServer:
    return serve()


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


# -- what the adapter refuses -----------------------------------------------------------


def trainer_of(tmp_path: Path, mode: Any, **kwargs: Any) -> ObservedTrainer:
    settings = {key: kwargs.pop(key) for key in list(kwargs) if hasattr(GRPOConfig, key)}
    return ObservedTrainer(
        model=policy(),
        reward_funcs=length_reward,
        args=config(tmp_path, **settings),
        train_dataset=prompts(),
        processing_class=tokenizer(),
        router_replay=mode,
        **kwargs,
    )


def test_an_unknown_mode_names_the_choices(tmp_path: Path) -> None:
    with pytest.raises(
        SetupError, match=r"router_replay must be one of 'off', 'R2', 'R3'; found 'r3'"
    ):
        trainer_of(tmp_path, "r3")


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ({"use_vllm": True, "vllm_mode": "colocate"}, r"vllm_mode='colocate'.*vllm_mode='server'"),
        (
            {"rollout_func": lambda prompts, trainer: {}},
            r"a rollout_func: its rollouts return no routes",
        ),
        ({"use_transformers_continuous_batching": True}, r"use_transformers_continuous_batching"),
        ({"tools": [lambda x: x]}, r"tools: tool output is spliced"),
    ],
)
def test_r3_refuses_generation_paths_without_routes_before_building_anything(
    tmp_path: Path, setup: dict[str, Any], message: str
) -> None:
    with pytest.raises(
        SetupError, match=r"router_replay='R3' needs the rollout's routes.*" + message
    ):
        trainer_of(tmp_path, "R3", **setup)


def test_r2_where_trl_skips_the_old_logps_pass_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # TRL's defaults without vLLM: one generation per optimizer step, no old-log-prob pass.
    trainer_of(tmp_path, "R2", gradient_accumulation_steps=4, steps_per_generation=2)
    assert "routing cannot go stale and stays native" in caplog.text


@pytest.mark.parametrize(
    ("method", "mode", "message"),
    [
        # An old-log-prob pass that goes around the adapter records nothing for R2.
        (
            "_get_per_token_logps_and_entropies",
            "R2",
            r"TRL computed old log-probs without calling",
        ),
        # A sampling path that goes around it keeps no rollout routes for R3.
        ("_generate_single_turn", "R3", r"found no rollout routes for this batch"),
    ],
)
def test_a_trl_pass_that_bypasses_the_adapter_is_an_error(
    tmp_path: Path, method: str, mode: str, message: str
) -> None:
    def trl_own(self: Any, *args: Any, **kwargs: Any) -> Any:
        return getattr(TRLGRPOTrainer, method)(self, *args, **kwargs)

    bypassing = type("Bypassing", (ObservedTrainer,), {method: trl_own})
    trainer = bypassing(
        model=policy(),
        reward_funcs=length_reward,
        args=config(tmp_path, max_steps=1),
        train_dataset=prompts(),
        processing_class=tokenizer(),
        router_replay=mode,
    )
    with pytest.raises(SetupError, match=message):
        trainer.train()


class ReorderingServer(LoggedServer):
    """Answers with the choices of a batch in another order than vLLM's."""

    def completions(self, request: Mapping[str, Any]) -> dict[str, Any]:
        body = super().completions(request)
        body["choices"] = body["choices"][::-1]
        return body


def test_vllm_choices_out_of_trls_order_are_refused(
    tmp_path: Path, serve: Callable[..., LoggedServer]
) -> None:
    server = serve(ReorderingServer)
    trainer = trainer_of(
        tmp_path, "R3", use_vllm=True, vllm_mode="server", vllm_server_base_url=server.url
    )
    with pytest.raises(TraceError, match=r"vLLM's choice .* holds other token ids than TRL kept"):
        trainer.train()


class TruncatingServer(LoggedServer):
    """Answers with one choice too few."""

    def completions(self, request: Mapping[str, Any]) -> dict[str, Any]:
        body = super().completions(request)
        body["choices"] = body["choices"][:-1]
        return body


def test_too_few_vllm_choices_are_refused(
    tmp_path: Path, serve: Callable[..., LoggedServer]
) -> None:
    server = serve(TruncatingServer)
    trainer = trainer_of(
        tmp_path, "R3", use_vllm=True, vllm_mode="server", vllm_server_base_url=server.url
    )
    with pytest.raises(
        TraceError, match=r"vLLM returned 7 choices; this process needs rows 0\.\.7"
    ):
        trainer.train()


def test_a_server_without_route_capture_is_named(tmp_path: Path, vllm_server: LoggedServer) -> None:
    vllm_server.return_routed_experts = False
    trainer = trainer_of(
        tmp_path, "R3", use_vllm=True, vllm_mode="server", vllm_server_base_url=vllm_server.url
    )
    with pytest.raises(TraceError, match=r"--enable-return-routed-experts"):
        trainer.train()


def test_the_client_without_a_completions_exchange_says_which_path_it_reads(
    vllm_server: LoggedServer,
) -> None:
    from trl.generation.vllm_client import VLLMClient

    client = RoutedVLLMClient.adopt(VLLMClient(base_url=vllm_server.url))
    with pytest.raises(SetupError, match=r"No /v1/completions response was kept"):
        client.take_rollouts(vllm_server.layout)


# -- the pieces, alone --------------------------------------------------------------


def rollout(
    prompt: list[int], completion: list[int], layers: tuple[int, ...] = (1, 2, 3)
) -> Rollout:
    rows = len(prompt) + len(completion)
    experts = torch.tensor([[0, 1]]).expand(rows, len(layers), 2).clone()
    experts[-1] = -1
    return Rollout(torch.tensor(prompt), torch.tensor(completion), RoutingTrace(experts, layers, 8))


def test_rollouts_are_laid_out_left_padded_prompt_right_padded_completion() -> None:
    rollouts = [rollout([5, 6], [7, 8, 9]), rollout([5, 6, 7], [8])]
    input_ids = torch.tensor([[0, 5, 6, 7, 8, 9], [5, 6, 7, 8, 0, 0]])
    mask = input_ids != 0
    routes = lay_out_rollouts(rollouts, input_ids, mask, completion_width=3)
    assert routes.tokens is not None
    assert routes.tokens.tolist() == [[-1, 5, 6, 7, 8, 9], [5, 6, 7, 8, -1, -1]]
    assert routes.routed_mask()[..., 0].tolist() == [
        [False, True, True, True, True, False],  # the final sampled token: no route
        [True, True, True, False, False, False],
    ]


def test_rollouts_that_do_not_fit_trls_batch_are_refused() -> None:
    input_ids = torch.tensor([[5, 6, 7, 8]])
    mask = torch.ones_like(input_ids, dtype=torch.bool)
    with pytest.raises(
        TraceError,
        match=r"Sequence 0: the rollout has 3 prompt and 1 completion tokens; TRL's batch has room for 2 and 2",
    ):
        lay_out_rollouts([rollout([5, 6, 7], [8])], input_ids, mask, completion_width=2)
    with pytest.raises(TraceError, match=r"The batch has 1 sequences but 2 rollouts came with it"):
        lay_out_rollouts([rollout([5, 6], [7])] * 2, input_ids, mask, completion_width=2)
    bare = Rollout(torch.tensor([5, 6]), torch.tensor([7, 8]), None, sequence_id="s")
    with pytest.raises(TraceError, match=r"Rollout 0 \(s\) has no routes"):
        lay_out_rollouts([bare], input_ids, mask, completion_width=2)


def test_routes_in_trls_batch_must_be_tensors_that_know_their_tokens() -> None:
    layout = MoELayout.from_dense_pattern([0, 1, 1, 1], num_experts=8, top_k=2)
    with pytest.raises(
        TraceError,
        match=r"routed_experts and routed_tokens must be tensors; found list and NoneType",
    ):
        from_batch_fields({"routed_experts": [[0, 1]]}, layout, "trl")
    without_tokens = rollout([5], [6]).routes
    assert without_tokens is not None
    with pytest.raises(TraceError, match=r"must know their token ids"):
        to_batch_fields(RoutingTrace(without_tokens.experts, (1, 2, 3), 8))


def test_a_log_prob_forward_out_of_row_order_is_an_error() -> None:
    model = policy()
    controller = routereplay.attach(model)
    input_ids = torch.randint(3, 90, (4, 5))
    with (
        row_chunks(model, controller, input_ids),
        pytest.raises(
            ReplayError, match=r"not rows 0\.\. of its batch \[4, 5\] \(found input ids \[2, 5\]\)"
        ),
    ):
        model(input_ids=input_ids[2:])


def test_generation_rollouts_need_the_prefill_and_its_sequences() -> None:
    prefill = RoutingTrace(
        torch.zeros((2, 3, 1, 2), dtype=torch.long) + torch.tensor([0, 1]), (1,), 8
    )
    with pytest.raises(TraceError, match=r"No prefill was recorded"):
        generated_rollouts({1: prefill}, [[5]], [[6]])
    with pytest.raises(TraceError, match=r"recorded 2 sequences; 1 prompts and 1 completions"):
        generated_rollouts({0: prefill}, [[5]], [[6]])
    with pytest.raises(
        TraceError,
        match=r"Sequence 0: 4 prompt and 1 completion tokens, but the generation recorded a 3-token prefill and 0 decode steps",
    ):
        generated_rollouts({0: prefill}, [[5, 6, 7, 8], [5]], [[9], [9]])


def test_the_example_script_trains_with_r3(tmp_path: Path) -> None:
    import importlib.util

    path = Path(__file__).parent.parent / "examples" / "trl_grpo_router_replay.py"
    spec = importlib.util.spec_from_file_location("trl_example", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    trainer = example.main(["--steps", "2", "--output-dir", str(tmp_path)])
    logged = trainer.state.log_history
    assert any("router_replay/loss/replayed_rows" in log for log in logged)
