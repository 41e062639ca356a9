"""The training objectives of SPEC.md: UEO and the baselines it is compared with."""

from __future__ import annotations

import torch

EPS = 1e-5


def entropy(p: torch.Tensor) -> torch.Tensor:
    """H(q) = -sum_k q_k log(q_k + 1e-5) along the last axis (the reference's epsilon)."""
    return -(p * torch.log(p + EPS)).sum(dim=-1)


def mcm_score(cos: torch.Tensor) -> torch.Tensor:
    """Maximum concept matching: max softmax of the raw cosines (T = 1). Higher = more ID."""
    return torch.softmax(cos.float(), dim=-1).max(dim=-1).values


def ueo_loss(logits: torch.Tensor, weights: torch.Tensor, trade: float = 1.0) -> torch.Tensor:
    """Weighted entropy of confident samples minus `trade` x entropy of the 1/w-weighted marginal.

    `logits` are scaled (100 * cos), batch x classes; `weights` are the fixed MCM weights w_i.
    """
    p = torch.softmax(logits.float(), dim=-1)
    w = weights.float().to(p.device)
    conditional = (w * entropy(p)).sum() / w.sum()
    inv = 1.0 / w
    marginal = (inv[:, None] * p).sum(dim=0) / inv.sum()
    return conditional - trade * entropy(marginal)


def infomax_loss(logits: torch.Tensor, trade: float = 1.0) -> torch.Tensor:
    """InfoMax / SHOT-IM: UEO with every weight equal to one."""
    return ueo_loss(logits, torch.ones(logits.shape[0], device=logits.device), trade)


def entmin_loss(logits: torch.Tensor) -> torch.Tensor:
    """Entropy minimisation (TENT's objective): mean entropy, no diversity term."""
    return entropy(torch.softmax(logits.float(), dim=-1)).mean()
