"""Grad-CAM on CLIP: channel weights from the gradient of the image-text score.

Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
Localization", ICCV 2017; code github.com/ramprs/grad-cam. Target layers as pytorch-grad-cam
(github.com/jacobgil/pytorch-grad-cam) uses them for CLIP: the last block's first norm output
(patch tokens) on a ViT, the trunk's last feature map on a ResNet. The score is the cosine of
CLIP's image embedding with the text embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from .. import engine
from ..typedefs import PositionMode
from .base import GradientMethod, Scores, TextQuery


@dataclass(frozen=True)
class GradCamOptions:
    """positions: positional-table interpolation at other input sizes."""

    positions: PositionMode = "bilinear"


GRADIENT_SCALE = 2.0**10
"""Loss scale of the backward pass: a cosine's gradient spread over hundreds of tokens falls
below fp16's smallest subnormal (2^-24) under CUDA autocast; 2^10 keeps it, exactly undone."""


def cam(activations, gradients):
    """ReLU(sum_c mean_n(grad_c) A_c) per token: ``[B, N, C]`` -> ``[B, N]``."""
    weights = gradients.mean(dim=1, keepdim=True)
    return F.relu((weights * activations).sum(dim=-1))


class GradCam(GradientMethod):
    """Grad-CAM (Selvaraju et al., ICCV 2017) on CLIP's image-text cosine."""

    name = "gradcam"
    summary = "Grad-CAM of the image-text cosine (last block's norm1 on ViT, trunk on ResNet)"
    citation = (
        "Selvaraju et al., Grad-CAM: Visual Explanations from Deep Networks "
        "via Gradient-based Localization, ICCV 2017"
    )
    needs_blocks = False
    Options = GradCamOptions

    def scores(self, backbone, images, query: TextQuery, options: GradCamOptions) -> Scores:
        """One backward pass per text; the user's ``requires_grad`` flags are not touched."""
        self.check(backbone)
        tower = backbone.vision
        target = ("normed", len(tower.blocks) - 1) if tower.blocks else ("embed", -1)
        captured = {}

        def tap(point, block, tensor):
            if (point, block) == target:
                # A leaf copy: its gradient is the one through the attention branch (ViT).
                tensor = captured["activations"] = tensor.detach().requires_grad_(True)
            return tensor

        with backbone.inference(grad=True):
            trace = engine.run(tower, images, engine.Plan(positions=options.positions, tap=tap))
            cosine = self.cosine(trace, query.embeddings)
            activations = captured["activations"]
            patches = activations[:, tower.prefix :]
            maps = self.per_text(
                cosine,
                [activations],
                lambda grads: cam(patches, grads[0][:, tower.prefix :]),
                scale=GRADIENT_SCALE,
            )
        return Scores(maps, maps, cosine.detach(), trace.grid)
