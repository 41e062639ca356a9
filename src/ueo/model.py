"""A CLIP model with learnable prompts and tunable image-tower normalisation affines."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ueo.clip import LoadedClip
from ueo.errors import UeoError
from ueo.prompts import DEFAULT_CTX_INIT, PromptLearner

NORM_TYPES = (nn.BatchNorm2d, nn.LayerNorm)
CTX_NAME = "prompt.ctx"


def norm_parameters(net: nn.Module) -> dict[str, nn.Parameter]:
    """Norm affines of `net.visual`, found by module type, under the model's own names."""
    params = {}
    for name, module in net.visual.named_modules():
        if isinstance(module, NORM_TYPES):
            for pname, p in module.named_parameters(recurse=False):
                params[f"visual.{name}.{pname}" if name else f"visual.{pname}"] = p
    return params


class UeoModel(nn.Module):
    """What UEO tunes: the shared prompt context and the image tower's norm affines.

    The network stays in eval mode: BatchNorm uses and keeps its running statistics.
    """

    def __init__(
        self,
        clip: LoadedClip,
        class_names: list[str],
        n_ctx: int | None = None,
        ctx_init: str | None = DEFAULT_CTX_INIT,
        fast: bool = True,
    ):
        super().__init__()
        self.clip = clip
        self.net = clip.model
        self.prompt = PromptLearner(self.net, clip.tokenizer, class_names, n_ctx, ctx_init, fast)
        self.channels_last = False
        self.eval()

    @property
    def class_names(self) -> list[str]:
        return self.prompt.class_names

    def train(self, mode: bool = True) -> UeoModel:
        """Always eval: the reference keeps BatchNorm statistics frozen during adaptation."""
        return super().train(False)

    def norm_parameters(self) -> dict[str, nn.Parameter]:
        """Affine weights and biases of every BatchNorm2d / LayerNorm of the image tower."""
        return norm_parameters(self.net)

    def set_tuned(self, prompt: bool, norm: bool) -> None:
        """Freeze everything, then unfreeze the groups being tuned."""
        self.net.requires_grad_(False)
        self.prompt.ctx.requires_grad_(prompt)
        for p in self.norm_parameters().values():
            p.requires_grad_(norm)

    def use_channels_last(self) -> None:
        """NHWC convolutions: faster for ResNet (BatchNorm) towers on CPUs and GPUs."""
        if any(isinstance(m, nn.BatchNorm2d) for m in self.net.visual.modules()):
            self.net.visual.to(memory_format=torch.channels_last)
            self.channels_last = True

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return F.normalize(self.net.encode_image(images).float(), dim=-1)

    def text_features(self) -> torch.Tensor:
        return self.prompt().float()

    def forward(self, images: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        """Cosine similarities, images x known classes."""
        text = self.text_features() if text is None else text
        return self.image_features(images) @ text.t()

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The tuned tensors under self-describing names (the model's own parameter names)."""
        state = {CTX_NAME: self.prompt.ctx.detach()}
        state.update({k: v.detach() for k, v in self.norm_parameters().items()})
        return state

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        """Put tuned tensors back; shapes and names must match this model exactly."""
        params = {CTX_NAME: self.prompt.ctx, **self.norm_parameters()}
        unknown = sorted(set(state) - set(params))
        missing = sorted(set(params) - set(state))
        if unknown or missing:
            raise UeoError(
                f"Adapter does not fit this model: unknown tensors {unknown[:3]}, missing "
                f"{missing[:3]}."
            )
        with torch.no_grad():
            for name, value in state.items():
                if params[name].shape != value.shape:
                    raise UeoError(
                        f"Adapter tensor {name} has shape {tuple(value.shape)}, the model "
                        f"expects {tuple(params[name].shape)}."
                    )
                params[name].copy_(value.to(params[name].device))
