"""How far apart two routings, or two policies' log-probs, are.

Routing agreement compares the expert *sets* two traces chose for the same tokens
(column order does not route). Log-prob mismatch compares a trainer's log-probs with
the rollout engine's over the same sampled tokens: the training-inference mismatch
that router replay exists to shrink. Rows or tokens without a value (-1 routes,
masked tokens) are excluded and counted, never silently mixed in.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from routereplay.controller import ReplayController
from routereplay.errors import TraceError
from routereplay.trace import NO_ROUTE, RoutingTrace


@dataclass(frozen=True)
class RoutingAgreement:
    """Agreement of two traces over the (token, layer) pairs both route.

    pairs:               (token, layer) pairs compared.
    skipped:             pairs left out because either trace has no route (-1) there.
    router_disagreement: fraction of compared pairs whose expert sets differ.
    token_disagreement:  fraction of tokens (with a compared pair) differing on any layer.
    per_layer:           router disagreement per global layer.
    overlap_at_k:        mean |A & B| / k over compared pairs.
    jaccard:             mean |A & B| / |A | B| over compared pairs (Jaccard).
    """

    pairs: int
    skipped: int
    router_disagreement: float
    token_disagreement: float
    per_layer: dict[int, float]
    overlap_at_k: float
    jaccard: float

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict, for JSON and loggers."""
        return asdict(self)


def routing_agreement(a: RoutingTrace, b: RoutingTrace) -> RoutingAgreement:
    """Compare two traces of the same tokens and layers (e.g. engine vs trainer)."""
    a.check_compatible(
        b,
        names=(f"The first ({a.source}) trace", f"the second ({b.source})"),
        fix="traces to compare must cover the same tokens and layers with the same top_k.",
        token_shape=True,
    )
    top_k = a.top_k
    ids_a = a.expert_ids().reshape(-1, len(a.layers), top_k)  # [tokens, layers, k]
    ids_b = b.expert_ids().reshape(-1, len(b.layers), top_k)
    both = (ids_a[..., 0] != NO_ROUTE) & (ids_b[..., 0] != NO_ROUTE)  # [tokens, layers]
    # Ids in a row are distinct, so |A & B| counts pairwise matches.
    overlap = (ids_a[..., :, None] == ids_b[..., None, :]).sum((-1, -2))  # [tokens, layers]
    differs = (overlap < top_k) & both
    pairs = int(both.sum())
    tokens = both.any(-1)
    per_layer = {
        layer: float(differs[:, slot].sum() / both[:, slot].sum()) if both[:, slot].any() else 0.0
        for slot, layer in enumerate(a.layers)
    }
    overlap = overlap.float()[both]
    return RoutingAgreement(
        pairs=pairs,
        skipped=int(both.numel() - pairs),
        router_disagreement=float(differs.sum()) / pairs if pairs else 0.0,
        token_disagreement=float(differs.any(-1).sum() / tokens.sum()) if tokens.any() else 0.0,
        per_layer=per_layer,
        overlap_at_k=float((overlap / top_k).mean()) if pairs else 1.0,
        jaccard=float((overlap / (2 * top_k - overlap)).mean()) if pairs else 1.0,
    )


@dataclass(frozen=True)
class LogProbMismatch:
    """Training-inference mismatch over valid tokens, delta = logp_train - logp_rollout.

    With samples from the rollout policy mu and ratio r = pi_train / mu = exp(delta):
    mean_abs_delta:   mean |delta|.
    k3_kl:            mean(r - 1 - log r) = mean(exp(delta) - 1 - delta), the low-variance
                      non-negative estimator of KL(mu || pi_train).
    direct_kl:        mean(-delta) = mean(log mu - log pi_train), the plain estimator of the
                      same KL (unbiased, noisier, can be negative on few tokens).
    extreme_fraction: F(tau), the fraction of tokens whose r lies outside [1/tau, tau].
    chi_squared:      mean((r - 1)^2), the chi-squared divergence estimate.
    max_ratio:        the largest of r and 1/r over the tokens.
    """

    tokens: int
    mean_abs_delta: float
    k3_kl: float
    direct_kl: float
    extreme_fraction: float
    tau: float
    chi_squared: float
    max_ratio: float

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict, for JSON and loggers."""
        return asdict(self)


def logprob_mismatch(
    train_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    mask: torch.Tensor | None = None,
    tau: float = 2.0,
) -> LogProbMismatch:
    """Mismatch of `train_logprobs` and `rollout_logprobs` (same shape, any axes) over the
    tokens where `mask` (bool, same shape) is True: the response tokens."""
    if train_logprobs.shape != rollout_logprobs.shape:
        raise TraceError(
            f"Log-probs to compare have shapes {tuple(train_logprobs.shape)} (trainer) and "
            f"{tuple(rollout_logprobs.shape)} (rollout): give one value per sampled token."
        )
    if tau <= 1:
        raise TraceError(f"tau must exceed 1 (a ratio band [1/tau, tau]), found {tau}.")
    delta = train_logprobs.double() - rollout_logprobs.double()
    if mask is not None:
        if mask.shape != delta.shape:
            raise TraceError(
                f"The mask has shape {tuple(mask.shape)}, the log-probs {tuple(delta.shape)}."
            )
        delta = delta[mask.bool()]
    delta = delta.flatten()
    if delta.numel() == 0:
        return LogProbMismatch(0, 0.0, 0.0, 0.0, 0.0, tau, 0.0, 1.0)
    # expm1: r - 1 without cancellation when delta is tiny (k3 stays >= 0).
    excess = torch.expm1(delta)
    log_tau = torch.log(torch.tensor(tau, dtype=torch.float64))
    return LogProbMismatch(
        tokens=int(delta.numel()),
        mean_abs_delta=float(delta.abs().mean()),
        k3_kl=float((excess - delta).clamp(min=0).mean()),
        direct_kl=float((-delta).mean()),
        extreme_fraction=float((delta.abs() > log_tau).double().mean()),
        tau=tau,
        chi_squared=float((excess**2).mean()),
        max_ratio=float(delta.abs().max().exp()),
    )


def counterfactual_disagreement(controller: ReplayController) -> dict[int, float]:
    """Per global layer, the share of replayed rows in the last context where the live
    router would have chosen another expert set: log it every step; it is the health
    signal of replay (drift between the engine's and the trainer's routers)."""
    return {layer: stats.disagreement_rate for layer, stats in controller.stats().items()}
