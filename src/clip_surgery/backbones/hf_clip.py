"""Adapters for Hugging Face ``transformers.CLIPModel`` (vision and text towers).

Imported only when such a model is used; ``transformers`` is the optional extra ``[hf]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ModelError
from ..images import OPENAI_MEAN, OPENAI_STD
from ..text import PromptTokenizer
from ..typedefs import Grid, PositionMode
from .base import Backbone
from .common import ClsHead, interpolate_positions, merge_heads, sdpa, split_heads


class HfClipBlock:
    """A ``CLIPEncoderLayer``: separate q/k/v projections, no layer scale."""

    def __init__(self, layer: nn.Module):
        self.layer = layer
        self.heads = layer.self_attn.num_heads

    def norm1(self, x: Tensor) -> Tensor:
        """``layer_norm1``."""
        return self.layer.layer_norm1(x)

    def qkv(self, normed: Tensor, grid: Grid) -> tuple[Tensor, Tensor, Tensor]:
        """``q_proj``, ``k_proj``, ``v_proj`` per head."""
        attention = self.layer.self_attn
        return tuple(
            split_heads(projection(normed), self.heads)
            for projection in (attention.q_proj, attention.k_proj, attention.v_proj)
        )

    def attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Scaled dot-product attention (CLIP's scale is head_dim ** -0.5)."""
        return sdpa(q, k, v)

    def out(self, heads: Tensor) -> Tensor:
        """``out_proj``."""
        return self.layer.self_attn.out_proj(merge_heads(heads))

    def ffn(self, x: Tensor) -> Tensor:
        """``x + mlp(layer_norm2(x))``."""
        return x + self.layer.mlp(self.layer.layer_norm2(x))


def vision_geometry(model: nn.Module) -> tuple[int, tuple[int, int], tuple[int, int]]:
    """A transformers vision config's patch size, native (height, width) and token grid."""
    config = model.config.vision_config
    patch, side = int(config.patch_size), int(config.image_size)
    return patch, (side, side), (side // patch, side // patch)


class HfClipVision:
    """``CLIPVisionTransformer`` plus ``visual_projection``."""

    prefix = 1

    def __init__(self, model: nn.Module):
        self.model = model
        vision = model.vision_model
        self.patch_size, self.native_size, self.native_grid = vision_geometry(model)
        self.min_size = self.patch_size
        self.blocks = [HfClipBlock(layer) for layer in vision.encoder.layers]
        self.head = ClsHead(vision.post_layernorm, self._project)

    def _project(self, x: Tensor) -> Tensor:
        return F.linear(x, self.model.visual_projection.weight)

    def embed(self, images: Tensor, positions: PositionMode) -> tuple[Tensor, Grid]:
        """Patch embedding, class embedding, interpolated positions, ``pre_layrnorm``."""
        vision = self.model.vision_model
        embeddings = vision.embeddings
        x = embeddings.patch_embedding(images.to(embeddings.patch_embedding.weight.dtype))
        batch, _, rows, cols = x.shape
        x = x.flatten(2).transpose(1, 2)
        cls = embeddings.class_embedding.to(x.dtype).view(1, 1, -1).expand(batch, 1, -1)
        table = interpolate_positions(
            embeddings.position_embedding.weight, self.native_grid, (rows, cols), positions
        )
        x = torch.cat([cls, x], dim=1) + table.to(x.dtype)
        return vision.pre_layrnorm(x), (rows, cols)


class HfText:
    """A transformers text model and its projection: ``get_text_features`` for the embedding,
    the final hidden states projected for per-token features. ``tokenizer=None``: CLIP's BPE."""

    def __init__(self, model: nn.Module, tokenizer=None):
        self.model = model
        self.context_length = int(model.config.text_config.max_position_embeddings)
        if tokenizer is None:
            from open_clip.tokenizer import SimpleTokenizer

            tokenizer = SimpleTokenizer(context_length=self.context_length)
        self.tokenizer = PromptTokenizer(tokenizer, self.context_length)

    def tokenize(self, prompts: list[str]) -> Tensor:
        """Token ids, with a clear error for a prompt longer than the context."""
        return self.tokenizer(prompts)

    def encode(self, tokens: Tensor) -> Tensor:
        """``get_text_features`` (its projected pooled output)."""
        features = self.model.get_text_features(input_ids=tokens)
        return getattr(features, "pooler_output", features)

    causal = True  # CLIP's text transformer: each position sees only the ones before it

    def prompt_lengths(self, tokens: Tensor) -> Tensor | None:
        """Through the pooled end token for a causal text model, as transformers pools: the
        highest id for the legacy ``eos_token_id == 2``, else the first end token."""
        if not self.causal:
            return None
        eos = self.model.config.text_config.eos_token_id
        if eos == 2:
            return tokens.argmax(dim=-1) + 1
        return (tokens == eos).int().argmax(dim=-1) + 1

    def project(self, hidden: Tensor) -> Tensor:
        """CLIP's ``text_projection`` (no bias)."""
        return F.linear(hidden, self.model.text_projection.weight)

    def token_features(self, tokens: Tensor) -> Tensor:
        """Every token's final hidden state (after the final norm), projected."""
        return self.project(self.model.text_model(input_ids=tokens).last_hidden_state)

    def pieces(self, word: str) -> int:
        """Tokens of ``word`` without the start and end tokens."""
        return self.tokenizer.pieces(word)


def matches(module: nn.Module) -> bool:
    """True for a ``transformers`` model object (checked without importing transformers)."""
    return type(module).__module__.startswith("transformers.")


def build(module: nn.Module, tokenizer=None, mean=None, std=None) -> Backbone:
    """The adapters of a ``transformers.CLIPModel`` (``SiglipModel``: hf_siglip)."""
    if type(module).__name__ == "SiglipModel":
        from . import hf_siglip

        return hf_siglip.build(module, tokenizer, mean, std)
    if type(module).__name__ != "CLIPModel":
        raise ModelError(
            f"unsupported transformers model {type(module).__name__}: clip-surgery runs "
            "transformers CLIPModel and SiglipModel (and open_clip CLIP, SigLIP and EVA models)"
        )
    return Backbone(
        "transformers CLIP",
        module,
        HfClipVision(module),
        HfText(module, tokenizer),
        tuple(mean or OPENAI_MEAN),
        tuple(std or OPENAI_STD),
        module.logit_scale,
    )
