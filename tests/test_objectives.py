"""The objectives of docs/spec.md and the method registry, against values computed by hand."""

import math

import pytest
import torch

from ueo.errors import UeoError
from ueo.methods import METHODS, Batch, Method, get_method, method_names, register
from ueo.names import OOD, UNLABELED
from ueo.objectives import entmin_loss, entropy, infomax_loss, mcm_score, ueo_loss
from ueo.recipe import Recipe

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


def softmax(row):
    e = [math.exp(v - max(row)) for v in row]
    return [x / sum(e) for x in e]


def weighted_ueo_by_hand(probs, w, trade):
    """Sum_i w_i H(p_i) / sum w  -  trade * H(sum_i p_i / w_i / sum 1/w), written out."""
    conditional = sum(wi * h(p) for wi, p in zip(w, probs, strict=True)) / sum(w)
    inv = [1 / wi for wi in w]
    k = len(probs[0])
    marginal = [sum(v * p[j] for v, p in zip(inv, probs, strict=True)) / sum(inv) for j in range(k)]
    return conditional - trade * h(marginal)


def test_oracle_weights_are_one_plus_eps_known_and_eps_unknown():
    cos = torch.tensor([[0.3, 0.1], [0.2, 0.2], [0.0, 0.5]])
    labels = torch.tensor([0, OOD, 1])
    fixed = get_method("ueo-oracle").fixed(cos, labels, Recipe(method="ueo-oracle"))
    assert set(fixed) == {"weight"}
    assert fixed["weight"].tolist() == pytest.approx([1.001, 0.001, 1.001], rel=1e-6)
    # The oracle's UEO loss is the weighted objective with exactly those weights.
    batch = Batch(
        logits=LOGITS,
        image_features=torch.zeros(2, 4),
        text_features=torch.zeros(3, 4),
        fixed={"weight": fixed["weight"][:2]},
        recipe=Recipe(method="ueo-oracle", trade=0.5),
    )
    expected = weighted_ueo_by_hand([P1, P2], [1.001, 0.001], 0.5)
    # The unknown sample barely counts in the entropy term, and dominates the marginal.
    assert expected == pytest.approx(
        (1.001 * H1 + 0.001 * H2) / 1.002
        - 0.5 * h([(P1[j] / 1.001 + P2[j] / 0.001) / (1 / 1.001 + 1 / 0.001) for j in range(3)])
    )
    assert float(get_method("ueo-oracle").loss(batch)) == pytest.approx(expected, rel=1e-5)
    assert get_method("ueo-oracle").needs_labels and not get_method("ueo").needs_labels


def test_ueo_weights_are_zero_shot_mcm():
    cos = torch.tensor([[0.3, 0.1], [0.2, 0.2], [float("nan"), float("nan")]])
    labels = torch.full((3,), UNLABELED)
    weight = get_method("ueo").fixed(cos, labels, Recipe())["weight"]
    # MCM of raw cosines (T = 1); an unreadable image's NaN row counts as all-equal cosines.
    assert weight.tolist() == pytest.approx([1 / (1 + math.exp(-0.2)), 0.5, 0.5], rel=1e-6)


# A 3-sample, 4-class batch: scaled logits, the zero-shot cosines they came from, and labels.
COS = [[0.31, 0.22, 0.20, 0.25], [0.18, 0.30, 0.29, 0.21], [0.24, 0.24, 0.26, 0.23]]
LABELS = [0, 1, OOD]
TRADE = 0.7


def _by_hand(method: str) -> float:
    """Each trainable method's objective on COS / LABELS, from the formulas of docs/spec.md."""
    probs = [softmax([100 * c for c in row]) for row in COS]
    if method == "entmin":
        return sum(h(p) for p in probs) / len(probs)
    if method == "infomax":
        return weighted_ueo_by_hand(probs, [1.0, 1.0, 1.0], TRADE)
    if method == "ueo":
        mcm = [max(softmax(row)) for row in COS]
        return weighted_ueo_by_hand(probs, mcm, TRADE)
    if method == "ueo-oracle":
        oracle = [1.001 if y != OOD else 0.001 for y in LABELS]
        return weighted_ueo_by_hand(probs, oracle, TRADE)
    if method == "upl":  # cross-entropy to the zero-shot argmax (here every image is selected)
        targets = [row.index(max(row)) for row in COS]
        return -sum(math.log(p[t]) for p, t in zip(probs, targets, strict=True)) / len(probs)
    if method == "pouf":  # features eye(3, 8) and eye(4, 8): feature cosine 1 on the diagonal
        n, k = len(COS), len(COS[0])
        cost = [[0.0 if i == j else 1.0 for j in range(k)] for i in range(n)]
        columns = [softmax([100 * COS[i][j] for i in range(n)]) for j in range(k)]
        forward = sum(cost[i][j] * probs[i][j] for i in range(n) for j in range(k)) / n
        backward = sum(cost[i][j] * columns[j][i] for i in range(n) for j in range(k)) / k
        mean = [sum(p[j] for p in probs) / n for j in range(k)]
        marginal = -sum(q * math.log(q + 1e-6) for q in mean)
        return 1.0 * (forward + backward) + 0.3 * (sum(h(p) for p in probs) / n - marginal)
    raise AssertionError(f"no hand computation for method {method!r}: add one with its test")


@pytest.mark.parametrize("name", method_names(trains_only=True))
def test_every_registered_method_matches_its_objective_by_hand(name):
    method = get_method(name)
    recipe = Recipe(method=name, trade=TRADE)
    cos = torch.tensor(COS)
    fixed = method.fixed(cos, torch.tensor(LABELS), recipe) if method.fixed else {}
    for value in fixed.values():
        assert value.shape[0] == len(COS)  # per-sample values
    batch = Batch(
        logits=100 * cos,
        image_features=torch.eye(3, 8),
        text_features=torch.eye(4, 8),
        fixed=fixed,
        recipe=recipe,
    )
    loss = method.loss(batch)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert float(loss) == pytest.approx(_by_hand(name), rel=1e-5, abs=1e-6)


def test_methods_differ_on_the_same_batch():
    """The hand computations are not all one number (the test above could not see a mix-up)."""
    values = [_by_hand(m) for m in method_names(trains_only=True)]
    assert len({round(v, 6) for v in values}) == len(values)


def test_zeroshot_does_not_train_and_the_registry_is_strict():
    assert not get_method("zeroshot").trains and get_method("zeroshot").loss is None
    assert "zeroshot" in method_names() and "zeroshot" not in method_names(trains_only=True)
    with pytest.raises(UeoError, match="Unknown method 'magic'; choose from zeroshot, "):
        get_method("magic")
    with pytest.raises(UeoError, match="magic"):
        Recipe(method="magic").validate()
    with pytest.raises(ValueError, match="already registered"):
        register(Method("ueo", "a second definition"))
    assert list(METHODS) == method_names()
