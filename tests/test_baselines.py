"""POUF and UPL: their losses and UPL's selection against hand computations, the registry
entries and the recipe options, and both methods end to end through `ueo adapt`."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import load_calibrated

from ueo.bench.grid import default_methods
from ueo.cli import main
from ueo.demo.runner import demo_methods
from ueo.errors import UeoError
from ueo.methods import TRAIN_MASK, Batch, get_method, method_names
from ueo.model import CTX_NAME
from ueo.objectives import pouf_im_loss, pouf_loss, pouf_transport_loss, upl_loss, upl_select
from ueo.recipe import Recipe
from ueo.runs import load_adapter


def softmax(xs):
    e = [math.exp(x - max(xs)) for x in xs]
    return [v / sum(e) for v in e]


def loop_transport(cos, scale):
    """POUF's transport loss written with loops over a list-of-lists cosine matrix."""
    b, k = len(cos), len(cos[0])
    forward = sum(
        sum((1 - cos[i][j]) * p for j, p in enumerate(softmax([scale * c for c in cos[i]])))
        for i in range(b)
    )
    backward = 0.0
    for j in range(k):
        plan = softmax([scale * cos[i][j] for i in range(b)])
        backward += sum((1 - cos[i][j]) * plan[i] for i in range(b))
    return forward / b + backward / k


def loop_im(logits):
    probs = [softmax(row) for row in logits]
    b, k = len(probs), len(probs[0])
    cond = sum(-sum(p * math.log(p + 1e-5) for p in row) for row in probs) / b
    marg = [sum(row[j] for row in probs) / b for j in range(k)]
    return cond + sum(q * math.log(q + 1e-6) for q in marg)


def loop_select(cos_rows, k, scale=100.0):
    """UPL's selection by brute force, with ueo's tie rules (lowest class, lowest index)."""
    probs = [softmax([scale * c for c in row]) for row in cos_rows]
    labels = [p.index(max(p)) for p in probs]
    conf = [max(p) for p in probs]
    selected = [False] * len(probs)
    for c in set(labels):
        members = sorted((i for i in range(len(probs)) if labels[i] == c), key=lambda i: -conf[i])
        for i in members[:k]:
            selected[i] = True
    return labels, selected


def unit(angle):
    return [math.cos(angle), math.sin(angle)]


# ---------------------------------------------------------------------------------- POUF


def test_transport_by_hand_on_two_orthogonal_pairs():
    # cos = identity at scale 1: each plan puts e/(1+e) on the matching pair (cost 0) and
    # 1/(1+e) on the other (cost 1), in both directions.
    cos = torch.eye(2)
    off = 1 / (1 + math.e)
    assert pouf_transport_loss(cos, cos).item() == pytest.approx(2 * off, abs=1e-6)


def test_transport_matches_loops_and_the_backward_plan_is_over_the_batch():
    angles_i, angles_t = (0.1, 1.2, 2.0), (0.0, 1.0, 2.5, -0.7)
    img = torch.tensor([unit(a) for a in angles_i])
    txt = torch.tensor([unit(b) for b in angles_t])
    cos = [[math.cos(a - b) for b in angles_t] for a in angles_i]
    got = pouf_transport_loss(7.0 * img @ txt.t(), img @ txt.t()).item()
    assert got == pytest.approx(loop_transport(cos, 7.0), abs=1e-5)
    # One more image changes the other images' text -> image plans: the loss is not a mean
    # of per-image terms.
    more = torch.cat([img, torch.tensor([unit(0.05)])])
    alone = [pouf_transport_loss(7.0 * x @ txt.t(), x @ txt.t()) for x in (img, more)]
    cos_more = cos + [[math.cos(0.05 - b) for b in angles_t]]
    assert alone[1].item() == pytest.approx(loop_transport(cos_more, 7.0), abs=1e-5)


def test_im_term_matches_loops_and_uses_two_epsilons():
    logits = [[2.0, 0.5, -1.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0], [-2.0, 4.0, 0.5]]
    assert pouf_im_loss(torch.tensor(logits)).item() == pytest.approx(loop_im(logits), abs=1e-6)
    # Uniform predictions: log K with epsilon 1e-5 minus log K with epsilon 1e-6, not zero.
    q = 0.25
    expected = -math.log(q + 1e-5) + math.log(q + 1e-6)
    assert expected < -1e-6
    assert pouf_im_loss(torch.zeros(3, 4)).item() == pytest.approx(expected, abs=1e-7)


def test_pouf_loss_weights_its_two_terms():
    angles_i, angles_t = (0.3, 1.1, 2.9, -0.4, 0.8), (0.0, 1.5, 3.0)
    img = torch.tensor([unit(a) for a in angles_i])
    txt = torch.tensor([unit(b) for b in angles_t])
    cos = [[math.cos(a - b) for b in angles_t] for a in angles_i]
    logits = [[100.0 * c for c in row] for row in cos]
    t, im = loop_transport(cos, 100.0), loop_im(logits)
    assert pouf_loss(100.0 * img @ txt.t(), img, txt).item() == pytest.approx(
        t + 0.3 * im, abs=1e-4
    )
    assert pouf_loss(100.0 * img @ txt.t(), img, txt, 0.5, 2.0).item() == pytest.approx(
        0.5 * t + 2.0 * im, abs=1e-4
    )


def test_pouf_loss_is_the_reference_transcription_and_reaches_both_towers():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(9, 16, generator=g, requires_grad=True)
    txt = torch.randn(5, 16, generator=g, requires_grad=True)
    fi, ft = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    sim = fi @ ft.t()
    logits = 100.0 * sim
    # pouf.py:120-141 and 179 with F.softmax.
    s, t = F.softmax(logits, dim=1), F.softmax(logits, dim=0)
    transport = ((1 - sim) * s).sum(1).mean() + ((1 - sim) * t).sum(0).mean()
    m = s.mean(dim=0)
    conditional = torch.mean(torch.sum(-s * torch.log(s + 1e-5), dim=1))
    im = conditional - torch.sum(-m * torch.log(m + 1e-6))
    loss = pouf_loss(logits, fi, ft)
    assert loss.item() == pytest.approx((transport + 0.3 * im).item(), abs=1e-5)
    loss.backward()
    assert img.grad.abs().sum() > 0 and txt.grad.abs().sum() > 0


# ---------------------------------------------------------------------------- UPL selection


def test_top_k_per_predicted_class():
    cos = torch.tensor(
        [
            [0.30, 0.20, 0.10],  # class 0, margin 0.10
            [0.35, 0.20, 0.10],  # class 0, margin 0.15: the most confident of class 0
            [0.25, 0.24, 0.10],  # class 0, margin 0.01: dropped at k = 2
            [0.10, 0.30, 0.29],  # class 1
            [0.10, 0.40, 0.20],  # class 1
            [0.10, 0.20, 0.30],  # class 2, alone
        ]
    )
    labels, selected = upl_select(cos, k=2)
    assert labels.dtype == torch.long and selected.dtype == torch.bool
    assert labels.tolist() == [0, 0, 0, 1, 1, 2]
    assert selected.tolist() == [True, True, False, True, True, True]
    _, top1 = upl_select(cos, k=1)
    assert top1.tolist() == [False, True, False, False, True, True]


def test_confidence_is_softmax_of_100_cos_not_the_cosine_nor_mcm():
    # Row 1 has the larger cosine but a close runner-up. At scale 100 row 0 is the more
    # confident (0.99991 vs 0.982); at MCM's scale 1 row 1 is (0.356 vs 0.390).
    cos = torch.tensor([[0.40, 0.30, 0.30], [0.50, 0.46, 0.0]])
    assert softmax([40.0, 30.0, 30.0])[0] > softmax([50.0, 46.0, 0.0])[0]
    assert softmax([0.40, 0.30, 0.30])[0] < softmax([0.50, 0.46, 0.0])[0]
    assert upl_select(cos, k=1)[1].tolist() == [True, False]
    assert upl_select(cos, k=1, scale=1.0)[1].tolist() == [False, True]


def test_ties_go_to_the_lower_class_then_the_lower_index():
    row = [0.3, 0.1, 0.2]
    _, selected = upl_select(torch.tensor([[0.1, 0.5, 0.0], row, row, row, row]), k=2)
    assert selected.tolist() == [True, True, True, False, False]
    labels, _ = upl_select(torch.tensor([[0.2, 0.2, 0.1], [0.1, 0.3, 0.3]]), k=1)
    assert labels.tolist() == [0, 1]


def test_classes_with_fewer_than_k_keep_all_and_unpredicted_classes_get_none():
    rows = [[0.50 - 0.05 * i, 0.1, 0.1, 0.1] for i in range(5)]  # class 0, five images
    rows += [[0.1, 0.30, 0.1, 0.1], [0.1, 0.40, 0.1, 0.1], [0.1, 0.1, 0.30, 0.1]]
    labels, selected = upl_select(torch.tensor(rows), k=3)
    assert labels.tolist() == [0, 0, 0, 0, 0, 1, 1, 2]
    assert selected.tolist() == [True, True, True, False, False, True, True, True]
    assert 3 not in labels[selected].tolist()  # no back-filling: 6 images, not 4 x 3


def test_no_candidates_at_all():
    labels, selected = upl_select(torch.zeros(0, 3), k=2)
    assert labels.shape == (0,) and selected.shape == (0,)
    nan = torch.full((2, 3), float("nan"))
    assert not upl_select(nan, k=16)[1].any()


def test_unreadable_images_are_never_selected_nor_take_a_place():
    cos = torch.tensor([[float("nan")] * 2, [0.3, 0.1], [0.2, 0.1], [0.1, 0.3]])
    _, selected = upl_select(cos, k=2)
    assert selected.tolist() == [False, True, True, True]


def test_selection_matches_brute_force_with_ties():
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        cos = ((torch.rand(40, 6, generator=g) * 0.1 + 0.2) * 100).round() / 100
        for k in (1, 3, 16):
            labels, selected = upl_select(cos, k=k)
            assert (labels.tolist(), selected.tolist()) == loop_select(cos.double().tolist(), k)


# -------------------------------------------------------------------------------- UPL loss


def test_upl_loss_is_cross_entropy():
    logits = [[2.0, 1.0, 0.0], [0.5, 0.5, 3.0]]
    expected = (-math.log(softmax(logits[0])[0]) - math.log(softmax(logits[1])[1])) / 2
    got = upl_loss(torch.tensor(logits), torch.tensor([0, 1]))
    assert got.item() == pytest.approx(expected, abs=1e-6)
    g = torch.Generator().manual_seed(5)
    logits = 100.0 * F.normalize(torch.randn(7, 4, generator=g), dim=-1)
    labels = torch.randint(0, 4, (7,), generator=g)
    assert upl_loss(logits, labels).item() == pytest.approx(
        F.cross_entropy(logits, labels).item(), abs=1e-5
    )


# ------------------------------------------------------------------- registry and recipe


def test_registration_order_and_defaults():
    assert method_names() == ["zeroshot", "entmin", "infomax", "pouf", "upl", "ueo", "ueo-oracle"]
    assert default_methods() == ["zeroshot", "entmin", "infomax", "pouf", "upl", "ueo"]
    assert demo_methods() == [*default_methods(), "ueo-oracle"]


def test_registry_entries_use_the_recipe_options():
    g = torch.Generator().manual_seed(2)
    img = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    logits = 100.0 * img @ txt.t()
    recipe = Recipe(method="pouf", pouf_transport=0.5, pouf_im=2.0, upl_k=1)
    batch = Batch(logits, img, txt, {}, recipe)
    assert torch.equal(get_method("pouf").loss(batch), pouf_loss(logits, img, txt, 0.5, 2.0))

    upl = get_method("upl")
    fixed = upl.fixed(img @ txt.t(), torch.full((6,), -2), recipe)
    labels, selected = upl_select(img @ txt.t(), 1)
    assert torch.equal(fixed["label"], labels) and torch.equal(fixed[TRAIN_MASK], selected)
    assert int(selected.sum()) == len(set(labels.tolist()))  # one image per predicted class
    batch = Batch(logits, img, txt, {"label": fixed["label"]}, recipe)
    assert torch.equal(upl.loss(batch), upl_loss(logits, labels))


@pytest.mark.parametrize(
    "setting",
    [{"upl_k": 0}, {"upl_k": 2.0}, {"pouf_im": -0.1}, {"pouf_transport": float("nan")}],
)
def test_bad_options_are_user_errors(setting):
    flag = "--" + next(iter(setting)).replace("_", "-")
    with pytest.raises(UeoError, match=flag):
        Recipe(**setting).validate()


def test_old_recipes_without_the_options_still_load():
    stored = Recipe().to_dict()
    for name in ("pouf_transport", "pouf_im", "upl_k"):
        del stored[name]
    assert Recipe.from_dict(stored) == Recipe()


# ----------------------------------------------------------------------------- end to end


@pytest.mark.usefixtures("single_thread", "calibrated_loads")
@pytest.mark.filterwarnings("ignore:Model .* has RANDOM weights")
@pytest.mark.parametrize(
    "method, extra",
    [("pouf", ["--pouf-im", "0.5"]), ("upl", ["--upl-k", "2"])],
)
def test_adapt_through_the_cli(method, extra, tmp_path, image_folder, classes_file):
    run = tmp_path / "run"
    argv = ["adapt", "--model", "test-tiny-rn", "--pretrained", "none"]
    argv += ["--data", str(image_folder), "--classes", str(classes_file), "--method", method]
    argv += ["--epochs", "1", "--batch-size", "8", "--lr-prompt", "0.01", "--lr-norm", "0.01"]
    argv += ["--workers", "0", "--out", str(run), "--quiet", *extra]
    assert main(argv) == 0

    tensors, meta = load_adapter(run)
    assert meta["recipe"]["method"] == method
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["recipe"] == meta["recipe"] and len(metrics["history"]) == 1
    before = load_calibrated("test-tiny-rn").adapter_state()
    assert set(tensors) == set(before)
    changed = [k for k in tensors if not torch.equal(tensors[k], before[k])]
    assert CTX_NAME in changed and len(changed) > len(tensors) // 2

    log = (run / "log.txt").read_text()
    if method == "upl":
        # 30 unlabeled images, at most 2 per predicted class among the 4 known classes.
        kept = int(log.split("upl trains on ")[1].split(" of 30 ")[0])
        assert 1 <= kept <= 8
    else:
        assert "trains on" not in log
