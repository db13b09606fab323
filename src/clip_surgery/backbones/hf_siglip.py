"""Adapters for Hugging Face ``transformers.SiglipModel``: a ViT without a CLS token pooled by
``SiglipMultiheadAttentionPoolingHead`` (a MAP head), and the SigLIP text model.

Zhai et al., "Sigmoid Loss for Language Image Pre-Training", ICCV 2023; code
github.com/google-research/big_vision; the modules read here are transformers'
(github.com/huggingface/transformers, models/siglip). Imported only when such a model is used.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ModelError
from ..typedefs import Grid, PositionMode
from .base import Backbone
from .common import LatentPoolHead, interpolate_positions, merge_heads, split_heads
from .hf_clip import HfClipBlock, HfText, vision_geometry

FAMILY = "transformers SigLIP"
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)  # SigLIP's preprocessing: pixels to [-1, 1]


class HfMapHead(LatentPoolHead):
    """``SiglipMultiheadAttentionPoolingHead`` after ``post_layernorm``: the probe attends over
    the tokens (``nn.MultiheadAttention``), then ``x + mlp(layernorm(x))``; no projection."""

    def __init__(self, vision: nn.Module):
        super().__init__(0, _identity, pool_prefix=False)
        self.vision = vision
        self.module = vision.head
        self.heads = self.module.attention.num_heads

    def normed(self, x: Tensor) -> Tensor:
        """``post_layernorm``."""
        return self.vision.post_layernorm(x)

    def _project(self, x: Tensor, index: int) -> Tensor:
        """Slice ``index`` (0 query, 1 key, 2 value) of the fused in-projection, per head."""
        attention = self.module.attention
        weight = attention.in_proj_weight.chunk(3)[index]
        bias = attention.in_proj_bias.chunk(3)[index]
        return split_heads(F.linear(x, weight, bias), self.heads)

    def query(self, batch: int) -> Tensor:
        """The probe's query per head."""
        return self._project(self.module.probe, 0).expand(batch, -1, -1, -1)

    def keys(self, tokens: Tensor) -> Tensor:
        """Keys per head."""
        return self._project(tokens, 1)

    def values(self, tokens: Tensor) -> Tensor:
        """Values per head."""
        return self._project(tokens, 2)

    def out(self, heads: Tensor) -> Tensor:
        """``out_proj``."""
        return self.module.attention.out_proj(merge_heads(heads))

    def residual_mlp(self, x: Tensor) -> Tensor:
        """``x + mlp(layernorm(x))``."""
        return x + self.module.mlp(self.module.layernorm(x))


def _identity(x: Tensor) -> Tensor:
    return x


class HfSiglipVision:
    """``SiglipVisionTransformer``: patch embedding plus positions (no CLS token, no pre-norm),
    ``SiglipEncoderLayer`` blocks (CLIP's layout), the MAP head."""

    prefix = 0

    def __init__(self, model: nn.Module):
        vision = model.vision_model
        if not getattr(vision, "use_head", True) or not hasattr(vision, "head"):
            raise ModelError("this SiglipModel has no pooling head (vision_use_head=False)")
        self.vision = vision
        self.patch_size, self.native_size, self.native_grid = vision_geometry(model)
        self.min_size = self.patch_size
        self.blocks = [HfClipBlock(layer) for layer in vision.encoder.layers]
        self.head = HfMapHead(vision)

    def embed(self, images: Tensor, positions: PositionMode) -> tuple[Tensor, Grid]:
        """Patch embedding plus the positional table resized to the grid."""
        embeddings = self.vision.embeddings
        x = embeddings.patch_embedding(images.to(embeddings.patch_embedding.weight.dtype))
        grid = (x.shape[-2], x.shape[-1])
        table = interpolate_positions(
            embeddings.position_embedding.weight, self.native_grid, grid, positions
        )
        return x.flatten(2).transpose(1, 2) + table.to(x.dtype), grid


class HfSiglipText(HfText):
    """``SiglipTextModel``: its last token's state through ``head`` is the text embedding; the
    tokenizer must be SigLIP's own (or any callable giving its token ids)."""

    causal = False  # bidirectional: every prompt runs at its full token length

    def __init__(self, model: nn.Module, tokenizer):
        if tokenizer is None:
            raise ModelError(
                "a SiglipModel needs its own tokenizer (SentencePiece, not CLIP's BPE): pass it, "
                "e.g. clip_surgery.wrap(model, tokenizer=AutoTokenizer.from_pretrained(FOLDER)), "
                "or any callable returning token ids"
            )
        super().__init__(model, tokenizer)

    def project(self, hidden: Tensor) -> Tensor:
        """The text model's ``head`` (with its bias)."""
        return self.model.text_model.head(hidden)


def build(module: nn.Module, tokenizer=None, mean=None, std=None) -> Backbone:
    """The adapters of a ``transformers.SiglipModel``."""
    return Backbone(
        FAMILY,
        module,
        HfSiglipVision(module),
        HfSiglipText(module, tokenizer),
        tuple(mean or SIGLIP_MEAN),
        tuple(std or SIGLIP_STD),
        module.logit_scale,
    )
