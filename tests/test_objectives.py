"""The objectives of SPEC.md against values computed by hand."""

import math

import numpy as np
import pytest
import torch

from ueo.adaptation import ORACLE_OOD_WEIGHT, objective, sample_weights
from ueo.data import OOD, UNLABELED
from ueo.errors import UeoError
from ueo.objectives import entmin_loss, entropy, infomax_loss, mcm_score, ueo_loss

pytestmark = pytest.mark.usefixtures("single_thread")

# Two samples, three classes. softmax(log([1, 1, 2])) = [1/4, 1/4, 1/2] and
# softmax([0, 0, 0]) = [1/3, 1/3, 1/3].
LOGITS = torch.tensor([[0.0, 0.0, math.log(2.0)], [0.0, 0.0, 0.0]])
P1 = [0.25, 0.25, 0.5]
P2 = [1 / 3, 1 / 3, 1 / 3]


def h(q):
    """H(q) = -sum q log(q + 1e-5), written out."""
    return -sum(x * math.log(x + 1e-5) for x in q)


H1 = -(0.25 * math.log(0.25 + 1e-5) * 2 + 0.5 * math.log(0.5 + 1e-5))
H2 = -3 * (1 / 3) * math.log(1 / 3 + 1e-5)


def test_entropy_by_hand():
    assert H1 == pytest.approx(1.5 * math.log(2), abs=1e-4)  # the epsilon is tiny
    assert H2 == pytest.approx(math.log(3), abs=1e-4)
    got = entropy(torch.tensor([P1, P2], dtype=torch.float64))
    assert got.tolist() == pytest.approx([H1, H2], rel=1e-12)
    # A one-hot distribution has (almost) zero entropy: 1 * log(1 + 1e-5).
    one_hot = float(entropy(torch.tensor([0.0, 1.0, 0.0])))
    assert one_hot == pytest.approx(-math.log(1 + 1e-5), abs=1e-7)


def test_ueo_loss_by_hand():
    w = [0.8, 0.2]
    conditional = (0.8 * H1 + 0.2 * H2) / (0.8 + 0.2)
    # 1/w = [1.25, 5]: the marginal is 0.2 * p1 + 0.8 * p2.
    marginal = [0.2 * 0.25 + 0.8 / 3, 0.2 * 0.25 + 0.8 / 3, 0.2 * 0.5 + 0.8 / 3]
    assert sum(marginal) == pytest.approx(1.0)
    h_marginal = -sum(m * math.log(m + 1e-5) for m in marginal)
    for trade in (1.0, 0.5, 2.0):
        expected = conditional - trade * h_marginal
        got = ueo_loss(LOGITS, torch.tensor(w), trade)
        assert float(got) == pytest.approx(expected, rel=1e-5)
    assert float(ueo_loss(LOGITS, torch.tensor(w))) == pytest.approx(conditional - h_marginal)


def test_ueo_loss_unnormalised_weights_and_other_numbers():
    # Weights need not sum to one; a 2x3 example with generic logits.
    logits = [[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]]
    w = [0.6, 0.3]
    probs = []
    for row in logits:
        e = [math.exp(v) for v in row]
        probs.append([x / sum(e) for x in e])
    cond = (0.6 * h(probs[0]) + 0.3 * h(probs[1])) / 0.9
    inv = [1 / 0.6, 1 / 0.3]
    marg = [(inv[0] * probs[0][k] + inv[1] * probs[1][k]) / sum(inv) for k in range(3)]
    expected = cond - 1.0 * h(marg)
    assert float(ueo_loss(torch.tensor(logits), torch.tensor(w), 1.0)) == pytest.approx(
        expected, rel=1e-5
    )


def test_trade_zero_is_weighted_entropy():
    w = torch.tensor([0.8, 0.2])
    expected = (0.8 * H1 + 0.2 * H2) / 1.0
    assert float(ueo_loss(LOGITS, w, 0.0)) == pytest.approx(expected, rel=1e-6)


def test_uniform_weights_make_ueo_infomax():
    marginal = [(0.25 + 1 / 3) / 2, (0.25 + 1 / 3) / 2, (0.5 + 1 / 3) / 2]
    expected = (H1 + H2) / 2 - h(marginal)
    assert float(infomax_loss(LOGITS)) == pytest.approx(expected, abs=1e-6)
    logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(0)) * 3
    for c in (1.0, 0.37, 5.0):  # any constant weight
        assert torch.allclose(ueo_loss(logits, torch.full((6,), c), 0.7), infomax_loss(logits, 0.7))


def test_entmin_is_mean_entropy():
    assert float(entmin_loss(LOGITS)) == pytest.approx((H1 + H2) / 2, rel=1e-6)
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(entmin_loss(logits), ueo_loss(logits, torch.ones(5), 0.0))


def test_loss_is_fp32_for_low_precision_logits():
    for dtype in (torch.float16, torch.bfloat16):
        loss = ueo_loss(LOGITS.to(dtype), torch.tensor([0.8, 0.2], dtype=dtype))
        assert loss.dtype == torch.float32
        assert float(loss) == pytest.approx(
            float(ueo_loss(LOGITS, torch.tensor([0.8, 0.2]))), abs=1e-2
        )


def test_mcm_is_max_softmax_of_raw_cosines():
    cos = torch.tensor([[0.3, 0.1], [0.2, 0.2], [-0.1, 0.4]])
    expected = [
        math.exp(0.3) / (math.exp(0.3) + math.exp(0.1)),
        0.5,
        math.exp(0.4) / (math.exp(-0.1) + math.exp(0.4)),
    ]
    assert mcm_score(cos).tolist() == pytest.approx(expected, rel=1e-6)
    # T = 1, no logit scale: cosines of CLIP give scores close to 1/K, not close to 1.
    assert float(mcm_score(torch.tensor([[0.30, 0.25, 0.20, 0.22]]))) < 0.3
    assert mcm_score(cos.half()).dtype == torch.float32


def test_sample_weights_per_method():
    cos = np.array([[0.3, 0.1], [0.2, 0.2], [0.0, 0.5]], dtype=np.float32)
    labels = np.array([0, OOD, 1])
    ueo = sample_weights("ueo", cos, labels)
    assert ueo.tolist() == pytest.approx(mcm_score(torch.from_numpy(cos)).tolist())
    assert ueo[0] == pytest.approx(1 / (1 + math.exp(-0.2)), rel=1e-6)
    oracle = sample_weights("ueo-oracle", cos, labels)
    assert oracle.tolist() == pytest.approx([1.0, ORACLE_OOD_WEIGHT, 1.0])
    assert ORACLE_OOD_WEIGHT == 1e-3
    for method in ("infomax", "entmin"):
        assert sample_weights(method, cos, labels).tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(UeoError, match="labels"):
        sample_weights("ueo-oracle", cos, np.array([UNLABELED] * 3))


def test_objective_dispatch():
    w = torch.tensor([0.8, 0.2])
    assert torch.equal(objective("ueo", LOGITS, w, 0.5), ueo_loss(LOGITS, w, 0.5))
    assert torch.equal(objective("ueo-oracle", LOGITS, w, 0.5), ueo_loss(LOGITS, w, 0.5))
    assert torch.equal(objective("infomax", LOGITS, w, 0.5), infomax_loss(LOGITS, 0.5))
    assert torch.equal(objective("entmin", LOGITS, w, 0.5), entmin_loss(LOGITS))
    with pytest.raises(UeoError):
        objective("zeroshot", LOGITS, w, 1.0)
