"""Label-free scores: what a user without labels can watch at each evaluation.

Every score is computed from what an evaluation pass already holds: the cosines of each
unlabeled image to the known classes (and, for two of them, the zero-shot cosines). Class
probabilities are those training uses, `softmax(100 * cos)`; the open-set score uses the MCM
scores (`softmax(cos)`, T = 1) that ueo thresholds. How far each score can be trusted was
measured against the true metrics on the demo's grid: docs/diagnostics.md, which is also
where the wording of `verdict` comes from.

Each score has a direction fixed before it was measured (`Score.higher_is_better`); `None`
marks a number shown for information only. Scores of kind "control" restate a training
objective (entropy minimisation, InfoMax, UEO) and are kept to show how such scores favour the
method that optimises them.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy.special import entr, logsumexp, softmax

from ueo.metrics import otsu_threshold
from ueo.objectives import LOGIT_SCALE

if TYPE_CHECKING:
    from ueo.inference import Outputs

SND_TEMPERATURE = 0.05  # Saito et al.'s tau, also Musgrave et al.'s
MAX_PAIRWISE = 4096  # SND and ClassAMI use at most this many images (a fixed sample)
SAMPLE_SEED = 0
CHUNK = 1024  # rows of the similarity matrix held at once


@dataclass(frozen=True)
class Score:
    """One label-free score: its key in metrics.json, its name, and what it claims."""

    key: str
    title: str
    higher_is_better: bool | None
    kind: str  # "score", "control" (restates a training objective) or "info"
    source: str


SCORES: tuple[Score, ...] = (
    Score("snd", "SND", True, "score", "Saito et al., ICCV 2021"),
    Score("nuclear", "nuclear norm", True, "score", "Cui et al., CVPR 2020 (BNM)"),
    Score("class_ami", "ClassAMI", True, "score", "Musgrave et al., 2022"),
    Score("agreement", "agreement w/ zero-shot", True, "score", "agreement with another model"),
    Score("mcm_split", "MCM split (Otsu eta)", True, "score", "ours: Otsu 1979 separability"),
    Score("entropy", "mean entropy", False, "control", "entropy minimisation's objective"),
    Score("im", "IM", True, "control", "InfoMax's objective (Musgrave et al.'s IM)"),
    Score("ueo_objective", "-UEO loss", True, "control", "UEO's objective"),
    Score("rejected", "rejected share", None, "info", "share under the Otsu threshold"),
)
SCORE_KEYS = tuple(s.key for s in SCORES)


def score_info(key: str) -> Score:
    return next(s for s in SCORES if s.key == key)


def probabilities(cos: np.ndarray) -> np.ndarray:
    """Class probabilities as training sees them: softmax(100 * cos), rows = images."""
    return softmax(LOGIT_SCALE * np.asarray(cos, dtype=np.float64), axis=1)


def mean_entropy(p: np.ndarray) -> float:
    """Mean Shannon entropy (nats) of the rows of `p`: low = confident predictions.

    Entropy minimisation's objective (TENT, Wang et al., ICLR 2021); Musgrave et al. (2022)
    benchmark its negative as the Entropy validator.
    """
    return float(entr(p).sum(axis=1).mean())


def information_maximization(p: np.ndarray) -> float:
    """H(mean prediction) - mean H(prediction): confident and diverse predictions score high.

    The information-maximisation objective (SHOT-IM, Liang et al., ICML 2020; InfoMax with
    lambda = 1), Musgrave et al.'s (2022) IM validator.
    """
    return float(entr(p.mean(axis=0)).sum() - entr(p).sum(axis=1).mean())


def soft_neighborhood_density(p: np.ndarray, temperature: float = SND_TEMPERATURE) -> float:
    """SND (Saito et al., "Tune it the right way", ICCV 2021): mean entropy of each image's
    soft neighbourhood, the softmax over the other images of the cosine similarity of their
    (L2-normalised) predictions, divided by `temperature`. High = images sit in dense
    neighbourhoods of similar predictions. Self-similarity is left out, as in Musgrave et
    al.'s implementation; rows are processed in chunks, so memory grows with N, not N^2.
    """
    x = np.asarray(p, dtype=np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    n = len(x)
    if n < 2:
        return float("nan")
    total = 0.0
    for start in range(0, n, CHUNK):
        rows = np.arange(start, min(start + CHUNK, n))
        z = (x[rows] @ x.T) / temperature
        z[np.arange(len(rows)), rows] = -np.inf
        q = np.exp(z - logsumexp(z, axis=1, keepdims=True))
        total += float(entr(q).sum())
    return total / n


def nuclear_norm(p: np.ndarray) -> float:
    """||P||_* / N, the nuclear norm of the prediction matrix per image (BNM: Cui et al.,
    "Towards discriminability and diversity", CVPR 2020; Musgrave et al.'s BNM validator).

    Computed from the K x K Gram matrix (the singular values of P are the square roots of its
    eigenvalues): O(N K^2), no N x N matrix.
    """
    x = np.asarray(p, dtype=np.float64)
    eig = np.linalg.eigvalsh(x.T @ x)
    return float(np.sqrt(np.clip(eig, 0.0, None)).sum() / len(x))


def class_ami(cos: np.ndarray, seed: int = SAMPLE_SEED) -> float:
    """ClassAMI (Musgrave et al., "Three new validators and a large-scale benchmark ranking for
    unsupervised domain adaptation", 2022): adjusted mutual information between the predicted
    classes and a k-means clustering (k = number of classes) of the images' class-cosine
    vectors (their "logits" layer). High = predictions follow the data's own clusters.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_mutual_info_score

    x = np.asarray(cos, dtype=np.float64)
    k = min(x.shape[1], len(np.unique(x, axis=0)))
    if k < 2:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # k-means on few distinct points warns; the AMI is fine
        clusters = KMeans(n_clusters=k, n_init=1, random_state=seed).fit_predict(x)
    return float(adjusted_mutual_info_score(x.argmax(axis=1), clusters))


def agreement(pred: np.ndarray, reference: np.ndarray) -> float:
    """Share of images whose predicted class is the reference model's (here: zero-shot's)."""
    return float(np.mean(np.asarray(pred) == np.asarray(reference)))


def otsu_separability(scores: np.ndarray) -> float:
    """Otsu's separability eta = max between-group variance / total variance (Otsu, 1979),
    over every split of the sorted scores into a low and a high group.

    1 when the scores are two spikes, about 0.64 for one Gaussian: how well the MCM scores
    split in two, as known-class and unknown images would. Exact (no histogram); a split
    falls only between distinct values. NaN when every score is equal.
    """
    s = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(s)
    total = s.var()
    if n < 2 or not total > 0:
        return float("nan")
    k = np.arange(1, n)
    low = np.cumsum(s)[:-1]
    mean0 = low / k
    mean1 = (s.sum() - low) / (n - k)
    between = (k / n) * (1 - k / n) * (mean0 - mean1) ** 2
    between = between[s[:-1] < s[1:]]
    return float(between.max() / total)


def rejected_share(scores: np.ndarray) -> float:
    """Share of images below the Otsu threshold of their MCM scores: what `ueo predict` would
    flag unknown with the threshold a run stores (ueo.metrics.otsu_threshold)."""
    s = np.asarray(scores, dtype=np.float64)
    return float(np.mean(s < otsu_threshold(s)))


def pairwise_sample(n: int, limit: int = MAX_PAIRWISE, seed: int = SAMPLE_SEED) -> np.ndarray:
    """The rows the pairwise scores use: all of them, or a fixed random `limit` of them (the
    same rows at every evaluation of a set of `n` images)."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def ueo_objective(cos: np.ndarray, zeroshot_cos: np.ndarray, trade: float = 1.0) -> float:
    """Minus UEO's loss over the whole set, with the zero-shot MCM weights (a control)."""
    import torch

    from ueo.objectives import mcm_score, ueo_loss

    weights = mcm_score(torch.from_numpy(np.asarray(zeroshot_cos, dtype=np.float32)))
    logits = LOGIT_SCALE * torch.from_numpy(np.asarray(cos, dtype=np.float32))
    return -float(ueo_loss(logits, weights, trade))


def label_free(current: Outputs, zeroshot: Outputs, trade: float = 1.0) -> dict[str, float | None]:
    """Every score of `SCORES` for one evaluation of the unlabeled set.

    `current` and `zeroshot` are the `Outputs` of this evaluation and of the zero-shot pass
    over the same images; rows unreadable in either are left out. A score that is undefined
    for the set (one image, all scores equal) is None.
    """
    keep = current.valid & zeroshot.valid
    cos, zs = current.cos[keep], zeroshot.cos[keep]
    if not len(cos):
        return dict.fromkeys(SCORE_KEYS)
    p = probabilities(cos)
    mcm = current.score[keep]
    rows = pairwise_sample(len(cos))
    values = {
        "snd": soft_neighborhood_density(p[rows]),
        "nuclear": nuclear_norm(p),
        "class_ami": class_ami(cos[rows]),
        "agreement": agreement(cos.argmax(axis=1), zs.argmax(axis=1)),
        "mcm_split": otsu_separability(mcm),
        "entropy": mean_entropy(p),
        "im": information_maximization(p),
        "ueo_objective": ueo_objective(cos, zs, trade),
        "rejected": rejected_share(mcm),
    }
    return {k: (v if math.isfinite(v) else None) for k, v in values.items()}
