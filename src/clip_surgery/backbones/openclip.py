"""Adapters for open_clip models: ``VisionTransformer`` and ``ModifiedResNet`` towers, and the
text transformer (Cherti et al., open_clip, github.com/mlfoundations/open_clip)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import (
    ResidualAttentionBlock,
    TextTransformer,
    VisionTransformer,
    text_global_pool,
)
from torch import Tensor, nn

from ..errors import ModelError
from ..images import OPENAI_MEAN, OPENAI_STD
from ..text import PromptTokenizer
from ..typedefs import Grid, PositionMode
from .base import Attention, AttentionContext, Backbone
from .common import ClsHead, MeanHead, interpolate_positions, merge_heads, sdpa, split_heads

SUPPORTED = (
    "open_clip VisionTransformer (CLS or average pooling) and ModifiedResNet towers, and timm "
    "ViT / Eva towers (SigLIP, SigLIP 2, EVA-02)"
)
CLIP_VOCABULARY = 49408  # CLIP's BPE (open_clip's SimpleTokenizer)


def _pair(size) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


class OpenClipBlock:
    """A ``ResidualAttentionBlock``: fused in-projection, ``ls_1``/``ls_2`` layer scales."""

    def __init__(self, block: ResidualAttentionBlock):
        self.block = block
        self.heads = block.attn.num_heads

    def norm1(self, x: Tensor) -> Tensor:
        """``ln_1``."""
        return self.block.ln_1(x)

    def qkv(self, normed: Tensor, grid: Grid) -> tuple[Tensor, Tensor, Tensor]:
        """The value, key and query slices of the fused in-projection, per head."""
        attn = self.block.attn
        q, k, v = F.linear(normed, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        return split_heads(q, self.heads), split_heads(k, self.heads), split_heads(v, self.heads)

    def attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Scaled dot-product attention."""
        return sdpa(q, k, v)

    def out(self, heads: Tensor) -> Tensor:
        """``ls_1(out_proj(heads))``."""
        projection = self.block.attn.out_proj
        return self.block.ls_1(F.linear(merge_heads(heads), projection.weight, projection.bias))

    def ffn(self, x: Tensor) -> Tensor:
        """``x + ls_2(mlp(ln_2(x)))``."""
        return x + self.block.ls_2(self.block.mlp(self.block.ln_2(x)))


class OpenClipViT:
    """open_clip ``VisionTransformer`` with CLS or average pooling and a projection."""

    prefix = 1

    def __init__(self, visual: VisionTransformer):
        _check_vit(visual)
        self.visual = visual
        self.blocks = [OpenClipBlock(block) for block in visual.transformer.resblocks]
        head = MeanHead if visual.pool_type == "avg" else ClsHead
        self.head = head(visual.ln_post, self._project)
        self.native_size = _pair(visual.image_size)
        self.min_size = max(_pair(visual.patch_size))

    def _project(self, x: Tensor) -> Tensor:
        return x @ self.visual.proj

    def embed(self, images: Tensor, positions: PositionMode) -> tuple[Tensor, Grid]:
        """Patch embedding, CLS, interpolated positions and ``ln_pre``."""
        visual = self.visual
        x = visual.conv1(images.to(next(visual.conv1.parameters()).dtype))  # a conv or a stem
        batch, _, rows, cols = x.shape
        x = x.flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(batch, 1, -1)
        table = interpolate_positions(
            visual.positional_embedding, tuple(visual.grid_size), (rows, cols), positions
        )
        x = torch.cat([cls, x], dim=1) + table.to(x.dtype)
        return visual.ln_pre(x), (rows, cols)


def _check_vit(visual: VisionTransformer) -> None:
    pools = visual.pool_type == "tok" or (
        visual.pool_type == "avg" and not visual.final_ln_after_pool
    )
    if visual.attn_pool is not None or not pools or visual.proj is None:
        raise ModelError(
            "unsupported open_clip ViT: clip-surgery needs CLS-token or average pooling (norm "
            "before the pool) and a projection (no attentional pooler)"
        )
    for block in visual.transformer.resblocks:
        if type(block) is not ResidualAttentionBlock or hasattr(block, "ln_1_kv"):
            raise ModelError(f"unsupported ViT block type {type(block).__name__}")
        if not isinstance(block.attn, nn.MultiheadAttention):
            raise ModelError(f"unsupported ViT attention type {type(block.attn).__name__}")


class AttentionPoolHead:
    """ModifiedResNet's attention pool: ``[mean, tokens...] + positions``, one multi-head
    attention whose mean-token output is the image embedding. Each patch token's dense feature
    is the same attention with that token as the query (or the method's attention)."""

    pools_first_token = False
    attentive = True

    def __init__(self, pool: nn.Module):
        self.module = pool

    def _tokens(self, x: Tensor, grid: Grid, positions: PositionMode) -> Tensor:
        table = self.module.positional_embedding
        side = round((table.shape[0] - 1) ** 0.5)
        tokens = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
        return tokens + interpolate_positions(table, (side, side), grid, positions).to(x.dtype)

    def _split(self, projection: nn.Module, tokens: Tensor) -> Tensor:
        return split_heads(projection(tokens), self.module.num_heads)

    def pool(self, x: Tensor, grid: Grid, positions: PositionMode) -> Tensor:
        """The attention pool's own output for the mean token: CLIP's image embedding."""
        pool, tokens = self.module, self._tokens(x, grid, positions)
        q = self._split(pool.q_proj, tokens[:, :1])
        attended = sdpa(q, self._split(pool.k_proj, tokens), self._split(pool.v_proj, tokens))
        return pool.c_proj(merge_heads(attended))[:, 0]

    def dense(
        self, x: Tensor, grid: Grid, positions: PositionMode, attention: Attention | None
    ) -> Tensor:
        """Every patch token through the pool's attention (or ``attention``) and ``c_proj``."""
        pool, tokens = self.module, self._tokens(x, grid, positions)
        q, k, v = (self._split(p, tokens) for p in (pool.q_proj, pool.k_proj, pool.v_proj))
        if attention is None:
            attended = sdpa(q, k, v)
        else:
            attended = attention(q, k, v, AttentionContext(grid, 1, tokens, -1))
        return pool.c_proj(merge_heads(attended))[:, 1:]


class OpenClipResNet:
    """open_clip ``ModifiedResNet``: the trunk gives the tokens, the attention pool is the head."""

    prefix = 0
    blocks: tuple = ()
    min_size = 32

    def __init__(self, visual: ModifiedResNet):
        self.visual = visual
        self.head = AttentionPoolHead(visual.attnpool)
        self.native_size = _pair(visual.image_size)

    def embed(self, images: Tensor, positions: PositionMode) -> tuple[Tensor, Grid]:
        """The trunk's last feature map as tokens ``[B, h*w, C]`` (the model's own layers)."""
        visual = self.visual
        x = visual.stem(images.to(visual.conv1.weight.dtype))
        x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
        return x.flatten(2).transpose(1, 2), (x.shape[-2], x.shape[-1])


class OpenClipText:
    """open_clip's text side: its tokenizer and ``encode_text``; the built-in CLIP text
    transformer, or a ``CustomTextCLIP``'s ``TextTransformer`` (SigLIP, EVA-CLIP)."""

    def __init__(self, module: nn.Module, tokenizer=None):
        self.module = module
        self.context_length = int(module.context_length)
        if tokenizer is None:
            _check_clip_vocabulary(module)
            tokenizer = SimpleTokenizer(context_length=self.context_length)
        self.tokenizer = PromptTokenizer(tokenizer, self.context_length)

    def tokenize(self, prompts: list[str]) -> Tensor:
        """Token ids, with a clear error for a prompt longer than the context."""
        return self.tokenizer(prompts)

    def encode(self, tokens: Tensor) -> Tensor:
        """open_clip's own ``encode_text``; the same computation on a cut context."""
        causal = _causal_text(self.module)
        if causal is None or tokens.shape[1] == self.context_length:
            return self.module.encode_text(tokens)
        holder, pool_type, eos = causal
        length = tokens.shape[1]
        cast = holder.transformer.get_cast_dtype()
        x = holder.token_embedding(tokens).to(cast)
        x = x + holder.positional_embedding[:length].to(cast)
        x = holder.transformer(x, attn_mask=holder.attn_mask[:length, :length])
        x = text_global_pool(holder.ln_final(x), tokens, pool_type, eos)
        return _project_text(x, holder.text_projection)

    def prompt_lengths(self, tokens: Tensor) -> Tensor | None:
        """Through the pooled token, for a causal text transformer pooling at the end token
        (argmax or eos pooling); None otherwise."""
        causal = _causal_text(self.module)
        if causal is None:
            return None
        _, pool_type, eos = causal
        if pool_type == "argmax":
            return tokens.argmax(dim=-1) + 1
        return (tokens == eos).int().argmax(dim=-1) + 1

    def token_features(self, tokens: Tensor) -> Tensor:
        """Every token through the text transformer, ``ln_final`` and the text projection."""
        clip = self.module
        text = getattr(clip, "text", None)
        if isinstance(text, TextTransformer):
            return _text_transformer_tokens(text, tokens)
        if not hasattr(clip, "token_embedding"):
            raise ModelError("per-token text features need open_clip's built-in text transformer")
        length = tokens.shape[1]
        x = clip.token_embedding(tokens) + clip.positional_embedding[:length]
        x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask[:length, :length]))
        return _project_text(x, clip.text_projection)

    def pieces(self, word: str) -> int:
        """Tokens of ``word`` without the start and end tokens."""
        return self.tokenizer.pieces(word)


def _causal_text(clip: nn.Module) -> tuple[nn.Module, str, int | None] | None:
    """The module holding a causal, end-token-pooled text transformer (CLIP itself, or a
    ``CustomTextCLIP``'s ``TextTransformer``), its pool type and end id; None for others."""
    if hasattr(clip, "token_embedding"):
        holder, pool_type, eos = clip, clip.text_pool_type, getattr(clip, "text_eos_id", None)
    elif isinstance(getattr(clip, "text", None), TextTransformer):
        holder = clip.text
        if holder.cls_emb is not None or holder.use_pad_mask:
            return None
        pool_type, eos = holder.pool_type, getattr(holder, "eos_id", None)
    else:
        return None
    if getattr(holder, "attn_mask", None) is None or pool_type not in ("argmax", "eos"):
        return None
    if pool_type == "eos" and eos is None:
        return None
    return holder, pool_type, eos


def _project_text(x: Tensor, projection) -> Tensor:
    if projection is None:
        return x
    return projection(x) if isinstance(projection, nn.Linear) else x @ projection


def _text_transformer_tokens(text: TextTransformer, tokens: Tensor) -> Tensor:
    """A ``TextTransformer``'s last block output, ``ln_final`` and projection, per token."""
    output = text.forward_intermediates(
        tokens, indices=1, normalize_intermediates=True, intermediates_only=True, output_fmt="NLC"
    )
    return _project_text(output["text_intermediates"][-1], text.text_projection)


def _text_vocabulary(module: nn.Module) -> int | None:
    text = getattr(module, "text", module)
    embedding = getattr(text, "token_embedding", None)
    return embedding.num_embeddings if isinstance(embedding, nn.Embedding) else None


def _check_clip_vocabulary(module: nn.Module) -> None:
    """ModelError when CLIP's BPE cannot be the default: the text tower has another vocabulary."""
    vocabulary = _text_vocabulary(module)
    if vocabulary is not None and vocabulary != CLIP_VOCABULARY:
        raise ModelError(
            f"this model's text tower has a {vocabulary}-token vocabulary, not CLIP's BPE "
            f"({CLIP_VOCABULARY}): pass its tokenizer, e.g. clip_surgery.wrap(model, "
            "tokenizer=open_clip.get_tokenizer(NAME)), or any callable returning token ids"
        )


def matches(module: nn.Module) -> bool:
    """True for an open_clip CLIP-like model (a ``visual`` tower and ``encode_text``)."""
    return hasattr(module, "visual") and hasattr(module, "encode_text")


def build(module: nn.Module, tokenizer=None, mean=None, std=None) -> Backbone:
    """The adapters of an open_clip ``CLIP`` or ``CustomTextCLIP``."""
    vision, family = _vision(module.visual)
    visual = module.visual
    mean = tuple(mean or getattr(visual, "image_mean", None) or OPENAI_MEAN)
    std = tuple(std or getattr(visual, "image_std", None) or OPENAI_STD)
    return Backbone(
        family, module, vision, OpenClipText(module, tokenizer), mean, std, module.logit_scale
    )


def _vision(visual: nn.Module):
    """The vision adapter and family name of an open_clip tower."""
    if isinstance(visual, ModifiedResNet):
        return OpenClipResNet(visual), "open_clip ModifiedResNet"
    if isinstance(visual, VisionTransformer):
        suffix = " (avg pool)" if visual.pool_type == "avg" else ""
        return OpenClipViT(visual), "open_clip ViT" + suffix
    if type(visual).__name__ == "TimmModel":
        from . import openclip_timm

        tower = openclip_timm.TimmTower(visual)
        return tower, tower.family
    raise ModelError(
        f"unsupported visual tower {type(visual).__name__}: clip-surgery runs {SUPPORTED}, "
        "and transformers CLIPModel and SiglipModel"
    )
