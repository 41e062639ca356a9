"""Label-free scores (ueo.diagnostics): hand-computed values on small matrices, SND and the
nuclear norm against plain reference implementations, and what an evaluation records."""

import math

import numpy as np
import pytest
import torch

import ueo.diagnostics as diagnostics
from ueo.diagnostics import (
    SCORE_KEYS,
    agreement,
    class_ami,
    information_maximization,
    label_free,
    mean_entropy,
    nuclear_norm,
    otsu_separability,
    pairwise_sample,
    probabilities,
    rejected_share,
    soft_neighborhood_density,
    ueo_objective,
)
from ueo.inference import Outputs

LN2 = math.log(2)


def test_entropy_and_information_maximization_by_hand():
    p = np.array([[0.5, 0.5], [1.0, 0.0]])
    assert mean_entropy(p) == pytest.approx(LN2 / 2)
    marginal = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))  # of the mean (0.75, 0.25)
    assert information_maximization(p) == pytest.approx(marginal - LN2 / 2)
    # one class for everything: confident but not diverse
    assert information_maximization(np.array([[1.0, 0.0]] * 3)) == pytest.approx(0.0)


def test_probabilities_are_the_training_softmax():
    cos = np.array([[0.30, 0.29, 0.10]], dtype=np.float32)
    expected = torch.softmax(100 * torch.tensor(cos, dtype=torch.float64), dim=1).numpy()
    np.testing.assert_allclose(probabilities(cos), expected, rtol=1e-12)


def _neighbourhood_entropy(z: list[float]) -> float:
    q = np.exp(np.array(z) - max(z))
    q /= q.sum()
    return float(-(q * np.log(q)).sum())


def test_snd_by_hand():
    # Two images predict class 0, one class 1: cosines 1 between the first two, 0 otherwise.
    p = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    for t in (1.0, 0.05):
        same = math.log(1 + math.exp(-1 / t)) + (1 / t) * math.exp(-1 / t) / (1 + math.exp(-1 / t))
        assert _neighbourhood_entropy([1 / t, 0.0]) == pytest.approx(same)
        expected = (2 * same + LN2) / 3  # the third image's neighbours are equally far
        assert soft_neighborhood_density(p, t) == pytest.approx(expected)
    # Rows are L2-normalised first: scaling a row changes nothing.
    assert soft_neighborhood_density(p * [[2.0], [1.0], [3.0]], 1.0) == pytest.approx(
        soft_neighborhood_density(p, 1.0)
    )


def reference_snd(p: np.ndarray, temperature: float = 0.05) -> float:
    """SND written plainly: the whole N x N matrix, self-similarity removed."""
    x = torch.nn.functional.normalize(torch.tensor(p, dtype=torch.float64), dim=1)
    sim = x @ x.t()
    n = len(x)
    sim = sim[~torch.eye(n, dtype=torch.bool)].view(n, n - 1)
    q = torch.softmax(sim / temperature, dim=1)
    return float(-(q * torch.log(q)).sum(dim=1).mean())


@pytest.mark.parametrize(("n", "k", "chunk"), [(40, 3, 7), (300, 10, 1024), (1030, 5, 1024)])
def test_snd_matches_a_plain_implementation(n, k, chunk, monkeypatch):
    monkeypatch.setattr(diagnostics, "CHUNK", chunk)
    rng = np.random.default_rng(n)
    p = probabilities(0.2 + 0.02 * rng.standard_normal((n, k)))
    assert soft_neighborhood_density(p) == pytest.approx(reference_snd(p), rel=1e-9)


def test_nuclear_norm_by_hand_and_against_torch():
    p = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # singular values sqrt(2) and 1
    assert nuclear_norm(p) == pytest.approx((math.sqrt(2) + 1) / 3)
    rng = np.random.default_rng(0)
    for n, k in ((5, 8), (200, 10), (64, 65)):
        p = probabilities(0.2 + 0.03 * rng.standard_normal((n, k)))
        expected = torch.linalg.matrix_norm(torch.tensor(p), ord="nuc").item() / n
        # from the Gram matrix, a singular value near 0 is the root of a rounded eigenvalue
        assert nuclear_norm(p) == pytest.approx(expected, rel=1e-7)


def test_class_ami_by_hand():
    # Two clear clusters that the predictions follow: AMI 1, whatever the class order.
    cos = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.2, 0.8]])
    assert class_ami(cos) == pytest.approx(1.0)
    assert class_ami(cos[:, ::-1]) == pytest.approx(1.0)
    # Two clusters, but every image is predicted as class 0: no information, AMI 0.
    cos = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.55], [0.55, 0.5]])
    assert class_ami(cos) == pytest.approx(0.0)


def test_agreement_by_hand():
    assert agreement(np.array([0, 1, 2, 2]), np.array([0, 1, 1, 0])) == 0.5


def test_otsu_separability_by_hand():
    assert otsu_separability(np.array([0.0, 0.0, 1.0, 1.0])) == pytest.approx(1.0)
    # [0, 1, 2]: total variance 2/3; either split gives (1/3)(2/3)(1.5)^2 = 0.5 between groups
    assert otsu_separability(np.array([2.0, 0.0, 1.0])) == pytest.approx(0.75)
    # a split never falls inside a tie: [0, 1, 1, 1] splits only as {0} | {1, 1, 1}
    assert otsu_separability(np.array([0.0, 1.0, 1.0, 1.0])) == pytest.approx(1.0)
    assert math.isnan(otsu_separability(np.array([0.3, 0.3])))
    # scale and shift do not matter
    s = np.random.default_rng(1).random(50)
    assert otsu_separability(3 * s + 7) == pytest.approx(otsu_separability(s))


def test_rejected_share_is_below_the_otsu_threshold():
    assert rejected_share(np.array([0.1, 0.1, 0.9, 0.9, 0.9])) == pytest.approx(0.4)


def test_ueo_objective_with_equal_weights_is_information_maximization():
    cos = np.array([[0.30, 0.25], [0.20, 0.28], [0.31, 0.30]], dtype=np.float32)
    zeroshot = np.array([[0.3, 0.1], [0.1, 0.3], [0.3, 0.1]], dtype=np.float32)  # equal MCM
    # UEO's loss uses the reference's epsilon inside the logarithm: equal up to ~1e-5
    assert ueo_objective(cos, zeroshot) == pytest.approx(
        information_maximization(probabilities(cos)), abs=1e-4
    )


def test_pairwise_sample_is_all_rows_or_a_fixed_sample():
    np.testing.assert_array_equal(pairwise_sample(10, limit=20), np.arange(10))
    rows = pairwise_sample(100, limit=30)
    assert len(rows) == 30 and len(set(rows.tolist())) == 30 and (np.diff(rows) > 0).all()
    np.testing.assert_array_equal(rows, pairwise_sample(100, limit=30))


def test_label_free_skips_unreadable_rows_and_names_every_score():
    rng = np.random.default_rng(3)
    cos = (0.2 + 0.02 * rng.standard_normal((30, 4))).astype(np.float32)
    zs = (cos + 0.01 * rng.standard_normal((30, 4))).astype(np.float32)
    valid = np.ones(30, dtype=bool)
    valid[[2, 7]] = False
    broken = cos.copy()
    broken[~valid] = np.nan
    scores = label_free(Outputs(broken, valid), Outputs(zs, np.ones(30, dtype=bool)))
    assert set(scores) == set(SCORE_KEYS)
    p = probabilities(cos[valid])
    assert scores["snd"] == pytest.approx(soft_neighborhood_density(p))
    assert scores["nuclear"] == pytest.approx(nuclear_norm(p))
    assert scores["entropy"] == pytest.approx(mean_entropy(p))
    expected = agreement(cos[valid].argmax(1), zs[valid].argmax(1))
    assert scores["agreement"] == pytest.approx(expected)
    # against itself, a model agrees fully
    assert label_free(Outputs(zs, valid), Outputs(zs, valid))["agreement"] == 1.0


def test_label_free_of_one_image_is_none_where_undefined():
    one = Outputs(np.array([[0.3, 0.2]], dtype=np.float32), np.ones(1, dtype=bool))
    scores = label_free(one, one)
    assert scores["snd"] is None and scores["mcm_split"] is None
    assert scores["agreement"] == 1.0 and scores["entropy"] is not None
