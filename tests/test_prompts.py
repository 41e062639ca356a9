"""Learnable prompts: exact equality with the model's own text encoder, on every path."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import CLASSES

from ueo.clip import load_clip
from ueo.errors import UeoError
from ueo.names import normalize_name, spoken_name
from ueo.prompts import PromptLearner

pytestmark = pytest.mark.usefixtures("single_thread")

# Different token lengths, in an order that is not sorted by length.
MIXED = ["a very long and oddly specific class name", "cat", "red_square", "x", "ice cream cone"]


def quiet_load(name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_clip(name, "none")


@pytest.fixture(scope="module")
def tiny():
    return {name: quiet_load(name) for name in ("test-tiny-rn", "test-tiny-vit")}


def zeroshot_text(clip, names):
    texts = [f"a photo of a {n.replace('_', ' ')}." for n in names]
    with torch.no_grad():
        return F.normalize(clip.model.encode_text(clip.tokenizer(texts)), dim=-1)


def all_paths(learner):
    return {
        "fast": learner(),
        "truncated": F.normalize(learner._truncated_features(), dim=-1),
        "reference": learner.reference_features(),
    }


@pytest.mark.parametrize("name", ["test-tiny-rn", "test-tiny-vit"])
def test_initial_prompts_equal_zeroshot_text(tiny, name):
    clip = tiny[name]
    learner = PromptLearner(clip.model, clip.tokenizer, CLASSES + MIXED)
    assert learner.bucketed  # on the CPU, forward() takes the bucketed fast path
    expected = zeroshot_text(clip, CLASSES + MIXED)
    with torch.no_grad():
        for path, got in all_paths(learner).items():
            assert got.shape == (len(CLASSES + MIXED), 32)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0, msg=path)
    # Not trivially equal: different classes give clearly different features.
    assert (expected[0] - expected[1]).abs().max() > 1e-2


def test_real_architecture_text_tower_at_random_init():
    """RN50's text tower (the one of OpenAI CLIP) with random weights, full 77-token context."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = load_clip("RN50", "none")
    names = ["dog", "golden_retriever", "a very long class name indeed"]
    learner = PromptLearner(clip.model, clip.tokenizer, names)
    assert learner.tower.context_length == 77
    expected = zeroshot_text(clip, names)
    with torch.no_grad():
        got = learner()
        ref = learner.reference_features()
    assert got.shape == (3, 1024)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(ref, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["test-tiny-rn", "test-tiny-vit"])
@pytest.mark.parametrize("ctx_init", ["a photo of a", ""])
def test_paths_agree_in_values_and_gradients(tiny, name, ctx_init):
    clip = tiny[name]
    torch.manual_seed(0)
    learner = PromptLearner(clip.model, clip.tokenizer, MIXED + CLASSES, n_ctx=4, ctx_init=ctx_init)
    assert learner.ctx.dtype == torch.float32 and learner.ctx.requires_grad
    with torch.no_grad():  # move away from the initial context, as training would
        learner.ctx.add_(0.05 * torch.randn_like(learner.ctx))
    probe = torch.randn(len(MIXED + CLASSES), 32, generator=torch.Generator().manual_seed(1))
    values, grads = {}, {}
    for path, fn in [
        ("fast", learner),
        ("truncated", lambda: F.normalize(learner._truncated_features(), dim=-1)),
        ("reference", learner.reference_features),
    ]:
        learner.ctx.grad = None
        feats = fn()
        (feats * probe).sum().backward()
        values[path], grads[path] = feats.detach(), learner.ctx.grad.clone()
    assert grads["reference"].abs().max() > 1e-4  # a real gradient
    for path in ("fast", "truncated"):
        torch.testing.assert_close(values[path], values["reference"], atol=1e-5, rtol=0)
        torch.testing.assert_close(grads[path], grads["reference"], atol=1e-5, rtol=1e-4)
    # The frozen tower gets no gradient.
    assert all(p.grad is None for p in clip.model.parameters())


def test_one_call_path_off_the_cpu(tiny):
    """Accelerators take the one-call path (kernel launches, not work, bound the text pass
    there); the CPU the bucketed one. The two agree (test above)."""
    clip = quiet_load("test-tiny-vit")
    learner = PromptLearner(clip.model, clip.tokenizer, MIXED)
    assert learner.bucketed
    clip.model.to("meta")  # a model moved after it was built, as adapt() moves it
    learner.to("meta")
    assert not learner.bucketed
    assert learner.forward().device.type == "meta"  # and it runs there


def test_underscores_become_spaces(tiny):
    clip = tiny["test-tiny-rn"]
    assert spoken_name("golden_retriever") == "golden retriever"
    assert spoken_name("  ice_cream  cone ") == "ice cream cone"
    assert spoken_name("The_Eiffel_Tower") == "The Eiffel Tower"  # case is kept for prompts
    assert normalize_name("The_Eiffel_Tower") == normalize_name("the eiffel  tower")
    a = PromptLearner(clip.model, clip.tokenizer, ["green_circle", " ice_cream_cone "])
    b = PromptLearner(clip.model, clip.tokenizer, ["green circle", "ice cream cone"])
    with torch.no_grad():
        torch.testing.assert_close(a(), b(), atol=0, rtol=0)
        torch.testing.assert_close(a(), zeroshot_text(clip, ["green circle", "ice cream cone"]))


def test_buckets_keep_class_order(tiny):
    clip = tiny["test-tiny-vit"]
    learner = PromptLearner(clip.model, clip.tokenizer, MIXED)
    assert len(set(learner.lengths)) == len(learner.buckets) > 2
    assert learner.lengths != sorted(learner.lengths)
    with torch.no_grad():
        all_at_once = learner()
        for i, name in enumerate(MIXED):
            alone = PromptLearner(clip.model, clip.tokenizer, [name])()
            torch.testing.assert_close(all_at_once[i], alone[0], atol=1e-5, rtol=0)


def test_name_too_long_for_context(tiny):
    clip = tiny["test-tiny-rn"]  # context length 24 = 1 SOS + 4 ctx + name + "." + EOT
    fits = " ".join(["cat"] * 17)  # 17 + 1 + 6 = 24 tokens
    PromptLearner(clip.model, clip.tokenizer, [fits])
    with pytest.raises(UeoError, match="too long.*24"):
        PromptLearner(clip.model, clip.tokenizer, ["dog", fits + " cat"])


def test_n_ctx_must_match_ctx_init(tiny):
    clip = tiny["test-tiny-rn"]
    with pytest.raises(UeoError, match="n-ctx"):
        PromptLearner(clip.model, clip.tokenizer, CLASSES, n_ctx=8, ctx_init="a photo of a")
    # Matching values are fine.
    assert PromptLearner(clip.model, clip.tokenizer, CLASSES, n_ctx=4).n_ctx == 4
    with pytest.raises(UeoError, match="n-ctx"):
        PromptLearner(clip.model, clip.tokenizer, CLASSES, n_ctx=None, ctx_init="")


def test_random_context(tiny):
    clip = tiny["test-tiny-rn"]
    learner = PromptLearner(clip.model, clip.tokenizer, CLASSES, n_ctx=7, ctx_init="")
    assert learner.ctx.shape == (7, 32)
    assert learner.ctx_init == ""
    assert 0.005 < float(learner.ctx.detach().std()) < 0.05  # N(0, 0.02)
    with torch.no_grad():
        feats = learner()
        torch.testing.assert_close(feats, learner.reference_features(), atol=1e-5, rtol=0)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(len(CLASSES)))
    # SOS + 7 context tokens + "<two words> ." + EOT.
    assert learner.prefix_len == 8 and learner.lengths == [12, 12, 12, 12]


def test_context_initialised_from_token_embeddings(tiny):
    clip = tiny["test-tiny-rn"]
    learner = PromptLearner(clip.model, clip.tokenizer, CLASSES)
    ids = clip.tokenizer(["a photo of a"])[0, 1:5]
    expected = clip.model.token_embedding.weight[ids]
    assert torch.equal(learner.ctx.detach(), expected)
    assert learner.ctx.data_ptr() != clip.model.token_embedding.weight.data_ptr()


def test_a_random_context_is_drawn_from_the_seed_alone():
    """`--ctx-init ''`: the context depends on the recipe's seed, not on what the global
    generator held when the model was built (it used to: `ueo adapt` was not reproducible)."""
    from ueo.api import load_model
    from ueo.recipe import Recipe

    def ctx(seed: int, noise: int) -> torch.Tensor:
        torch.manual_seed(noise)  # whatever ran before
        recipe = Recipe(ctx_init="", n_ctx=4, seed=seed)
        return load_model("ueo-tiny-rn", "bundled", ["cat", "dog"], recipe).prompt.ctx.detach()

    assert torch.equal(ctx(5, noise=1), ctx(5, noise=2))
    assert not torch.equal(ctx(5, noise=1), ctx(6, noise=1))
