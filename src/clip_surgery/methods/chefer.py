"""Chefer et al.'s gradient-weighted attention relevancy, accumulated over blocks.

Chefer, Gur, Wolf, "Generic Attention-model Explainability for Interpreting Bi-Modal and
Encoder-Decoder Transformers", ICCV 2021; code github.com/hila-chefer/Transformer-MM-Explainability
(CLIP notebook: ``R = I``; per block ``R += mean_heads((grad * A).clamp(min=0)) @ R``; relevance
is the CLS row; the score is CLIP's logit; ``start_layer=-1`` means the last block only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import engine
from .base import Method, OptionError, Scores


@dataclass(frozen=True)
class CheferOptions:
    """start_layer: first block whose attention is accumulated (-1: the last block only)."""

    start_layer: int = -1


class Chefer(Method):
    """Chefer et al. (ICCV 2021) relevancy for CLIP ViTs."""

    name = "chefer"
    summary = "gradient-weighted attention relevancy accumulated over blocks"
    citation = (
        "Chefer et al., Generic Attention-model Explainability for "
        "Interpreting Bi-Modal and Encoder-Decoder Transformers, ICCV 2021"
    )
    gradient = True
    Options = CheferOptions

    def scores(self, model, images, text, options: CheferOptions, redundant=None) -> Scores:
        """One backward pass per text over the recorded attention probabilities."""
        self.check_backbone(model)
        visual = model.clip.visual
        blocks = visual.transformer.resblocks
        start = len(blocks) - 1 if options.start_layer == -1 else options.start_layer
        if not 0 <= start < len(blocks):
            raise OptionError(f"start_layer must be -1 or in [0, {len(blocks) - 1}], got {start}")
        with model.inference(grad=True):
            x, grid = engine.embed(visual, images)
            x = x.detach().requires_grad_(True)  # so the graph exists even for frozen weights
            probabilities = []
            for index, block in enumerate(blocks):
                if index < start:
                    x = engine.plain_block(block, x)
                    continue
                q, k, v = engine.block_qkv(block, block.ln_1(x))
                attention = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
                probabilities.append(attention)
                x = x + block.ls_1(engine.out_proj(block, attention @ v))
                x = engine.ffn(block, x)
            embedding = F.normalize((visual.ln_post(x[:, 0]) @ visual.proj).float(), dim=-1)
            cosine = embedding @ text.T
            logits = model.logit_scale * cosine
            relevance = [
                self._relevance(logits[:, index].sum(), probabilities, keep=index < len(text) - 1)
                for index in range(text.shape[0])
            ]
        maps = torch.stack(relevance, dim=-1).float()
        return Scores(maps, maps, cosine.detach(), grid)

    @staticmethod
    def _relevance(score, probabilities, keep: bool) -> torch.Tensor:
        gradients = torch.autograd.grad(score, probabilities, retain_graph=keep)
        batch, _, tokens, _ = probabilities[0].shape
        relevance = torch.eye(tokens, device=score.device).expand(batch, tokens, tokens)
        for attention, gradient in zip(probabilities, gradients, strict=True):
            cam = (gradient * attention.detach()).clamp(min=0).mean(dim=1)
            relevance = relevance + cam @ relevance
        return relevance[:, 0, 1:]
