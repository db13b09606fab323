"""Grad-CAM on CLIP: channel weights from the gradient of the image-text score.

Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
Localization", ICCV 2017. Target layers as pytorch-grad-cam uses them for CLIP: the last
block's ``ln_1`` output (patch tokens) for a ViT, ``layer4`` for a ResNet. The score is the
cosine of CLIP's image embedding with the text embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import engine
from .base import Method, Scores


def _cam(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """ReLU(sum_c mean_n(grad_c) A_c) per token: ``[B, N, C]`` -> ``[B, N]``."""
    weights = gradients.mean(dim=1, keepdim=True)
    return F.relu((weights * activations).sum(dim=-1))


class GradCam(Method):
    """Grad-CAM (Selvaraju et al., ICCV 2017) on CLIP's image-text cosine."""

    name = "gradcam"
    summary = "Grad-CAM of the image-text cosine (last block ln_1 on ViT, layer4 on ResNet)"
    citation = (
        "Selvaraju et al., Grad-CAM: Visual Explanations from Deep Networks "
        "via Gradient-based Localization, ICCV 2017"
    )
    backbones = ("vit", "resnet")
    gradient = True

    def scores(self, model, images, text, options, redundant=None) -> Scores:
        """One backward pass per text; the user's ``requires_grad`` flags are not touched."""
        self.check_backbone(model)
        visual = model.clip.visual
        with model.inference(grad=True):
            if model.is_vit:
                activations, embedding, grid = self._vit(visual, images)
            else:
                activations, embedding, grid = self._resnet(visual, images)
            cosine = F.normalize(embedding.float(), dim=-1) @ text.T
            cams = []
            for index in range(text.shape[0]):
                (gradients,) = torch.autograd.grad(
                    cosine[:, index].sum(), activations, retain_graph=index < text.shape[0] - 1
                )
                cams.append(_cam(self._tokens(activations), self._tokens(gradients)))
        cam = torch.stack(cams, dim=-1).detach().float()
        return Scores(cam, cam, cosine.detach(), grid)

    @staticmethod
    def _tokens(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() == 4:  # ResNet feature map [B, C, h, w] -> [B, N, C]
            return tensor.flatten(2).transpose(1, 2)
        return tensor[:, 1:]  # ViT tokens without CLS

    @staticmethod
    def _vit(visual, images):
        x, grid = engine.embed(visual, images)
        blocks = visual.transformer.resblocks
        for block in blocks[:-1]:
            x = engine.plain_block(block, x)
        last = blocks[-1]
        # A leaf copy of ln_1's output: its gradient is the one through the attention branch.
        normed = last.ln_1(x).detach().requires_grad_(True)
        q, k, v = engine.block_qkv(last, normed)
        x = x + last.ls_1(engine.out_proj(last, F.scaled_dot_product_attention(q, k, v)))
        x = engine.ffn(last, x)
        return normed, visual.ln_post(x[:, 0]) @ visual.proj, grid

    @staticmethod
    def _resnet(visual, images):
        features = engine.resnet_features(visual, images).detach().requires_grad_(True)
        embedding = engine.resnet_pool(visual, features, surgery=False, cls_only=True)[:, 0]
        return features, embedding, tuple(features.shape[-2:])
