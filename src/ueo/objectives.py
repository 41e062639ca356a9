"""The training objectives of docs/spec.md: UEO and the baselines it is compared with.

Written with tensor methods only (no module-level torch import), so that the method registry
built on them can be read by the command line without loading PyTorch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

EPS = 1e-5
LOGIT_SCALE = 100.0  # training logits are 100 * cos (docs/spec.md, "The UEO objective")


def entropy(p: Tensor) -> Tensor:
    """H(q) = -sum_k q_k log(q_k + 1e-5) along the last axis (the reference's epsilon)."""
    return -(p * (p + EPS).log()).sum(dim=-1)


def mcm_score(cos: Tensor) -> Tensor:
    """Maximum concept matching: max softmax of the raw cosines (T = 1). Higher = more ID."""
    return cos.float().softmax(dim=-1).max(dim=-1).values


def ueo_loss(logits: Tensor, weights: Tensor, trade: float = 1.0) -> Tensor:
    """Weighted entropy of confident samples minus `trade` x entropy of the 1/w-weighted marginal.

    `logits` are scaled (100 * cos), batch x classes; `weights` are the fixed MCM weights w_i.
    """
    p = logits.float().softmax(dim=-1)
    w = weights.float().to(p.device)
    conditional = (w * entropy(p)).sum() / w.sum()
    inv = 1.0 / w
    marginal = (inv[:, None] * p).sum(dim=0) / inv.sum()
    return conditional - trade * entropy(marginal)


def infomax_loss(logits: Tensor, trade: float = 1.0) -> Tensor:
    """InfoMax / SHOT-IM: UEO with every weight equal to one."""
    return ueo_loss(logits, logits.new_ones(logits.shape[0]), trade)


def entmin_loss(logits: Tensor) -> Tensor:
    """Entropy minimisation (TENT's objective): mean entropy, no diversity term."""
    return entropy(logits.float().softmax(dim=-1)).mean()
