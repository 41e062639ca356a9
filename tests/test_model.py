"""What UEO tunes: exactly the prompt context and the image tower's norm affines."""

import pytest
import torch
from conftest import calibration_batch, load_calibrated

from ueo.adaptation import AdaptConfig, make_optimizer, training_step
from ueo.errors import UeoError
from ueo.model import CTX_NAME
from ueo.objectives import entmin_loss, mcm_score, ueo_loss

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


def test_rn_norm_parameters_are_the_batchnorm_affines():
    model = load_calibrated("test-tiny-rn")
    names = set(model.norm_parameters())
    # BatchNorm layers are the modules of the image tower with running statistics.
    state = model.net.visual.state_dict()
    bn = {k[: -len(".running_mean")] for k in state if k.endswith(".running_mean")}
    assert len(bn) == 19  # stem 3 + 4 stages x (3 + downsample)
    assert names == {f"visual.{m}.{p}" for m in bn for p in ("weight", "bias")}
    assert {"visual.bn1.weight", "visual.layer4.0.downsample.1.bias"} <= names
    assert not any("attnpool" in n or "conv" in n for n in names)
    for name, p in model.norm_parameters().items():
        assert p is model.net.get_parameter(name)


def test_vit_norm_parameters_are_the_visual_layernorm_affines():
    model = load_calibrated("test-tiny-vit")
    assert set(model.norm_parameters()) == VIT_NORMS
    # The text tower's LayerNorms are not tuned.
    assert not any(n.startswith(("transformer.", "ln_final")) for n in model.norm_parameters())


def test_model_stays_in_eval_mode():
    model = load_calibrated("test-tiny-rn")
    model.train()
    assert not any(m.training for m in model.modules())


def state_copy(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed_keys(before, model):
    after = model.state_dict()
    assert set(after) == set(before)
    return {k for k in before if not torch.equal(before[k], after[k])}


def step(model, batch, lr_prompt, lr_norm, method="ueo"):
    config = AdaptConfig(lr_prompt=lr_prompt, lr_norm=lr_norm)
    optimizer = make_optimizer(model, config)
    with torch.no_grad():
        weights = mcm_score(model(batch))
    loss = training_step(model, batch, weights, optimizer, method)
    assert torch.isfinite(torch.tensor(loss))
    return optimizer


@pytest.mark.parametrize("name", ["test-tiny-rn", "test-tiny-vit"])
def test_training_step_changes_only_context_and_norm_affines(batch, name):
    model = load_calibrated(name)
    with torch.no_grad():
        feats = model.image_features(batch)
    assert torch.cdist(feats, feats).max() > 0.05  # input-dependent features
    before = state_copy(model)
    step(model, batch, 1e-2, 1e-2)
    tuned = {f"net.{n}" for n in model.norm_parameters()}
    assert changed_keys(before, model) == {CTX_NAME} | tuned
    # BatchNorm running statistics did not move (the tower stays in eval mode).
    stats = [k for k in before if k.endswith(("running_mean", "running_var", "batches_tracked"))]
    assert len(stats) == (3 * 19 if name == "test-tiny-rn" else 0)
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in stats)
    # Real gradients reached the context and every norm affine; nothing else has one.
    assert model.prompt.ctx.grad.abs().max() > 1e-6
    norm_grads = [p.grad for p in model.norm_parameters().values()]
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
    assert changed_keys(before, model) == {f"net.{n}" for n in model.norm_parameters()}
    assert not model.prompt.ctx.requires_grad


def test_both_lrs_zero_means_no_optimizer():
    model = load_calibrated("test-tiny-rn")
    assert make_optimizer(model, AdaptConfig(lr_prompt=0.0, lr_norm=0.0)) is None


def test_optimizer_is_plain_sgd_with_two_groups():
    model = load_calibrated("test-tiny-vit")
    optimizer = make_optimizer(model, AdaptConfig(lr_prompt=3e-4, lr_norm=2e-4))
    assert isinstance(optimizer, torch.optim.SGD)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert groups["prompt"]["lr"] == 3e-4 and groups["norm"]["lr"] == 2e-4
    assert groups["prompt"]["params"] == [model.prompt.ctx]
    assert len(groups["norm"]["params"]) == len(VIT_NORMS)
    for g in groups.values():
        assert g["momentum"] == 0 and g["weight_decay"] == 0


def test_bf16_step_keeps_parameters_fp32(batch):
    model = load_calibrated("test-tiny-vit")
    optimizer = make_optimizer(model, AdaptConfig(lr_prompt=1e-2, lr_norm=1e-2))
    loss = training_step(model, batch, torch.ones(len(batch)), optimizer, "infomax", 1.0, "bf16")
    assert torch.isfinite(torch.tensor(loss))
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
    optimizer = make_optimizer(model, AdaptConfig())
    loss = training_step(model, batch, weights, optimizer, method)
    assert loss == pytest.approx(float(expected), abs=1e-5)
    assert abs(float(expected) - float(ueo_loss(cos, weights))) > 1e-3  # the scale matters
