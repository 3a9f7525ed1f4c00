"""`routereplay import`: saved engine responses in, a checked trace file out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import vllm_fixtures
from engine_payloads import all_layers, openai_choice, routed_ids, sglang_meta_info

from routereplay import MoELayout
from routereplay.cli import EXIT_BAD_INPUT, EXIT_OK, main
from routereplay.store import TraceFile

# A DeepSeek-V3-style config: layers 0 and 1 dense, 16 experts, top-4.
CONFIG = {
    "model_type": "deepseek_v3",
    "num_hidden_layers": 6,
    "first_k_dense_replace": 2,
    "n_routed_experts": 16,
    "num_experts_per_tok": 4,
}
LAYOUT = MoELayout.from_hf_config(CONFIG)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(CONFIG))
    return path


def vllm_response(prompt_len: int, completions: list[int], seed: int) -> tuple[dict, list]:
    """A vLLM /v1/completions response with token ids and one choice per completion."""
    prompt = list(range(1, prompt_len + 1))
    choices, expected = [], []
    for index, n in enumerate(completions):
        routed = routed_ids(LAYOUT, prompt_len + n - 1, seed=seed + index)
        tokens = list(range(100, 100 + n))
        choices.append(
            openai_choice(
                all_layers(LAYOUT, routed), index=index, token_ids=tokens, prompt_token_ids=prompt
            )
        )
        expected.append((prompt + tokens, routed))
    return {"id": f"cmpl-{seed}", "object": "text_completion", "choices": choices}, expected


def sglang_response(prompt_len: int, n: int, seed: int) -> tuple[dict, tuple]:
    routed = routed_ids(LAYOUT, prompt_len + n - 1, seed=seed)
    prompt, output = list(range(1, prompt_len + 1)), list(range(200, 200 + n))
    meta = sglang_meta_info(all_layers(LAYOUT, routed, dtype=np.int32), id=f"req-{seed}")
    return {"input_ids": prompt, "output_ids": output, "meta_info": meta}, (prompt + output, routed)


def write_lines(path: Path, objects: list[Any]) -> Path:
    path.write_text("\n".join(json.dumps(o) for o in objects) + "\n")
    return path


def assert_file_holds(path: Path, expected: list[tuple[list[int], np.ndarray]]) -> None:
    with TraceFile(path) as traces:
        assert len(traces) == len(expected)
        for index, (tokens, routed) in enumerate(expected):
            trace = traces.trace(index)
            assert traces.tokens(index).tolist() == tokens
            assert trace.layers == (2, 3, 4, 5)  # never shifted by the dense prefix
            assert np.array_equal(trace.expert_ids()[:-1].numpy(), routed)
            assert (trace.expert_ids()[-1] == -1).all()  # the final sampled token


def test_vllm_responses_become_one_sequence_per_choice(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, expected_first = vllm_response(5, [3, 4], seed=0)
    second, expected_second = vllm_response(7, [2], seed=10)
    payloads = write_lines(tmp_path / "vllm.jsonl", [first, second])
    out = tmp_path / "traces.rr"
    args = ["import", "vllm", str(payloads), "--config", str(config), "-o", str(out), "--json"]
    assert main(args) == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert (report["sequences"], report["tokens"]) == (3, 8 + 9 + 9)
    assert_file_holds(out, expected_first + expected_second)


def test_sglang_responses_and_batches_import(tmp_path: Path, config: Path) -> None:
    single, expected_single = sglang_response(4, 3, seed=1)
    batch = [sglang_response(6, 2, seed=2), sglang_response(3, 5, seed=3)]
    payloads = write_lines(tmp_path / "sglang.jsonl", [single, [item for item, _ in batch]])
    out = tmp_path / "traces.rr"
    args = ["import", "sglang", str(payloads), "--config", str(config), "-o", str(out)]
    assert main([*args, "--encoding", "packed"]) == EXIT_OK
    assert_file_holds(out, [expected_single] + [expected for _, expected in batch])


def test_a_bad_line_names_itself_exits_2_and_leaves_no_file(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good, _ = sglang_response(4, 3, seed=1)
    short, _ = sglang_response(4, 3, seed=2)
    short["output_ids"] = short["output_ids"][:-1]  # one token fewer than the routes cover
    payloads = write_lines(tmp_path / "sglang.jsonl", [good, short])
    out = tmp_path / "traces.rr"
    args = ["import", "sglang", str(payloads), "--config", str(config), "-o", str(out)]
    assert main(args) == EXIT_BAD_INPUT
    assert "routereplay import: sglang line 2 (req-2): found 6 rows, 1 row more than expected" in (
        capsys.readouterr().err
    )
    assert not out.exists()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "line 1 is not JSON"),
        (json.dumps({"choices": []}), "line 1 is not a vLLM server response"),
        (
            json.dumps(
                {
                    "object": "text_completion",
                    "choices": [{"index": 0, "finish_reason": "length", "token_ids": [3]}],
                }
            ),
            "line 1, choice 0: choice prompt_token_ids is missing: send return_token_ids: true",
        ),
        (
            json.dumps(
                {
                    "object": "text_completion",
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "length",
                            "prompt_token_ids": [1, 2],
                            "token_ids": [3],
                            "routed_experts": None,
                        }
                    ],
                }
            ),
            "vllm line 1, choice 0: the choice has no routed_experts: start the server with "
            "routed-experts capture enabled (`vllm serve ... --enable-return-routed-experts`)",
        ),
    ],
)
def test_malformed_vllm_lines_are_refused(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str], line: str, message: str
) -> None:
    payloads = tmp_path / "bad.jsonl"
    payloads.write_text(line + "\n")
    args = ["import", "vllm", str(payloads), "--config", str(config), "-o", str(tmp_path / "o")]
    assert main(args) == EXIT_BAD_INPUT
    assert message in capsys.readouterr().err


def test_a_config_of_another_model_is_caught_by_the_dense_layer_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    response, _ = vllm_response(5, [3], seed=0)
    payloads = write_lines(tmp_path / "vllm.jsonl", [response])
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**CONFIG, "first_k_dense_replace": 3}))  # layer 2 dense
    args = ["import", "vllm", str(payloads), "--config", str(other), "-o", str(tmp_path / "o")]
    assert main(args) == EXIT_BAD_INPUT
    assert "layer 2, holds expert ids" in capsys.readouterr().err


# -- the real vLLM 0.32.0 payloads, whole files ------------------------------------------


@pytest.mark.parametrize("model", vllm_fixtures.MODELS)
def test_every_real_vllm_response_imports_with_its_token_ids(
    tmp_path: Path, model: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = vllm_fixtures.FIXTURES / "models" / model / "config.json"
    out = tmp_path / "rollouts.rr"
    payloads = vllm_fixtures.server_path(model)
    assert main(["import", "vllm", str(payloads), "--config", str(config), "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json", "--sequences"]) == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    expected = [
        c for line in vllm_fixtures.server_lines(model) for c in vllm_fixtures.choices(line)
    ]
    assert report["sequences"] == len(expected) == 18
    assert report["has_tokens"] and report["has_prompt_lens"] and report["has_sequence_ids"]
    listed = report["sequence_list"]
    assert [s["token_ids"] for s in listed] == [c.prompt + c.completion for c in expected]
    assert [s["prompt_len"] for s in listed] == [len(c.prompt) for c in expected]
    assert len({s["id"] for s in listed}) == len(listed)
    with TraceFile(out) as traces:
        rollout = traces.rollout(0)
        assert rollout.prompt_ids.tolist() == expected[0].prompt
        assert traces.index_of(listed[5]["id"]) == 5


def test_an_existing_output_is_kept_unless_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = "qwen3moe_mid_dense"
    config = vllm_fixtures.FIXTURES / "models" / model / "config.json"
    out = tmp_path / "rollouts.rr"
    out.write_bytes(b"precious")
    args = ["import", "vllm", str(vllm_fixtures.server_path(model)), "--config", str(config)]
    assert main([*args, "-o", str(out)]) == EXIT_BAD_INPUT
    assert "rollouts.rr exists; pass --force to overwrite it" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"
    assert main([*args, "-o", str(out), "--force"]) == EXIT_OK
    with TraceFile(out) as traces:
        assert len(traces) == 18


def test_a_bad_real_line_names_the_line_and_its_case(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = "dsv3_300e"
    lines = vllm_fixtures.server_lines(model)
    generate = next(x for x in lines if x["case"] == "tito_generate")
    without_request = {**generate, "request": None}  # its prompt was in the request
    payloads = write_lines(tmp_path / "bad.jsonl", [lines[0], without_request])
    config = vllm_fixtures.FIXTURES / "models" / model / "config.json"
    out = tmp_path / "o.rr"
    args = ["import", "vllm", str(payloads), "--config", str(config), "-o", str(out)]
    assert main(args) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("routereplay import: line 2 (case 'tito_generate'): this ")
    assert "pass the request too" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_a_payload_file_that_is_not_text_exits_2(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    payloads = tmp_path / "binary.jsonl"
    payloads.write_bytes(b"\xff\xfe\x00{")
    args = ["import", "vllm", str(payloads), "--config", str(config), "-o", str(tmp_path / "o")]
    assert main(args) == EXIT_BAD_INPUT
    assert "binary.jsonl is not UTF-8 text" in capsys.readouterr().err


def test_a_sequence_given_twice_names_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = "qwen3moe_mid_dense"
    first = vllm_fixtures.server_lines(model)[0]
    payloads = write_lines(tmp_path / "twice.jsonl", [first, first])
    config = vllm_fixtures.FIXTURES / "models" / model / "config.json"
    args = ["import", "vllm", str(payloads), "--config", str(config), "-o", str(tmp_path / "o")]
    assert main(args) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("routereplay import: line 2: Sequence 1 appended to ")
    assert "was given to sequence 0 already" in err
