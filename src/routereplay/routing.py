"""Router math as pure functions: native top-k selection, and gate weights for given ids.

Replay only changes *which* experts a token goes to. The gate weights are always
recomputed from the live router logits at the chosen ids (`gate_weights`), so the
router keeps its gradient. `select` is built on `gate_weights`, which makes
`gate_weights(logits, select(logits).ids) == select(logits).weights` hold bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F

from routereplay.errors import LayoutError

ScoreFunction = Literal["softmax", "sigmoid", "softmax_topk"]


@dataclass(frozen=True)
class RouterSpec:
    """How one router turns logits `[tokens, experts]` into ids and gate weights.

    score:
        "softmax"       probabilities over all experts, top-k of them (Qwen, Mixtral, OLMoE).
        "sigmoid"       independent sigmoid scores (DeepSeek-V3, GLM4-MoE).
        "softmax_topk"  top-k on raw logits, softmax over the k chosen (GPT-OSS, Megatron's
                        default `moe_router_pre_softmax=False`).
    renormalize:       divide the k weights by their sum (plus `renorm_eps`).
    scaling_factor:    multiply the final weights (DeepSeek `routed_scaling_factor`).
    n_group, topk_group, group_score_top:
                       group-limited top-k: experts split into `n_group` groups, each group
                       scored by the sum of its best `group_score_top` scores (1 = the max),
                       only the best `topk_group` groups are eligible.
    masked_score:      the score given to experts in ineligible groups.
    sorted_ids:        whether native ids come sorted by score (torch.topk `sorted`).
    upcast:            compute scores in float32 whatever the logits' dtype.
    weights_in_logits_dtype:
                       cast the final weights back to the logits' dtype (Qwen does, Mixtral
                       and DeepSeek keep float32).
    """

    top_k: int
    score: ScoreFunction = "softmax"
    renormalize: bool = False
    renorm_eps: float = 0.0
    scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    group_score_top: int = 1
    masked_score: float = float("-inf")
    sorted_ids: bool = True
    upcast: bool = True
    weights_in_logits_dtype: bool = False

    def __post_init__(self) -> None:
        if self.score not in ("softmax", "sigmoid", "softmax_topk"):
            raise LayoutError(
                f"RouterSpec.score must be softmax, sigmoid or softmax_topk, found {self.score!r}."
            )
        if self.top_k < 1:
            raise LayoutError(f"RouterSpec.top_k must be at least 1, found {self.top_k}.")
        if not 1 <= self.topk_group <= self.n_group:
            raise LayoutError(
                f"topk_group must be in [1, n_group={self.n_group}], found {self.topk_group}."
            )

    @property
    def grouped(self) -> bool:
        """Whether selection is group-limited (`n_group > 1`)."""
        return self.n_group > 1

    @classmethod
    def from_hf_config(cls, config: Any) -> RouterSpec:
        """The spec of the router a transformers model of this config builds, by the
        rules of its family (`routereplay.families`)."""
        from routereplay.families import hf_router_spec

        return hf_router_spec(config)


class Routing(NamedTuple):
    """A router's decision: `weights [tokens, top_k]` and `ids [tokens, top_k]` (int64)."""

    weights: torch.Tensor
    ids: torch.Tensor


def select(logits: torch.Tensor, spec: RouterSpec, bias: torch.Tensor | None = None) -> Routing:
    """Native routing of `logits [tokens, experts]`.

    `bias [experts]` (DeepSeek's `e_score_correction_bias`) shifts the scores used to
    *choose* experts; the weights come from the unbiased scores.
    """
    scores = RouterScores(logits, spec)
    ids = scores.native_ids(bias)
    return Routing(scores.gate_weights(ids), ids)


def native_ids(
    logits: torch.Tensor, spec: RouterSpec, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The ids `[tokens, top_k]` (int64) native routing picks, without an autograd graph."""
    with torch.no_grad():
        return RouterScores(logits, spec).native_ids(bias)


def gate_weights(logits: torch.Tensor, ids: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    """Gate weights `[tokens, top_k]` of the experts `ids [tokens, top_k]`, in their order.

    Differentiable with respect to `logits [tokens, experts]`. Every id must be a valid
    expert (no -1): the controller fills unreplayed rows with native ids first.
    """
    return RouterScores(logits, spec).gate_weights(ids)


class RouterScores:
    """The scores of one router call, computed once for both selection and weights.

    `scores [tokens, experts]`: softmax or sigmoid of the logits, or the logits
    themselves for "softmax_topk" (which normalises over the chosen k only).
    """

    def __init__(self, logits: torch.Tensor, spec: RouterSpec) -> None:
        self.logits, self.spec = logits, spec
        x = logits.float() if spec.upcast else logits
        if spec.score == "softmax":
            self.scores = F.softmax(x, dim=-1)
        elif spec.score == "sigmoid":
            self.scores = torch.sigmoid(x)
        else:
            self.scores = x

    @torch.no_grad()
    def native_ids(self, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Top-k ids `[tokens, top_k]`. Selection builds no graph, so a forward that also
        routes natively (to count disagreement) saves the same tensors as its recompute."""
        spec = self.spec
        choice = self.scores if bias is None else self.scores + bias
        if spec.grouped:
            choice = _mask_groups(choice, spec)
        return torch.topk(choice, spec.top_k, dim=-1, sorted=spec.sorted_ids).indices

    def gate_weights(self, ids: torch.Tensor) -> torch.Tensor:
        """Weights `[tokens, top_k]` of `ids`, differentiable in the logits."""
        spec = self.spec
        weights = self.scores.gather(-1, ids)
        if spec.score == "softmax_topk":
            weights = F.softmax(weights, dim=-1)
        if spec.renormalize:
            total = weights.sum(dim=-1, keepdim=True)
            weights = weights / (total + spec.renorm_eps if spec.renorm_eps else total)
        if spec.scaling_factor != 1.0:
            weights = weights * spec.scaling_factor
        if spec.weights_in_logits_dtype:
            weights = weights.to(self.logits.dtype)
        return weights


def _mask_groups(choice: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    """Give every expert outside the `topk_group` best groups `spec.masked_score`."""
    tokens, experts = choice.shape
    if experts % spec.n_group:
        raise LayoutError(f"{experts} experts do not split into n_group={spec.n_group} groups.")
    grouped = choice.view(tokens, spec.n_group, experts // spec.n_group)
    group_scores = grouped.topk(spec.group_score_top, dim=-1).values.sum(dim=-1)
    best = torch.topk(group_scores, spec.topk_group, dim=-1, sorted=False).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
    keep = keep.unsqueeze(-1).expand_as(grouped).reshape(tokens, experts)
    return choice.masked_fill(~keep, spec.masked_score)


def load_balancing_loss(
    logits: torch.Tensor, ids: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch-style load-balancing loss of the routing that ran: `E * sum_e f_e * P_e`.

    `logits [rows, experts]` and `ids [rows, top_k]` are the router logits and the ids
    used, rows being (layer, token) pairs of any number of layers stacked; `weight
    [rows]` (0 for padding) weighs each row. `f_e` counts the ids the routers *used*
    (replayed or native), not a fresh top-k of the logits, so under replay the loss
    balances the routing that actually ran; the gradient flows through the live
    softmax probabilities `P_e`, as in transformers' `load_balancing_loss_func`.
    """
    num_experts = logits.shape[-1]
    probs = F.softmax(logits, dim=-1)
    expert_mask = F.one_hot(ids, num_experts).float()  # [rows, top_k, experts]
    if weight is None:
        tokens_per_expert = expert_mask.mean(dim=0)
        prob_per_expert = probs.mean(dim=0)
    else:
        weight = weight.to(probs.device, probs.dtype)
        tokens_per_expert = (expert_mask * weight[:, None, None]).sum(0) / weight.sum()
        prob_per_expert = (probs * weight[:, None]).sum(0) / weight.sum()
    return (tokens_per_expert * prob_per_expert.unsqueeze(0)).sum() * num_experts
