"""Property tests: the text parsers read back what was written, in any spelling of the file,
and the metrics agree with scikit-learn and with brute-force definitions on random inputs."""

import tempfile
import warnings
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

from ueo.data import OOD, load_image_set
from ueo.metrics import compute_metrics
from ueo.names import normalize_name, parse_classes

pytestmark = pytest.mark.usefixtures("single_thread")
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Names and path parts: letters and digits of any script, spaces, underscores, some punctuation.
CHARS = st.characters(categories=("L", "N"), include_characters=" _-'()&+")
LINE_ENDINGS = st.sampled_from(["\n", "\r\n", "\r"])
ENCODINGS = st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-32"])
BLANKS = st.sampled_from(["", " ", "\t", "  \t "])


def trimmed(text: str) -> bool:
    return bool(text) and text == text.strip()


@contextmanager
def written(text: str, encoding: str):
    """A temporary file.txt holding `text` in `encoding` (hypothesis runs many examples: a
    function-scoped tmp_path would be shared by all of them)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "file.txt"
        path.write_bytes(text.encode(encoding))
        yield path


# --- image lists -----------------------------------------------------------------------------

PART = st.text(CHARS, min_size=1, max_size=12).filter(trimmed)
REL_PATH = (
    st.lists(PART, min_size=1, max_size=3)
    .map("/".join)
    .filter(lambda p: not p.startswith("#") and trimmed(p))
)
ENTRY = st.tuples(
    REL_PATH,
    st.integers(0, 10**6),
    st.sampled_from([" ", "\t", "   ", " \t"]),  # between path and label
    st.sampled_from(["", "0", "00"]),  # leading zeros
    BLANKS,  # after the label
)


@SETTINGS
@given(
    entries=st.lists(ENTRY, min_size=1, max_size=8),
    extra=st.lists(st.sampled_from(["", "  ", "# a comment", "  # indented comment"]), max_size=4),
    seed=st.integers(0, 2**16),
    newline=LINE_ENDINGS,
    encoding=ENCODINGS,
    n_known=st.integers(1, 20),
)
def test_image_list_round_trip(entries, extra, seed, newline, encoding, n_known):
    lines = [f"{rel}{sep}{zeros}{label}{tail}" for rel, label, sep, zeros, tail in entries]
    rng = np.random.default_rng(seed)
    for line in extra:  # blank and comment lines anywhere
        lines.insert(int(rng.integers(0, len(lines) + 1)), line)
    with written(newline.join(lines) + newline * int(rng.integers(0, 2)), encoding) as path:
        images = load_image_set(path, ["c"] * n_known, check_exists=False)
    assert images.paths == [str(path.parent / rel) for rel, *_ in entries]
    assert images.labels.tolist() == [label if label < n_known else OOD for _, label, *_ in entries]


# --- class lists -----------------------------------------------------------------------------

NAME = st.text(CHARS, min_size=1, max_size=20).filter(lambda n: normalize_name(n) != "")
NAMES = st.lists(NAME, min_size=1, max_size=10, unique_by=normalize_name).map(
    lambda names: [n.strip() for n in names]
)


@SETTINGS
@given(
    names=NAMES,
    pads=st.lists(st.tuples(BLANKS, BLANKS, st.integers(0, 2)), min_size=10, max_size=10),
    newline=LINE_ENDINGS,
    encoding=ENCODINGS,
)
def test_class_file_round_trip(names, pads, newline, encoding):
    lines = []
    for name, (before, after, blank_lines) in zip(names, pads, strict=False):
        lines += [before] * blank_lines + [f"{before}{name}{after}"]
    with written(newline.join(lines) + newline, encoding) as path:
        assert parse_classes(str(path)) == names


COMMA_NAME = NAME.filter(lambda n: not set(n) & set("./\\~"))


@SETTINGS
@given(
    names=st.lists(COMMA_NAME, min_size=1, max_size=10, unique_by=normalize_name),
    pads=st.lists(st.sampled_from(["", " ", "  "]), min_size=20, max_size=20),
)
def test_comma_list_round_trip(names, pads):
    spec = ",".join(f"{pads[2 * i]}{n}{pads[2 * i + 1]}" for i, n in enumerate(names))
    assert parse_classes(spec) == [n.strip() for n in names]


# --- metrics ---------------------------------------------------------------------------------


def brute_force(pred, score, label):
    """The metrics from their definitions, in exact arithmetic."""
    ids = [i for i in range(len(label)) if label[i] >= 0]
    oods = [i for i in range(len(label)) if label[i] < 0]
    out = {"acc": None, "gacc": None, "auroc": None, "fpr95": None}
    if ids:
        classes = sorted({label[i] for i in ids})
        per_class = [
            Fraction(
                sum(pred[i] == c for i in ids if label[i] == c), sum(label[i] == c for i in ids)
            )
            for c in classes
        ]
        out["acc"] = sum(per_class) / len(classes)
        out["gacc"] = Fraction(sum(pred[i] == label[i] for i in ids), len(ids))
    if ids and oods:
        # AUROC: the fraction of (ID, OOD) pairs that the score orders right, ties half.
        right = sum(
            1 if score[i] > score[j] else Fraction(1, 2) if score[i] == score[j] else 0
            for i in ids
            for j in oods
        )
        out["auroc"] = Fraction(right) / (len(ids) * len(oods))
        # FPR95: "ID" means score >= t; the FPR at the first (highest) threshold with TPR >= 95%.
        for t in sorted({score[i] for i in range(len(score))}, reverse=True):
            tp = sum(score[i] >= t for i in ids)
            if 20 * tp >= 19 * len(ids):
                out["fpr95"] = Fraction(sum(score[j] >= t for j in oods), len(oods))
                break
    acc, auroc = out["acc"], out["auroc"]
    out["h"] = (
        None
        if acc is None or auroc is None or acc + auroc == 0
        else (2 * acc * auroc / (acc + auroc))
    )
    return out


@st.composite
def evaluated_sets(draw):
    n = draw(st.integers(1, 40))
    n_known = draw(st.integers(1, 5))
    kind = draw(st.sampled_from(["mixed", "all known", "all unknown", "one class"]))
    low = {"mixed": -1, "all known": 0, "all unknown": -1, "one class": 0}[kind]
    high = {"mixed": n_known - 1, "all known": n_known - 1, "all unknown": -1, "one class": 0}
    label = draw(st.lists(st.integers(low, high[kind]), min_size=n, max_size=n))
    if kind == "one class":  # one known class, with or without unknown images
        label = [lb if draw(st.booleans()) else -1 for lb in label]
    pred = draw(st.lists(st.integers(0, n_known - 1), min_size=n, max_size=n))
    # Few distinct scores: ties everywhere, between and within ID and OOD.
    levels = draw(st.integers(1, 8))
    score = np.array(draw(st.lists(st.integers(0, levels), min_size=n, max_size=n))) / levels
    if draw(st.booleans()):  # log-probability-like scores reach -inf and +inf
        score[score == 0], score[score == 1] = -np.inf, np.inf
    return np.array(pred), score, np.array(label)


@settings(max_examples=400, deadline=None)
@given(evaluated_sets())
def test_metrics_match_definitions_and_sklearn(case):
    pred, score, label = case
    m = compute_metrics(pred, score, label)
    ref = brute_force(pred.tolist(), score.tolist(), label.tolist())
    for key in ("acc", "gacc", "auroc", "fpr95", "h"):
        if ref[key] is None:
            assert m[key] is None, key
        else:
            assert m[key] == pytest.approx(float(ref[key]), abs=1e-12), key
    ids = label >= 0
    assert (m["n"], m["n_id"], m["n_ood"]) == (len(label), ids.sum(), (~ids).sum())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # y_pred classes absent from y_true
        if ids.any():
            assert m["acc"] == pytest.approx(balanced_accuracy_score(label[ids], pred[ids]))
            assert m["gacc"] == pytest.approx(accuracy_score(label[ids], pred[ids]))
    if ids.any() and (~ids).any() and np.isfinite(score).all():
        assert m["auroc"] == pytest.approx(roc_auc_score(ids, score))


@settings(max_examples=200, deadline=None)
@given(
    n_id=st.integers(1, 60),
    n_ood=st.integers(1, 60),
    seed=st.integers(0, 2**16),
)
def test_fpr95_on_continuous_scores(n_id, n_ood, seed):
    rng = np.random.default_rng(seed)
    score = np.concatenate([rng.normal(1, 1, n_id), rng.normal(0, 1, n_ood)])
    label = np.array([0] * n_id + [-1] * n_ood)
    m = compute_metrics(np.zeros(n_id + n_ood, int), score, label)
    ref = brute_force([0] * len(label), score.tolist(), label.tolist())
    assert m["fpr95"] == pytest.approx(float(ref["fpr95"]), abs=1e-12)
    assert m["auroc"] == pytest.approx(float(ref["auroc"]), abs=1e-12)


def test_infinite_scores_are_ordered():
    # A log-probability score is -inf for an image the model rules out: a valid, lowest score.
    label = np.array([0, 0, -1, -1])
    m = compute_metrics(label.clip(0), np.array([np.inf, 0.5, 0.1, -np.inf]), label)
    assert m["auroc"] == 1.0 and m["fpr95"] == 0.0


def test_nan_scores_are_an_error_not_a_rank():
    label = np.array([0, 0, -1, -1])
    with pytest.raises(ValueError, match="1 score"):
        compute_metrics(label.clip(0), np.array([np.nan, 0.5, 0.1, 0.2]), label)
