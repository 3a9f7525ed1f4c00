"""Router math: native selection matches transformers bit for bit, and gate weights for
given ids are exactly the weights native routing would have produced."""

from __future__ import annotations

import pytest
import torch
from hf_models import FAMILIES, router_of, tiny_config, tiny_model
from hypothesis import given
from hypothesis import strategies as st

from routereplay import RouterSpec, gate_weights, select
from routereplay.errors import LayoutError


def hf_router(family: str, dtype: torch.dtype, **overrides: object) -> torch.nn.Module:
    model = tiny_model(family, **overrides)
    router = next(r for layer in model.model.layers if (r := router_of(layer)) is not None)
    if hasattr(router, "e_score_correction_bias"):
        # A non-zero bias, so that selection-only bias handling is really exercised.
        router.e_score_correction_bias.normal_(std=0.3)
    return router.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", FAMILIES)
def test_select_reproduces_the_transformers_router(family: str, dtype: torch.dtype) -> None:
    router = hf_router(family, dtype)
    spec = RouterSpec.from_hf_config(tiny_config(family))
    hidden = torch.randn(64, 32, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        logits, weights, ids = router(hidden)
        ours = select(logits, spec, bias=getattr(router, "e_score_correction_bias", None))
    assert torch.equal(ours.ids, ids)
    assert ours.weights.dtype == weights.dtype
    assert torch.equal(ours.weights, weights)


@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy"])
def test_select_reproduces_deepseek_v2_routers(method: str) -> None:
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    config = {"model_type": "deepseek_v2", "num_hidden_layers": 2, "n_routed_experts": 8}
    config |= {"num_experts_per_tok": 3, "n_group": 4, "topk_group": 2, "topk_method": method}
    config |= {"routed_scaling_factor": 1.5}
    hf_config = tiny_config("deepseek_v3")  # any config object with hidden_size
    for key, value in config.items():
        setattr(hf_config, key, value)
    hf_config.num_experts = 8
    router = DeepseekV2TopkRouter(hf_config)
    torch.nn.init.normal_(router.weight)
    hidden = torch.randn(64, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, weights, ids = router(hidden)
    ours = select(logits, RouterSpec.from_hf_config(config))
    assert torch.equal(ours.ids, ids)
    assert torch.equal(ours.weights, weights)


@st.composite
def router_specs(draw: st.DrawFn) -> tuple[RouterSpec, int]:
    num_experts = draw(st.sampled_from([4, 8, 16, 32]))
    n_group = draw(st.sampled_from([g for g in (1, 2, 4) if num_experts % g == 0]))
    per_group = num_experts // n_group
    topk_group = draw(st.integers(1, n_group))
    top_k = draw(st.integers(1, topk_group * per_group))
    spec = RouterSpec(
        top_k=top_k,
        score=draw(st.sampled_from(["softmax", "sigmoid", "softmax_topk"])),
        renormalize=draw(st.booleans()),
        renorm_eps=draw(st.sampled_from([0.0, 1e-20])),
        scaling_factor=draw(st.sampled_from([1.0, 2.5])),
        n_group=n_group,
        topk_group=topk_group,
        group_score_top=draw(st.integers(1, min(2, per_group))),
        sorted_ids=draw(st.booleans()),
        upcast=draw(st.booleans()),
        weights_in_logits_dtype=draw(st.booleans()),
    )
    return spec, num_experts


@given(
    spec_and_experts=router_specs(),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    with_bias=st.booleans(),
)
def test_gate_weights_at_native_ids_equal_native_weights_bit_for_bit(
    spec_and_experts: tuple[RouterSpec, int], seed: int, dtype: torch.dtype, with_bias: bool
) -> None:
    spec, num_experts = spec_and_experts
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(33, num_experts, generator=generator).to(dtype)
    bias = torch.randn(num_experts, generator=generator) * 0.2 if with_bias else None
    native = select(logits, spec, bias)
    assert native.ids.shape == native.weights.shape == (33, spec.top_k)
    assert torch.equal(gate_weights(logits, native.ids, spec), native.weights)
    # Distinct experts per row, inside the eligible groups.
    assert (native.ids.sort(-1).values.diff(dim=-1) > 0).all()
    groups_used = (native.ids // (num_experts // spec.n_group)).unique(dim=-1)
    assert all(len(row.unique()) <= spec.topk_group for row in groups_used)


def test_bias_moves_selection_but_not_the_weights() -> None:
    spec = RouterSpec(top_k=2, score="sigmoid", renormalize=True)
    logits = torch.randn(256, 8, generator=torch.Generator().manual_seed(3))
    bias = torch.zeros(8)
    bias[7] = 10.0  # expert 7 now always wins a slot
    biased = select(logits, spec, bias)
    assert (biased.ids == 7).any(-1).all()
    assert not (select(logits, spec).ids == 7).any(-1).all()
    # Weights are the unbiased sigmoid scores at the chosen ids, renormalised.
    scores = logits.sigmoid().gather(-1, biased.ids)
    assert torch.allclose(biased.weights, scores / scores.sum(-1, keepdim=True))


@pytest.mark.parametrize("score", ["softmax", "sigmoid", "softmax_topk"])
@pytest.mark.parametrize("renormalize", [False, True])
def test_gate_weights_are_differentiable_in_the_logits(score: str, renormalize: bool) -> None:
    spec = RouterSpec(top_k=3, score=score, renormalize=renormalize, scaling_factor=1.7)  # type: ignore[arg-type]
    logits = torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    ids = torch.tensor([[0, 1, 2], [7, 6, 5], [3, 0, 4], [1, 5, 2], [6, 4, 0]])
    double = RouterSpec(**{**spec.__dict__, "upcast": False})
    assert torch.autograd.gradcheck(
        lambda x: gate_weights(x, ids, double), (logits.requires_grad_(),)
    )


def test_gate_weights_follow_the_given_id_order() -> None:
    spec = RouterSpec(top_k=3, score="softmax")
    logits = torch.randn(4, 8)
    ids = torch.tensor([[0, 1, 2]] * 4)
    assert torch.equal(
        gate_weights(logits, ids.flip(-1), spec), gate_weights(logits, ids, spec).flip(-1)
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"top_k": 0}, "top_k must be at least 1"),
        ({"top_k": 2, "score": "relu"}, "score must be softmax, sigmoid or softmax_topk"),
        ({"top_k": 2, "n_group": 2, "topk_group": 3}, r"topk_group must be in \[1, n_group=2\]"),
    ],
)
def test_invalid_specs_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(LayoutError, match=message):
        RouterSpec(**kwargs)


def test_groups_that_do_not_divide_the_experts_are_rejected() -> None:
    spec = RouterSpec(top_k=2, n_group=3, topk_group=1)
    with pytest.raises(LayoutError, match="8 experts do not split into n_group=3 groups"):
        select(torch.randn(4, 8), spec)
