"""`engines.serving`: the stand-in vLLM server speaks vLLM 0.32's /v1/completions wire
format (checked against the real responses in tests/data) and refuses what it cannot
do with a 400 naming the field."""

from __future__ import annotations

import base64
import io
import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from vllm_fixtures import config, layout, server_lines

from routereplay import Rollout, RoutingTrace
from routereplay.engines import vllm
from routereplay.engines.hf import RecordingEngine
from routereplay.engines.serving import BadRequest, CompletionsServer
from routereplay.engines.vllm.encode import completion_choice, routed_experts_field
from routereplay.errors import TraceError

MODEL = "qwen3moe_mid_dense"  # a dense layer in the middle: zeros on the wire


@pytest.fixture(scope="module")
def server() -> Iterator[CompletionsServer]:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config(MODEL)))
    with CompletionsServer(RecordingEngine(model), model_name="tiny") as served:
        yield served


def post(server: CompletionsServer, body: dict[str, Any], path: str = "/v1/completions") -> Any:
    request = urllib.request.Request(
        server.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def refused(server: CompletionsServer, body: dict[str, Any]) -> str:
    with pytest.raises(urllib.error.HTTPError) as caught:
        post(server, body)
    assert caught.value.code == 400
    return str(json.loads(caught.value.read())["error"]["message"])


def saved(case: str) -> dict[str, Any]:
    return next(line for line in server_lines(MODEL) if line["case"] == case)


def test_a_batched_n2_request_is_answered_as_vllm_answers_it(server: CompletionsServer) -> None:
    real = saved("completions_batch_n2")
    ours = post(server, real["request"])
    assert set(ours) == set(real["response"])
    assert [set(choice) for choice in ours["choices"]] == [
        set(choice) for choice in real["response"]["choices"]
    ]
    assert ours["usage"]["prompt_tokens"] == real["response"]["usage"]["prompt_tokens"]
    prompts = real["request"]["prompt"]
    for index, choice in enumerate(ours["choices"]):
        assert choice["index"] == index
        assert choice["prompt_token_ids"] == prompts[index // 2]  # index = prompt * n + sample
        rows = np.load(io.BytesIO(base64.b64decode(choice["routed_experts"])))
        tokens = len(choice["prompt_token_ids"]) + len(choice["token_ids"])
        assert rows.dtype == np.uint8 and rows.shape == (tokens - 1, 5, 4)
        assert not rows[:, [0, 3]].any()  # dense layers are zeros, as vLLM sends them
    rollouts = vllm.from_response(ours, layout(MODEL), request=real["request"])
    assert [r.completion_len for r in rollouts] == [10] * 6


def test_trls_request_gets_token_id_log_probs(server: CompletionsServer) -> None:
    body = {
        "model": "tiny",
        "prompt": [[5, 6, 7]],
        "n": 2,
        "return_token_ids": True,
        "return_tokens_as_token_ids": True,
        "repetition_penalty": 1.0,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "min_p": 0.0,
        "max_tokens": 4,
        "logprobs": 0,
    }
    choice = post(server, body)["choices"][1]
    assert choice["logprobs"]["tokens"] == [f"token_id:{t}" for t in choice["token_ids"]]
    assert len(choice["logprobs"]["token_logprobs"]) == len(choice["token_ids"])


def test_a_prompt_start_drops_the_first_rows(server: CompletionsServer) -> None:
    start = saved("completions_prompt_start")
    (rollout,) = vllm.from_response(
        post(server, start["request"]), layout(MODEL), request=start["request"]
    )
    assert not rollout.routes.routed_mask()[:15].any() and rollout.routes.routed_mask()[15:-1].all()


def test_stop_tokens_end_a_choice_and_are_named(server: CompletionsServer) -> None:
    request = {**saved("completions_stop_token")["request"], "return_token_ids": True}
    request["stop_token_ids"] = list(range(256))  # the first sampled token stops it
    (choice,) = post(server, request)["choices"]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == choice["token_ids"][-1]
    assert len(choice["token_ids"]) == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"top_k": 5}, r"top_k=5: the stand-in samples without it"),
        ({"logprobs": 3}, r"logprobs=3: the stand-in returns only the sampled token's log-prob"),
        ({"stream": True}, r"stream: vLLM sends no routes on a completions stream"),
        ({"best_of": 2}, r"does not implement \['best_of'\]"),
        ({"prompt": "t5 t6"}, r"prompt is text, but the server has no tokenizer"),
        ({"prompt": [[5, 6], []]}, r"prompt 1 must be a non-empty list of token ids"),
        ({"prompt": [5, 999]}, r"prompt 0 holds token ids outside \[0, 256\)"),
        ({"n": 0}, r"n must be an integer >= 1, found 0"),
        ({"max_tokens": "8"}, r"max_tokens must be an integer >= 1, found '8'"),
        ({"routed_experts_prompt_start": 4}, r"must be in \[0, 3\] for a 3-token prompt, found 4"),
    ],
)
def test_what_the_stand_in_cannot_do_is_a_400_naming_it(
    server: CompletionsServer, change: dict[str, Any], message: str
) -> None:
    body = {"prompt": [5, 6, 7], "max_tokens": 2, **change}
    assert re.search(message, refused(server, body))


def test_unknown_paths_are_404s(server: CompletionsServer) -> None:
    with pytest.raises(urllib.error.HTTPError) as caught:
        post(server, {}, path="/v1/chat/completions")
    assert caught.value.code == 404


def test_weights_for_a_parameter_the_model_lacks_are_refused(server: CompletionsServer) -> None:
    with pytest.raises(BadRequest, match=r"The served model has no parameter 'lm_head.bias'"):
        server.update_weights([("lm_head.bias", torch.zeros(256))])


def test_the_encoder_sends_only_complete_rollouts() -> None:
    moe = layout(MODEL)
    bare = Rollout(torch.tensor([5, 6]), torch.tensor([7]), None, sequence_id="s")
    with pytest.raises(TraceError, match=r"Rollout 's' has no routes to send"):
        routed_experts_field(bare, moe)
    experts = torch.full((3, 3, 4), -1)
    holed = Rollout(
        torch.tensor([5, 6]), torch.tensor([7]), RoutingTrace(experts, moe.moe_layers, 16)
    )
    with pytest.raises(TraceError, match=r"lacks routes for forwarded tokens"):
        routed_experts_field(holed, moe)
    experts[:-1] = torch.arange(4)
    whole = Rollout(
        torch.tensor([5, 6]), torch.tensor([7]), RoutingTrace(experts, moe.moe_layers, 16)
    )
    with pytest.raises(TraceError, match=r"has no log-probs to send"):
        completion_choice(whole, moe, index=0, logprobs=True)


def test_routereplay_serve_answers_until_stopped(tmp_path: Any) -> None:
    import shutil
    import signal
    import subprocess
    import sys

    from vllm_fixtures import FIXTURES

    model = tmp_path / MODEL  # the saved model, without its tokenizer: token ids only
    model.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(FIXTURES / "models" / MODEL / name, model / name)
    command = [sys.executable, "-m", "routereplay", "serve", str(model), "--port", "0", "--json"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        started = json.loads(process.stdout.readline())
        assert started["weights"] == "saved" and started["model"] == MODEL
        with urllib.request.urlopen(started["url"] + "/health", timeout=30) as health:
            assert health.status == 200
        body = {"prompt": [5, 6, 7], "max_tokens": 3, "return_token_ids": True}
        request = urllib.request.Request(
            started["url"] + "/v1/completions", json.dumps(body).encode()
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            (rollout,) = vllm.from_response(json.loads(response.read()), layout(MODEL))
        assert rollout.prompt_ids.tolist() == [5, 6, 7] and rollout.routes is not None
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0


def test_routereplay_serve_needs_a_model_directory(tmp_path: Any) -> None:
    from routereplay.cli import main

    assert main(["serve", str(tmp_path)]) == 2
