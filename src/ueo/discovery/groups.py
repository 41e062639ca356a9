"""What the images the adapted model rejects are, as named groups (`ueo discover`).

1. One pass of the adapted model gives each image its MCM score and its image features; the
   images scoring below the threshold (the adapter's) are the rejected ones.
2. Their features are clustered with k-means (scikit-learn). The number of clusters is fixed
   or chosen from the data, k from 2 to `max_clusters`, by one of two rules:
   - `silhouette` (default): the k whose k-means clustering of the rejected images has the
     best silhouette score;
   - `gcd`, as Generalized Category Discovery chooses it (Vaze et al., CVPR 2022): k-means
     over the rejected images together with the confident known-class images (the most
     confident accepted images of each predicted class, labelled by that prediction), for
     every number of new clusters; the one whose clustering best recovers the labelled part
     (Hungarian cluster accuracy) wins, and the rejected images keep their joint clusters
     (a known-class image rejected by mistake can join its class's cluster).
   The k is chosen on at most `SELECT_SAMPLE` images; the final clustering uses them all.
3. Naming, after "What's in a Name?" (Han et al., 2024): every rejected image votes for its
   nearest vocabulary name (cosine with the adapted prompts); a Hungarian assignment (scipy)
   gives the clusters different names, maximising the votes that agree with their cluster's
   name (ties go to the names with the higher mean probability, softmax of 100 x cosine over
   the vocabulary). Each cluster also lists its top names with their shares of the votes.
4. Known classes rejected by mistake: each cluster's centroid is compared with the known
   classes (nearest one, cosine). The images also vote over the known classes and the
   vocabulary together; a cluster whose most voted name would then be a known class is
   reported as likely that known class. (A plurality, not a majority: the votes of a large
   vocabulary scatter over many near names, those of a known class do not.)
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.special import softmax
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score
from sklearn.metrics.cluster import contingency_matrix
from threadpoolctl import threadpool_limits

from ueo.data import ImageSet
from ueo.discovery.settings import DiscoverSettings
from ueo.discovery.vocabulary import Vocabulary, encode_vocabulary
from ueo.errors import UeoError
from ueo.inference import Outputs, infer
from ueo.loader import BadImages
from ueo.model import UeoModel
from ueo.names import normalize_name
from ueo.objectives import LOGIT_SCALE
from ueo.recipe import Runtime
from ueo.runtime import resolve_device

log = logging.getLogger("ueo")

SELECT_SAMPLE = 2000  # images the k is chosen on (k-means and silhouette for every k)
LABELLED_PER_CLASS = 100  # gcd: confident known-class images per predicted class
N_INIT = 4  # k-means restarts
TOP_NAMES = 5
CHUNK = 256  # images per block of image x vocabulary similarities


@dataclass
class Cluster:
    """One group of rejected images (ids count from 1, largest group first)."""

    id: int
    size: int
    name: str | None  # None: more clusters than vocabulary names
    top_names: list[tuple[str, float]]  # (name, share of the cluster's votes)
    tightness: float  # mean cosine of its images to the centroid's direction
    name_cos: float | None  # cosine of the centroid to its name
    nearest_known: str
    known_cos: float  # cosine of the centroid to its nearest known class
    known_share: float  # share of its images nearer a known class than any vocabulary name
    likely_known: bool  # a known class would win its votes over known classes and vocabulary


@dataclass
class Discovery:
    """The groups of the rejected images, and how they were found (plain data)."""

    paths: list[str]  # the rejected images
    rows: np.ndarray  # their rows in the image set
    cluster: np.ndarray  # cluster id per rejected image (1..k)
    distance: np.ndarray  # cosine distance to its cluster's centroid
    clusters: list[Cluster]
    selection: dict  # how k was chosen: rule, scores against k, the choice
    image_top: np.ndarray  # rejected images x TOP_NAMES: their nearest vocabulary names
    vocabulary: tuple[str, ...]
    counts: dict  # images, readable, rejected, threshold
    timings: dict = field(default_factory=dict)

    @property
    def k(self) -> int:
        return len(self.clusters)

    def summary(self) -> dict:
        return {
            "counts": self.counts,
            "selection": self.selection,
            "clusters": [asdict(c) for c in self.clusters],
            "timings": self.timings,
        }


def discover(
    model: UeoModel,
    images: ImageSet,
    threshold: float,
    vocabulary: Vocabulary,
    runtime: Runtime | None = None,
    settings: DiscoverSettings | None = None,
    *,
    precision: str = "fp32",
) -> Discovery:
    """Group and name the images of `images` that `model` rejects (MCM score < threshold).

    `vocabulary` should not hold the known classes (`ueo.vocabulary.without_known`); it is
    encoded with the model's prompt context, or read from the cache.
    """
    settings = (settings or DiscoverSettings()).validate()
    _check_threshold(threshold)
    runtime = (runtime or Runtime()).validate()
    model.to(resolve_device(runtime.device))
    start = time.perf_counter()
    bad = BadImages(runtime.on_bad_image)
    out = infer(
        model, images, runtime, precision=precision, bad=bad, desc="discover", features=True
    )
    if not out.valid.any():
        raise UeoError(f"None of the {len(images)} images of {images.source} could be read.")
    passed = time.perf_counter()
    names, vocab = encode_vocabulary(model, vocabulary, progress=runtime.progress)
    with torch.no_grad():
        known_text = model.text_features().float().cpu().numpy()
    encoded = time.perf_counter()
    found = discover_outputs(
        out, images, threshold, known_text, model.class_names, names, vocab.numpy(), settings
    )
    found.timings = {
        "image_pass_s": round(passed - start, 3),
        "vocabulary_s": round(encoded - passed, 3),
        "groups_s": round(time.perf_counter() - encoded, 3),
    }
    return found


def discover_outputs(
    outputs: Outputs,
    images: ImageSet,
    threshold: float,
    known_text: np.ndarray,
    known_names: list[str],
    vocab_names: tuple[str, ...],
    vocab_features: np.ndarray,
    settings: DiscoverSettings | None = None,
) -> Discovery:
    """`discover` from the outputs of a pass that kept the image features (no model needed):
    the same features can be grouped again with other settings."""
    settings = (settings or DiscoverSettings()).validate()
    _check_threshold(threshold)
    if outputs.features is None:
        raise ValueError("discover needs the image features: infer(..., features=True)")
    valid = outputs.valid
    score = np.where(valid, np.nan_to_num(outputs.score, nan=np.inf), np.inf)
    rejected = valid & (score < threshold)
    rows = np.flatnonzero(rejected)
    counts = {
        "images": len(images),
        "readable": int(valid.sum()),
        "rejected": len(rows),
        "threshold": float(threshold),
    }
    feats = _unit(outputs.features[rows].astype(np.float32))
    if not len(rows):
        return Discovery(
            [], rows, np.zeros(0, np.int64), np.zeros(0), [], _no_selection(0),
            np.zeros((0, TOP_NAMES), np.int64), tuple(vocab_names), counts,
        )  # fmt: skip
    # k-means runs on one OpenMP thread: scikit-learn's threads wait on each other at every
    # iteration, and on a shared CPU (two cores, load average 6) a demo cell's grouping took
    # 10-16 s with two threads and 0.6 s with one (the same clusters).
    with threadpool_limits(limits=1, user_api="openmp"):
        labels, selection = _groups(feats, outputs, valid & ~rejected, settings)
    k = int(labels.max()) + 1
    votes, soft, image_top, known_vote = _votes(feats, labels, k, vocab_features, known_text)
    free = known_vote < 0  # the images whose nearest name over both is a vocabulary name
    name_score = votes + soft / (k + 1)  # votes first; the mean probability breaks ties
    assigned = assign_names(name_score)
    centroids = _unit(np.stack([feats[labels == c].mean(0) for c in range(k)]))
    cos_centroid = np.einsum("nd,nd->n", feats, centroids[labels])
    known_cos = centroids @ known_text.T
    clusters = []
    for c in range(k):
        members = labels == c
        order = np.lexsort((-soft[c], -votes[c]))[:TOP_NAMES]
        n = int(members.sum())
        best_known = int(known_cos[c].argmax())
        share = float((~free[members]).mean())
        known_votes = np.bincount(known_vote[members & ~free], minlength=len(known_names))
        vocab_votes = np.bincount(image_top[members & free, 0], minlength=len(vocab_names))
        clusters.append(
            Cluster(
                id=c,
                size=n,
                name=vocab_names[assigned[c]] if assigned[c] >= 0 else None,
                top_names=[(vocab_names[i], float(votes[c, i] / n)) for i in order],
                tightness=float(cos_centroid[members].mean()),
                name_cos=(
                    float(centroids[c] @ vocab_features[assigned[c]]) if assigned[c] >= 0 else None
                ),
                nearest_known=known_names[best_known],
                known_cos=float(known_cos[c, best_known]),
                known_share=share,
                likely_known=bool(known_votes.max() > vocab_votes.max()),
            )
        )
    # Largest group first, ids from 1.
    ranked = sorted(clusters, key=lambda cl: (-cl.size, cl.id))
    new_id = np.empty(k, np.int64)
    for i, cl in enumerate(ranked, 1):
        new_id[cl.id] = i
        cl.id = i
    return Discovery(
        paths=[images.paths[i] for i in rows],
        rows=rows,
        cluster=new_id[labels],
        distance=1.0 - cos_centroid,
        clusters=ranked,
        selection=selection,
        image_top=image_top,
        vocabulary=tuple(vocab_names),
        counts=counts,
    )


def _check_threshold(threshold: float) -> None:
    if not 0.0 <= threshold <= 1.0:  # NaN fails both comparisons
        raise UeoError(f"The threshold must be an MCM score in [0, 1], not {threshold}.")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _no_selection(n: int, reason: str = "") -> dict:
    return {"rule": "none", "reason": reason or f"{n} rejected image(s)", "scores": [], "k": n}


def _groups(
    feats: np.ndarray, outputs: Outputs, accepted: np.ndarray, s: DiscoverSettings
) -> tuple[np.ndarray, dict]:
    """Cluster labels (0..k-1, every one used) of the rejected images, and how k was chosen."""
    n = len(feats)
    distinct = len(np.unique(feats.round(5), axis=0))
    if s.clusters is not None:
        if s.clusters > n:
            raise UeoError(
                f"--clusters {s.clusters}, but only {n} image(s) were rejected: give "
                f"--clusters {n} or fewer, or let ueo choose."
            )
        if s.clusters > distinct:
            raise UeoError(
                f"--clusters {s.clusters}, but the {n} rejected images hold only {distinct} "
                "distinct feature vectors: give fewer clusters."
            )
        selection = {"rule": "fixed", "scores": [], "k": s.clusters}
        return kmeans(feats, s.clusters, s.seed), selection
    if distinct < 3:
        return _compact(kmeans(feats, distinct, s.seed)), _no_selection(
            distinct, f"{n} rejected image(s), {distinct} distinct: one cluster each"
        )
    sample = _sample(n, s.seed)
    if s.k_select == "gcd":
        labelled = _confident(outputs, accepted)
        if len(labelled):
            return _select_gcd(feats, sample, outputs, labelled, distinct, s)
        log.warning("No confident known-class image for --k-select gcd; using the silhouette")
    ks = list(range(2, min(s.max_clusters, distinct - 1, len(sample) - 1) + 1))
    scores = [
        silhouette_score(feats[sample], kmeans(feats[sample], k, s.seed), random_state=s.seed)
        for k in ks
    ]
    best = ks[int(np.argmax(scores))]
    selection = {
        "rule": "silhouette",
        "sampled": len(sample),
        "scores": [{"k": k, "score": round(float(v), 6)} for k, v in zip(ks, scores, strict=True)],
        "k": best,
    }
    return kmeans(feats, best, s.seed), selection


def kmeans(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means labels 0..k-1 (scikit-learn, `N_INIT` restarts, seeded)."""
    if k == 1:
        return np.zeros(len(x), np.int64)
    return KMeans(n_clusters=k, n_init=N_INIT, random_state=seed).fit_predict(x).astype(np.int64)


def _compact(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 0..m-1 in order of first appearance of the used values."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first))
    return rank[inverse].astype(np.int64)


def _sample(n: int, seed: int) -> np.ndarray:
    """At most SELECT_SAMPLE image indices, the same for every k."""
    if n <= SELECT_SAMPLE:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, SELECT_SAMPLE, replace=False))


def _confident(outputs: Outputs, accepted: np.ndarray) -> np.ndarray:
    """Rows of the LABELLED_PER_CLASS highest-scoring accepted images of each predicted class."""
    rows = np.flatnonzero(accepted)
    pred, score = outputs.pred[rows], outputs.score[rows]
    keep = []
    for c in np.unique(pred):
        mine = rows[pred == c]
        keep.append(mine[np.argsort(-score[pred == c], kind="stable")[:LABELLED_PER_CLASS]])
    return np.sort(np.concatenate(keep)) if keep else rows


def _select_gcd(
    feats: np.ndarray,
    sample: np.ndarray,
    outputs: Outputs,
    labelled: np.ndarray,
    distinct: int,
    s: DiscoverSettings,
) -> tuple[np.ndarray, dict]:
    """GCD's rule: the number of new clusters whose joint k-means (labelled + rejected) best
    recovers the labelled part's classes (Hungarian accuracy); smallest k on ties."""
    known = _unit(outputs.features[labelled].astype(np.float32))
    y = outputs.pred[labelled]
    c = len(np.unique(y))
    ks = list(range(1, min(s.max_clusters, distinct, len(sample)) + 1))
    joint = np.concatenate([known, feats[sample]])
    scores = [cluster_accuracy(y, kmeans(joint, c + k, s.seed)[: len(known)]) for k in ks]
    best = ks[int(np.argmax(scores))]
    labels = kmeans(np.concatenate([known, feats]), c + best, s.seed)[len(known) :]
    selection = {
        "rule": "gcd",
        "sampled": len(sample),
        "labelled": len(known),
        "labelled_classes": c,
        "scores": [
            {"k": k, "clusters": c + k, "score": round(float(v), 6)}
            for k, v in zip(ks, scores, strict=True)
        ],
        "k": best,
    }
    return _compact(labels), selection


def cluster_accuracy(true: np.ndarray, pred: np.ndarray) -> float:
    """Share of items whose cluster is matched to their class by the best one-to-one matching
    of clusters and classes (Hungarian, scipy), as GCD measures it."""
    table = contingency_matrix(true, pred)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / len(true))


def _votes(
    feats: np.ndarray,
    labels: np.ndarray,
    k: int,
    vocab: np.ndarray,
    known_text: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per cluster and name: votes (images whose nearest name it is) and mean probability;
    per image: its TOP_NAMES nearest names, and the known class nearer than every name (-1 for
    none)."""
    n, size = len(feats), np.bincount(labels, minlength=k)
    votes = np.zeros((k, len(vocab)), np.int64)
    soft = np.zeros((k, len(vocab)))
    top_n = min(TOP_NAMES, len(vocab))
    image_top = np.full((n, TOP_NAMES), -1, np.int64)
    known_vote = np.full(n, -1, np.int64)
    for start in range(0, n, CHUNK):
        part = slice(start, start + CHUNK)
        sims = feats[part] @ vocab.T
        lab = labels[part]
        near = np.argpartition(-sims, top_n - 1, axis=1)[:, :top_n]
        near = np.take_along_axis(near, np.argsort(-np.take_along_axis(sims, near, 1), axis=1), 1)
        image_top[part, :top_n] = near
        np.add.at(votes, (lab, near[:, 0]), 1)
        prob = softmax(LOGIT_SCALE * sims, axis=1)
        for c in np.unique(lab):
            soft[c] += prob[lab == c].sum(0)
        to_known = feats[part] @ known_text.T
        known_vote[part] = np.where(to_known.max(1) > sims.max(1), to_known.argmax(1), -1)
    return votes, soft / size[:, None], image_top, known_vote


def assign_names(score: np.ndarray) -> np.ndarray:
    """One different name per cluster (Hungarian, maximising the total score); -1 for the
    clusters left without one when there are more clusters than names.

    Only each cluster's k best names can be in an optimal assignment (a cluster given a worse
    name always has one of its k best free), so the assignment runs on their union.
    """
    k, v = score.shape
    top = np.argsort(-score, axis=1, kind="stable")[:, :k]
    candidates = np.unique(top)
    rows, cols = linear_sum_assignment(score[:, candidates], maximize=True)
    names = np.full(k, -1, np.int64)
    names[rows] = candidates[cols]
    return names


# Evaluation on labelled data (the testbed): how well the groups and names match the truth.


def evaluate_discovery(found: Discovery, true_names: list[str], known: list[str]) -> dict:
    """Cluster accuracy (Hungarian), NMI and ARI over all rejected images (each with its own
    class, known or not); the chosen k against the unknown classes present; naming accuracy
    over the rejected images of unknown classes (their cluster's name is their class; their
    class is among its top names); the clusters flagged likely known against those whose
    majority is a known class. `true_names`: the class of each rejected image."""
    names = {c.id: c for c in found.clusters}
    assigned = [names[c].name for c in found.cluster]
    top = [[n for n, _ in names[c].top_names] for c in found.cluster]
    scores = grouping_scores(true_names, found.cluster, assigned, top, known)
    truly_known = []
    for c in found.clusters:
        members = [t for t, cl in zip(true_names, found.cluster, strict=True) if cl == c.id]
        majority = max(set(members), key=members.count)
        truly_known.append(_key(majority) in {_key(n) for n in known})
    flags = [c.likely_known for c in found.clusters]
    scores["likely_known_clusters"] = sum(flags)
    scores["known_majority_clusters"] = sum(truly_known)
    scores["likely_known_agreement"] = (
        float(np.mean(np.equal(flags, truly_known))) if flags else None
    )
    return scores


def evaluate_per_image(found: Discovery, true_names: list[str], known: list[str]) -> dict:
    """The no-clustering baseline: every rejected image named by its own nearest vocabulary
    name; the images sharing a name form a group."""
    top = [[found.vocabulary[i] for i in row if i >= 0] for row in found.image_top]
    first = [t[0] for t in top]
    groups = np.unique(first, return_inverse=True)[1].reshape(-1)
    return grouping_scores(true_names, groups, first, top, known)


def grouping_scores(
    true_names: list[str],
    groups: np.ndarray,
    names: list[str | None],
    top: list[list[str]],
    known: list[str],
) -> dict:
    """The scores of `evaluate_discovery` for any grouping and naming of the rejected images."""
    truth = np.array([_key(t) for t in true_names])
    known_keys = {_key(n) for n in known}
    unknown = np.array([t not in known_keys for t in truth], dtype=bool)
    out = {
        "rejected": len(truth),
        "rejected_unknown": int(unknown.sum()),
        "classes": len(set(truth)),
        "true_k": len(set(truth[unknown])),
        "k": len(np.unique(groups)),
        "cluster_acc": None,
        "nmi": None,
        "ari": None,
        "name_top1": None,
        "name_top5": None,
    }
    if not len(truth):
        return out
    out["cluster_acc"] = cluster_accuracy(truth, np.asarray(groups))
    out["nmi"] = float(normalized_mutual_info_score(truth, groups))
    out["ari"] = float(adjusted_rand_score(truth, groups))
    if unknown.any():
        idx = np.flatnonzero(unknown)
        out["name_top1"] = float(np.mean([_key(names[i] or "") == truth[i] for i in idx]))
        out["name_top5"] = float(
            np.mean([truth[i] in {_key(n) for n in top[i][:TOP_NAMES]} for i in idx])
        )
    return out


def _key(name: str) -> str:
    return normalize_name(name)
