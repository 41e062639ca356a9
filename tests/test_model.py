"""What UEO tunes: exactly the prompt context and the image tower's norm affines."""

import pytest
import torch
from conftest import calibration_batch, load_calibrated

from ueo.errors import UeoError
from ueo.methods import get_method
from ueo.model import CTX_NAME, collect_params, configure_model, norm_parameters, tuning
from ueo.objectives import entmin_loss, mcm_score, ueo_loss
from ueo.recipe import Recipe
from ueo.training import training_step

pytestmark = pytest.mark.usefixtures("single_thread")

VIT_NORMS = {
    f"visual.{m}.{p}"
    for m in [
        "ln_pre",
        "ln_post",
        "transformer.resblocks.0.ln_1",
        "transformer.resblocks.0.ln_2",
        "transformer.resblocks.1.ln_1",
        "transformer.resblocks.1.ln_2",
    ]
    for p in ("weight", "bias")
}


@pytest.fixture(scope="module")
def batch():
    return calibration_batch(16, seed=5)


def _batchnorms(model) -> set[str]:
    """The image tower's BatchNorm layers: its modules with running statistics."""
    state = model.net.visual.state_dict()
    return {k[: -len(".running_mean")] for k in state if k.endswith(".running_mean")}


def _affines(modules) -> set[str]:
    return {f"visual.{m}.{p}" for m in modules for p in ("weight", "bias")}


def test_rn_norm_parameters_are_the_batchnorm_affines():
    model = load_calibrated("test-tiny-rn")
    bn = _batchnorms(model)
    assert len(bn) == 19  # stem 3 + 4 stages x (3 + the projection shortcut's)
    shortcut = {m for m in bn if ".downsample." in m}
    assert len(shortcut) == 4
    # `all`: every BatchNorm; `reference` (the default): all but the shortcuts' BatchNorms,
    # which the authors' name rule (`bn` or `ln` in the name) misses.
    assert set(model.norm_parameters("all")) == _affines(bn)
    assert set(model.norm_parameters("reference")) == _affines(bn - shortcut)
    assert set(model.norm_parameters()) == set(model.norm_parameters("reference"))
    assert {"visual.bn1.weight", "visual.layer4.0.bn3.bias"} <= set(model.norm_parameters())
    assert "visual.layer4.0.downsample.1.bias" in model.norm_parameters("all")
    for which in ("reference", "all"):
        names = set(model.norm_parameters(which))
        assert not any("attnpool" in n or "conv" in n for n in names)
        for name, p in model.norm_parameters(which).items():
            assert p is model.net.get_parameter(name)
    with pytest.raises(UeoError, match="--norm-layers"):
        norm_parameters(model.net, "some")


def test_vit_norm_parameters_are_the_visual_layernorm_affines():
    model = load_calibrated("test-tiny-vit")
    # A ViT tower has no projection shortcut: both selections are every visual LayerNorm.
    assert set(model.norm_parameters("reference")) == VIT_NORMS
    assert set(model.norm_parameters("all")) == VIT_NORMS
    # The text tower's LayerNorms are not tuned.
    assert not any(n.startswith(("transformer.", "ln_final")) for n in model.norm_parameters())


def test_train_keeps_the_module_contract_and_configure_model_freezes_statistics():
    model = load_calibrated("test-tiny-rn")
    model.train()  # the plain nn.Module behaviour, not a silent no-op
    assert model.training and model.net.visual.training
    assert configure_model(model, Recipe()) is model
    assert not any(m.training for m in model.modules())
    model.train(False)
    assert not model.training


def test_configure_model_and_collect_params_follow_the_recipe():
    model = load_calibrated("test-tiny-rn")
    recipe = Recipe(lr_prompt=3e-4, lr_norm=2e-4, norm_layers="all")
    configure_model(model, recipe)
    tuned = {n for n, p in model.named_parameters() if p.requires_grad}
    assert tuned == {CTX_NAME} | {f"net.{n}" for n in model.norm_parameters("all")}
    groups = collect_params(model, recipe)
    assert [(g["name"], g["lr"]) for g in groups] == [("prompt", 3e-4), ("norm", 2e-4)]
    assert groups[1]["params"] == list(model.norm_parameters("all").values())
    # lr 0 freezes a group and leaves it out; the reference selection leaves out shortcuts.
    recipe = Recipe(lr_prompt=0.0, norm_layers="reference")
    configure_model(model, recipe)
    assert not model.prompt.ctx.requires_grad
    assert [g["name"] for g in collect_params(model, recipe)] == ["norm"]
    assert not model.net.get_parameter("visual.layer1.0.downsample.1.weight").requires_grad
    assert len(collect_params(model, recipe)[0]["params"]) == 30


def test_tuning_freezes_everything_again_afterwards():
    model = load_calibrated("test-tiny-rn")
    with tuning(model, Recipe()) as groups:
        assert {g["name"] for g in groups} == {"prompt", "norm"}
        assert model.prompt.ctx.requires_grad
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(RuntimeError), tuning(model, Recipe()):
        raise RuntimeError("a failed step")
    assert not any(p.requires_grad for p in model.parameters())


def state_copy(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed_keys(before, model):
    after = model.state_dict()
    assert set(after) == set(before)
    return {k for k in before if not torch.equal(before[k], after[k])}


def sgd(model, recipe):
    """The optimiser adapt() builds: plain SGD over the recipe's groups."""
    configure_model(model, recipe)
    groups = collect_params(model, recipe)
    return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=0.0, weight_decay=0.0)


def step(model, batch, lr_prompt, lr_norm, method="ueo", norm_layers="all"):
    recipe = Recipe(method=method, lr_prompt=lr_prompt, lr_norm=lr_norm, norm_layers=norm_layers)
    optimizer = sgd(model, recipe)
    with torch.no_grad():
        weights = mcm_score(model(batch))
    loss = training_step(model, batch, {"weight": weights}, optimizer, get_method(method), recipe)
    assert torch.isfinite(loss)
    return optimizer


@pytest.mark.parametrize("name", ["test-tiny-rn", "test-tiny-vit"])
def test_training_step_changes_only_context_and_norm_affines(batch, name):
    model = load_calibrated(name)
    with torch.no_grad():
        feats = model.image_features(batch)
    assert torch.cdist(feats, feats).max() > 0.05  # input-dependent features
    before = state_copy(model)
    step(model, batch, 1e-2, 1e-2)
    tuned = {f"net.{n}" for n in model.norm_parameters("all")}
    assert changed_keys(before, model) == {CTX_NAME} | tuned
    # BatchNorm running statistics did not move (the tower stays in eval mode).
    stats = [k for k in before if k.endswith(("running_mean", "running_var", "batches_tracked"))]
    assert len(stats) == (3 * 19 if name == "test-tiny-rn" else 0)
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in stats)
    # Real gradients reached the context and every norm affine; nothing else has one.
    assert model.prompt.ctx.grad.abs().max() > 1e-6
    norm_grads = [p.grad for p in model.norm_parameters("all").values()]
    assert all(g is not None for g in norm_grads)
    assert all(g.abs().max() > 1e-6 for g in norm_grads)
    others = [p for n, p in model.net.named_parameters() if f"net.{n}" not in tuned]
    assert all(p.grad is None and not p.requires_grad for p in others)


def test_lr_norm_zero_freezes_norms(batch):
    model = load_calibrated("test-tiny-rn")
    before = state_copy(model)
    optimizer = step(model, batch, 1e-2, 0.0)
    assert [g["name"] for g in optimizer.param_groups] == ["prompt"]
    assert changed_keys(before, model) == {CTX_NAME}
    assert not any(p.requires_grad for p in model.norm_parameters().values())


def test_lr_prompt_zero_freezes_context(batch):
    model = load_calibrated("test-tiny-rn")
    before = state_copy(model)
    optimizer = step(model, batch, 0.0, 1e-2)
    assert [g["name"] for g in optimizer.param_groups] == ["norm"]
    assert changed_keys(before, model) == {f"net.{n}" for n in model.norm_parameters("all")}
    assert not model.prompt.ctx.requires_grad


def test_reference_norm_layers_leave_the_shortcuts_untouched(batch):
    model = load_calibrated("test-tiny-rn")
    before = state_copy(model)
    step(model, batch, 0.0, 1e-2, norm_layers="reference")
    changed = changed_keys(before, model)
    assert changed == {f"net.{n}" for n in model.norm_parameters("reference")}
    assert not any("downsample" in k for k in changed)


def test_both_lrs_zero_means_no_parameter_group():
    model = load_calibrated("test-tiny-rn")
    recipe = Recipe(lr_prompt=0.0, lr_norm=0.0)
    configure_model(model, recipe)
    assert collect_params(model, recipe) == []
    assert not any(p.requires_grad for p in model.parameters())


def test_bf16_step_keeps_parameters_fp32(batch):
    model = load_calibrated("test-tiny-vit")
    recipe = Recipe(method="infomax", lr_prompt=1e-2, lr_norm=1e-2, precision="bf16")
    optimizer = sgd(model, recipe)
    loss = training_step(model, batch, {}, optimizer, get_method("infomax"), recipe)
    assert torch.isfinite(loss)
    assert model.prompt.ctx.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.norm_parameters().values())


def test_adapter_state_round_trip():
    model = load_calibrated("test-tiny-rn")
    state = model.adapter_state()
    assert set(state) == {CTX_NAME} | set(model.norm_parameters())
    new = {k: v + 0.5 for k, v in state.items()}
    other = load_calibrated("test-tiny-rn")
    other.load_adapter_state(new)
    for k, v in other.adapter_state().items():
        assert torch.equal(v, new[k])
    with pytest.raises(UeoError, match="unknown"):
        other.load_adapter_state({**new, "visual.extra.weight": torch.zeros(1)})
    with pytest.raises(UeoError, match="missing"):
        other.load_adapter_state({CTX_NAME: new[CTX_NAME]})
    with pytest.raises(UeoError, match="shape"):
        other.load_adapter_state({**new, CTX_NAME: torch.zeros(5, 32)})
    # Another architecture's adapter does not fit.
    with pytest.raises(UeoError, match="does not fit"):
        load_calibrated("test-tiny-vit").load_adapter_state(new)


@pytest.mark.parametrize("method", ["ueo", "entmin"])
def test_training_step_loss_uses_logit_scale_100(batch, method):
    model = load_calibrated("test-tiny-vit")
    with torch.no_grad():
        cos = model(batch)
        weights = mcm_score(cos)
        expected = ueo_loss(100 * cos, weights) if method == "ueo" else entmin_loss(100 * cos)
    recipe = Recipe(method=method)
    optimizer = sgd(model, recipe)
    loss = training_step(model, batch, {"weight": weights}, optimizer, get_method(method), recipe)
    assert float(loss) == pytest.approx(float(expected), abs=1e-5)
    assert abs(float(expected) - float(ueo_loss(cos, weights))) > 1e-3  # the scale matters


def test_a_model_built_with_another_prompt_than_the_recipes_is_refused():
    """adapt() and the stream both rely on `UeoModel.check_prompt`: the prompt is built with the
    model, so a recipe that describes another one is a mistake, said in one line."""
    model = load_calibrated("test-tiny-rn")  # built with the default context, 'a photo of a'
    model.check_prompt(Recipe())
    with pytest.raises(UeoError, match="the recipe's \\(ctx_init 'a picture of a'"):
        model.check_prompt(Recipe(ctx_init="a picture of a"))
    with pytest.raises(UeoError, match="n_ctx 7"):
        model.check_prompt(Recipe(n_ctx=7))
