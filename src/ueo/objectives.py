"""The training objectives of docs/spec.md: UEO and the baselines it is compared with.

POUF (Tanwisuth et al., ICML 2023) and UPL (Huang et al., arXiv 2204.03649) follow their
reference code line by line (docs/method.md cites the lines).

Written with tensor methods only (no module-level torch import), so that the method registry
built on them can be read by the command line without loading PyTorch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

EPS = 1e-5
POUF_MARGINAL_EPS = 1e-6  # POUF's marginal entropy uses its own epsilon (pouf.py:131)
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


def pouf_transport_loss(logits: Tensor, cos: Tensor) -> Tensor:
    """POUF's conditional transport between images and text prototypes, cost 1 - cos.

    Image -> text plan: softmax of `logits` over classes; text -> image plan: softmax over
    the batch. Returns mean_i sum_k cost pi(k|i) + mean_k sum_i cost pi(i|k); gradients flow
    through plans and cost, as in the reference. The second plan depends on the batch.
    """
    logits = logits.float()
    cost = 1.0 - cos.float()
    forward = (cost * logits.softmax(dim=1)).sum(dim=1).mean()
    backward = (cost * logits.softmax(dim=0)).sum(dim=0).mean()
    return forward + backward


def pouf_im_loss(logits: Tensor) -> Tensor:
    """POUF's information maximisation: mean entropy minus the entropy of the mean prediction.

    Unlike InfoMax it keeps POUF's two epsilons (1e-5 per sample, 1e-6 for the marginal).
    """
    p = logits.float().softmax(dim=1)
    marginal = p.mean(dim=0)
    return entropy(p).mean() + (marginal * (marginal + POUF_MARGINAL_EPS).log()).sum()


def pouf_loss(
    logits: Tensor,
    image_features: Tensor,
    text_features: Tensor,
    transport: float = 1.0,
    im: float = 0.3,
) -> Tensor:
    """POUF: `transport` x transport loss + `im` x information maximisation.

    The features are L2-normalised; the cost uses their cosine, the plans use `logits`
    (100 * cos in ueo). Defaults are POUF's --trade-off 1.0 and --lambda-im 0.3.
    """
    cos = image_features.float() @ text_features.float().t()
    return transport * pouf_transport_loss(logits, cos) + im * pouf_im_loss(logits)


def upl_select(cos: Tensor, k: int, scale: float = LOGIT_SCALE) -> tuple[Tensor, Tensor]:
    """UPL's pseudo-labels: every image's zero-shot class, and the top-k images per class.

    Confidence is max softmax(scale * cos), UPL's own (scale = CLIP's 100), not MCM's T = 1.
    An image competes only in its predicted class; a class keeps its k most confident images,
    all of them if it has fewer, none if it is never predicted. UPL breaks ties arbitrarily;
    here the lowest class index wins, then the lowest sample index. Rows with NaN (unreadable
    images) are never selected. Returns (labels, selected), a long and a bool tensor.
    """
    valid = ~cos.isnan().any(dim=-1)
    probs = (scale * cos.double().nan_to_num()).softmax(dim=-1)
    labels = probs.argmax(dim=-1)
    confidence = probs.max(dim=-1).values.masked_fill(~valid, -1.0)
    order = confidence.sort(descending=True, stable=True).indices
    order = order[labels[order].sort(stable=True).indices]  # by class, confidence within
    counts = labels.bincount(minlength=probs.shape[-1])
    first = counts.cumsum(dim=0) - counts
    rank = labels.new_ones(len(labels)).cumsum(dim=0) - 1 - first[labels[order]]
    selected = valid.clone()
    selected[order] &= rank < k
    return labels, selected


def upl_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """UPL: cross-entropy of `logits` (100 * cos) against the pseudo-labels, batch mean."""
    log_p = logits.float().log_softmax(dim=-1)
    return -log_p.gather(1, labels.long().to(log_p.device)[:, None]).mean()
