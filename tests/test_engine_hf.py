"""The embedded recording engine: sampling, and routes that follow the engines' contract."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hf_models import FAMILIES, router_of, tiny_model

from routereplay import NO_ROUTE, ReplayError, RoutingTrace
from routereplay.engines.hf import RecordingEngine, Rollout, SamplingParams

PROMPT_LENGTHS = (12, 7, 20, 3)


def prompts(lengths: tuple[int, ...] = PROMPT_LENGTHS) -> list[list[int]]:
    return [
        torch.randint(3, 97, (n,), generator=torch.Generator().manual_seed(n)).tolist()
        for n in lengths
    ]


def teacher_forced(engine: RecordingEngine, rollout: Rollout) -> tuple[RoutingTrace, dict]:
    """Routes (and router logits) of one full forward over every forwarded token."""
    logits: dict[int, torch.Tensor] = {}
    hooks = [
        router.register_forward_hook(
            lambda m, i, out, index=index: logits.__setitem__(index, out[0].float())
        )
        for index, layer in enumerate(engine.model.model.layers)
        if (router := router_of(layer)) is not None
    ]
    with torch.no_grad(), engine.controller.record() as recording:
        engine.model(rollout.token_ids[:-1][None])
    for hook in hooks:
        hook.remove()
    return recording.trace, logits


def same_sets(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`[rows, layers]` True where two `[rows, layers, k]` id arrays pick the same experts."""
    return (a.sort(-1).values == b.sort(-1).values).all(-1)


# -- the trace contract --------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_routes_have_a_row_per_token_and_none_for_the_last_sampled_token(family: str) -> None:
    engine = RecordingEngine(tiny_model(family))
    rollouts = engine.generate(prompts(), SamplingParams(max_new_tokens=6, seed=1))
    for prompt, rollout in zip(prompts(), rollouts, strict=True):
        routes = rollout.routes
        assert routes is not None
        assert rollout.prompt_ids.tolist() == prompt
        assert routes.token_shape == (len(prompt) + len(rollout.completion_ids),)
        assert routes.layers == engine.controller.layout.moe_layers
        assert routes.routed_mask()[:-1].all()
        assert (routes.experts[-1] == NO_ROUTE).all()
        # Recorded with their token ids, the final one (never forwarded) too.
        assert routes.tokens is not None
        assert torch.equal(routes.tokens.long(), rollout.token_ids)


def test_fp32_routes_equal_a_teacher_forced_forward_exactly() -> None:
    engine = RecordingEngine(tiny_model("qwen3_moe", seed=3), dtype=torch.float32)
    for rollout in engine.generate(prompts(), SamplingParams(max_new_tokens=24, seed=1)):
        trace, _ = teacher_forced(engine, rollout)
        assert torch.equal(rollout.routes.experts[:-1], trace.experts[0])


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "qwen2_moe"])
def test_bf16_routes_differ_from_teacher_forcing_only_at_counted_near_ties(family: str) -> None:
    # KV-cached decode and one full forward accumulate bf16 differently; a row may flip
    # where two experts' logits tie to bf16 resolution. Count those rows, never hide them.
    engine = RecordingEngine(tiny_model(family, seed=3), dtype=torch.bfloat16)
    rows = differing = 0
    for rollout in engine.generate(prompts(), SamplingParams(max_new_tokens=24, seed=1)):
        trace, logits = teacher_forced(engine, rollout)
        agree = same_sets(rollout.routes.experts[:-1], trace.experts[0])
        rows += agree.numel()
        differing += int((~agree).sum())
        for slot, layer in enumerate(trace.layers):
            best = logits[layer].topk(trace.top_k + 1, dim=-1).values
            margin = best[:, -2] - best[:, -1]  # k-th minus (k+1)-th logit
            assert (margin[~agree[:, slot]] <= 2**-5).all(), f"layer {layer}: not a near-tie"
    assert differing <= 0.02 * rows, f"{differing} of {rows} rows differ"


# -- sampling -------------------------------------------------------------------------------


def test_greedy_completions_follow_the_argmax_and_batching_changes_nothing() -> None:
    engine = RecordingEngine(tiny_model("deepseek_v3"), dtype=torch.float32)
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    batched = engine.generate(prompts(), params)
    for prompt, rollout in zip(prompts(), batched, strict=True):
        alone = engine.generate([prompt], params)[0]
        assert torch.equal(alone.completion_ids, rollout.completion_ids)
        assert torch.equal(alone.routes.experts, rollout.routes.experts)
        with torch.no_grad():
            logits = engine.model(rollout.token_ids[None]).logits[0]
        expected = logits[len(prompt) - 1 : -1].argmax(-1)
        assert torch.equal(rollout.completion_ids, expected)


def test_logprobs_are_those_of_the_temperature_scaled_distribution() -> None:
    engine = RecordingEngine(tiny_model("mixtral"), dtype=torch.float32)
    params = SamplingParams(max_new_tokens=10, temperature=0.7, top_p=0.9, seed=4)
    for rollout in engine.generate(prompts(), params):
        with torch.no_grad():
            logits = engine.model(rollout.token_ids[None]).logits[0].float()
        start = len(rollout.prompt_ids) - 1
        logp = torch.log_softmax(logits[start:-1] / 0.7, dim=-1)
        expected = logp.gather(-1, rollout.completion_ids[:, None])[:, 0]
        torch.testing.assert_close(rollout.logprobs, expected, rtol=1e-4, atol=1e-4)


def test_the_same_seed_gives_the_same_rollouts() -> None:
    engine = RecordingEngine(tiny_model("olmoe"))
    params = SamplingParams(max_new_tokens=8, seed=9)
    first, second = engine.generate(prompts(), params), engine.generate(prompts(), params)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a.completion_ids, b.completion_ids)
        assert a.routes.equal(b.routes)


def test_a_tiny_top_p_is_greedy() -> None:
    engine = RecordingEngine(tiny_model("qwen3_moe"), dtype=torch.float32)
    nucleus = engine.generate(prompts(), SamplingParams(max_new_tokens=6, top_p=1e-6, seed=2))
    greedy = engine.generate(prompts(), SamplingParams(max_new_tokens=6, temperature=0.0))
    for a, b in zip(nucleus, greedy, strict=True):
        assert torch.equal(a.completion_ids, b.completion_ids)


def test_stop_tokens_end_each_sequence_on_its_own() -> None:
    engine = RecordingEngine(tiny_model("qwen2_moe"), dtype=torch.float32)
    free = engine.generate(prompts(), SamplingParams(max_new_tokens=10, temperature=0.0))
    stop = int(free[0].completion_ids[3])  # a token the first sequence samples at step 3
    rollouts = engine.generate(
        prompts(), SamplingParams(max_new_tokens=10, temperature=0.0, stop_token_ids=(stop,))
    )
    assert rollouts[0].finish_reason == "stop"
    assert rollouts[0].completion_ids.tolist() == free[0].completion_ids[:4].tolist()
    for rollout, unstopped in zip(rollouts, free, strict=True):
        hit = (unstopped.completion_ids == stop).nonzero()
        n = int(hit[0]) + 1 if len(hit) else 10
        assert len(rollout.completion_ids) == n
        assert rollout.routes.token_shape == (len(rollout.prompt_ids) + n,)
        assert rollout.finish_reason == ("stop" if len(hit) else "length")


def test_without_recording_rollouts_carry_no_routes_and_sample_the_same() -> None:
    engine = RecordingEngine(tiny_model("gpt_oss"))
    params = SamplingParams(max_new_tokens=5, seed=3)
    recorded = engine.generate(prompts(), params)
    plain = engine.generate(prompts(), params, record_routes=False)
    for a, b in zip(recorded, plain, strict=True):
        assert b.routes is None
        assert torch.equal(a.completion_ids, b.completion_ids)


def test_load_weights_syncs_the_trainer_into_the_engine_dtype() -> None:
    trainer = tiny_model("deepseek_v3", seed=1)
    engine = RecordingEngine(tiny_model("deepseek_v3", seed=2))
    engine.load_weights(trainer)
    kept = ("e_score_correction_bias", "gate.weight")  # DeepSeek-V3 keeps these in fp32
    for name, value in trainer.state_dict().items():
        mine: Any = engine.model.state_dict()[name]
        if value.is_floating_point():
            expected = torch.float32 if any(k in name for k in kept) else torch.bfloat16
            assert mine.dtype == expected, name
        torch.testing.assert_close(mine, value.to(mine.dtype))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be at least 1"),
        ({"temperature": -1.0}, r"temperature must be >= 0 and top_p in \(0, 1\]"),
        ({"top_p": 0.0}, r"top_p in \(0, 1\]"),
    ],
)
def test_bad_sampling_params_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_an_empty_prompt_is_rejected() -> None:
    engine = RecordingEngine(tiny_model("qwen3_moe"))
    with pytest.raises(ValueError, match="no empty prompt"):
        engine.generate([[5, 6], []], SamplingParams())


def test_an_attached_model_is_refused_rather_than_copied_with_its_patches() -> None:
    import routereplay

    model = tiny_model("qwen3_moe")
    controller = routereplay.attach(model)
    with pytest.raises(
        ReplayError, match=r"build the engine from the model before routereplay\.attach"
    ):
        RecordingEngine(model)
    controller.detach()
    RecordingEngine(model)  # fine once detached


def test_a_model_with_only_a_pre_forward_hook_is_refused_and_named() -> None:
    model = tiny_model("qwen3_moe")
    handle = model.register_forward_pre_hook(lambda module, args: None)
    with pytest.raises(ReplayError, match=r"per-instance\) patches \(a pre-forward hook\)"):
        RecordingEngine(model)
    handle.remove()
    RecordingEngine(model)


def test_the_engine_keeps_what_the_family_keeps_in_float32() -> None:
    engine = RecordingEngine(tiny_model("deepseek_v3"), dtype=torch.bfloat16)
    router = router_of(engine.model.model.layers[1])
    assert router.weight.dtype == torch.float32
    assert router.e_score_correction_bias.dtype == torch.float32
    assert engine.model.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16
