"""Adapters for open_clip ``TimmModel`` vision towers: timm's ``VisionTransformer`` (SigLIP and
SigLIP 2, pooled by a MAP head, no CLS token) and timm's ``Eva`` (EVA-02: rotary position
embeddings, SwiGLU MLPs, CLS pooling).

Sources: Zhai et al., "Sigmoid Loss for Language Image Pre-Training", ICCV 2023 and Tschannen et
al., "SigLIP 2", arXiv 2502.14786 (github.com/google-research/big_vision); Sun et al., "EVA-CLIP:
Improved Training Techniques for CLIP at Scale", arXiv 2303.15389 and Fang et al., "EVA-02: A
Visual Representation for Neon Genesis", arXiv 2303.11331 (github.com/baaivision/EVA); timm
(github.com/huggingface/pytorch-image-models) and open_clip (github.com/mlfoundations/open_clip)
for the modules read here. Imported only when such a model is used.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from open_clip.timm_model import TimmModel
from timm.layers import Attention as TimmAttention
from timm.layers import AttentionPoolLatent
from timm.layers.pos_embed_sincos import RotaryEmbeddingCat, apply_rot_embed_cat
from timm.models.eva import Eva, EvaAttention, EvaBlock
from timm.models.vision_transformer import Block as TimmBlock
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from ..errors import ModelError
from ..typedefs import Grid, PositionMode
from .common import ClsHead, LatentPoolHead, interpolate_positions, merge_heads, sdpa, split_heads

MAP_FAMILY = "open_clip SigLIP"
CLS_FAMILY = "open_clip EVA"
SUPPORTED = (
    "timm VisionTransformer towers (MAP or CLS pooling, as SigLIP and SigLIP 2) and timm Eva "
    "towers (CLS pooling, as EVA-02)"
)


def _unsupported(what: str) -> ModelError:
    return ModelError(f"unsupported open_clip timm tower: {what}; clip-surgery runs {SUPPORTED}")


def _split_fused(fused: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """A fused ``[B, N, 3W]`` projection's q, k, v per head (timm's channel order)."""
    q, k, v = fused.chunk(3, dim=-1)
    return split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)


class TimmVitBlock:
    """A timm ``vision_transformer.Block``: fused qkv, optional q/k norms, optional scale norm
    before ``proj``, ``ls1``/``ls2`` layer scales."""

    def __init__(self, block: TimmBlock):
        self.block = block
        self.heads = block.attn.num_heads

    def norm1(self, x: Tensor) -> Tensor:
        """``norm1``."""
        return self.block.norm1(x)

    def qkv(self, normed: Tensor, grid: Grid) -> tuple[Tensor, Tensor, Tensor]:
        """The fused ``qkv`` projection per head, then ``q_norm`` and ``k_norm``."""
        attention = self.block.attn
        q, k, v = _split_fused(attention.qkv(normed), self.heads)
        return attention.q_norm(q), attention.k_norm(k), v

    def attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Scaled dot-product attention (scale head_dim ** -0.5, as timm's)."""
        return sdpa(q, k, v)

    def out(self, heads: Tensor) -> Tensor:
        """``ls1(proj(norm(heads)))``."""
        attention = self.block.attn
        return self.block.ls1(attention.proj(attention.norm(merge_heads(heads))))

    def ffn(self, x: Tensor) -> Tensor:
        """``x + ls2(mlp(norm2(x)))``."""
        return x + self.block.ls2(self.block.mlp(self.block.norm2(x)))


class RopeTable:
    """timm's rotary embedding table for any grid, built on a copy so the model keeps its own
    (the table timm's ``set_input_size`` would build for that size)."""

    def __init__(self, rope: RotaryEmbeddingCat):
        self.rope = rope
        self._cached: tuple[tuple, Tensor] | None = None

    def _build(self, grid: Grid) -> Tensor:
        rope = self.rope
        if rope.feat_shape is None:  # a dynamic-size model builds its table per call
            return rope.get_embed(shape=list(grid))
        if tuple(rope.feat_shape) == tuple(grid):
            return rope.get_embed()
        resized = copy.deepcopy(rope)
        resized.update_feat_shape(list(grid))
        return resized.get_embed()

    def __call__(self, grid: Grid) -> Tensor:
        """The ``[h*w, 2 * dim]`` sin/cos table for ``grid`` (the last one is kept)."""
        key = (tuple(grid), self.rope.bands.device)
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, self._build(grid))
        return self._cached[1]


class TimmEvaBlock:
    """A timm ``EvaBlock``: q/k/v projections (fused or not, no key bias), rotary position
    embeddings on the patch tokens' q and k, scale norm before ``proj``, SwiGLU or plain MLP,
    ``gamma_1``/``gamma_2`` layer scales."""

    def __init__(self, block: EvaBlock, rope: RopeTable | None):
        self.block = block
        self.heads = block.attn.num_heads
        self.rope = rope

    def norm1(self, x: Tensor) -> Tensor:
        """``norm1``."""
        return self.block.norm1(x)

    def _project(self, normed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        attention = self.block.attn
        if attention.qkv is None:
            return tuple(
                split_heads(projection(normed), self.heads)
                for projection in (attention.q_proj, attention.k_proj, attention.v_proj)
            )
        bias = None
        if attention.q_bias is not None:
            bias = torch.cat((attention.q_bias, attention.k_bias, attention.v_bias))
        return _split_fused(F.linear(normed, attention.qkv.weight, bias), self.heads)

    def _rotate(self, x: Tensor, table: Tensor) -> Tensor:
        attention = self.block.attn
        prefix, half = attention.num_prefix_tokens, getattr(attention, "rotate_half", False)
        rotated = apply_rot_embed_cat(x[:, :, prefix:], table, half=half)
        return torch.cat([x[:, :, :prefix], rotated], dim=2)

    def qkv(self, normed: Tensor, grid: Grid) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v per head; q and k normed, then rotated by the grid's rotary table."""
        attention = self.block.attn
        q, k, v = self._project(normed)
        q, k = attention.q_norm(q), attention.k_norm(k)
        if self.rope is not None:
            table = self.rope(grid)
            q, k = self._rotate(q, table).type_as(v), self._rotate(k, table).type_as(v)
        return q, k, v

    def attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Scaled dot-product attention (scale head_dim ** -0.5, as timm's)."""
        return sdpa(q, k, v)

    def out(self, heads: Tensor) -> Tensor:
        """``gamma_1 * proj(norm(heads))``."""
        attention = self.block.attn
        x = attention.proj(attention.norm(merge_heads(heads)))
        return x if self.block.gamma_1 is None else self.block.gamma_1 * x

    def ffn(self, x: Tensor) -> Tensor:
        """``x + gamma_2 * mlp(norm2(x))``."""
        y = self.block.mlp(self.block.norm2(x))
        return x + (y if self.block.gamma_2 is None else self.block.gamma_2 * y)


class TimmMapHead(LatentPoolHead):
    """timm's ``AttentionPoolLatent`` after the trunk's final norm, then the trunk's
    ``fc_norm`` and ``head`` and open_clip's head (identities for SigLIP)."""

    def __init__(self, trunk: nn.Module, project, pool_prefix: bool):
        super().__init__(trunk.num_prefix_tokens, project, pool_prefix)
        self.trunk = trunk
        self.module: AttentionPoolLatent = trunk.attn_pool

    def normed(self, x: Tensor) -> Tensor:
        """The trunk's final ``norm``."""
        return self.trunk.norm(x)

    def query(self, batch: int) -> Tensor:
        """``q_norm(q(latent))`` per head."""
        pool = self.module
        query = pool.q_norm(split_heads(pool.q(pool.latent), pool.num_heads))
        return query.expand(batch, -1, -1, -1)

    def _kv(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        keys, values = self.module.kv(tokens).chunk(2, dim=-1)
        return split_heads(keys, self.module.num_heads), split_heads(values, self.module.num_heads)

    def keys(self, tokens: Tensor) -> Tensor:
        """``k_norm`` of the key half of ``kv``, per head."""
        return self.module.k_norm(self._kv(tokens)[0])

    def values(self, tokens: Tensor) -> Tensor:
        """The value half of ``kv``, per head."""
        return self._kv(tokens)[1]

    def out(self, heads: Tensor) -> Tensor:
        """``proj``."""
        return self.module.proj(merge_heads(heads))

    def residual_mlp(self, x: Tensor) -> Tensor:
        """``x + mlp(norm(x))``."""
        return x + self.module.mlp(self.module.norm(x))


class TimmTower:
    """An open_clip ``TimmModel`` over a timm ``VisionTransformer`` or ``Eva`` trunk."""

    def __init__(self, visual: TimmModel):
        trunk = visual.trunk
        _check_trunk(visual, trunk)
        self.visual = visual
        self.trunk = trunk
        self.prefix = int(trunk.num_prefix_tokens)
        patch = trunk.patch_embed
        self.native_grid = tuple(int(side) for side in patch.grid_size)
        native = getattr(patch, "img_size", None) or visual.image_size  # the size timm takes
        self.native_size = tuple(int(side) for side in native)
        self.min_size = max(int(side) for side in patch.patch_size)
        self.blocks = self._blocks(trunk)
        self.rotary = isinstance(trunk, Eva) and trunk.rope is not None
        self.head = self._head(trunk)
        self.family = MAP_FAMILY if isinstance(self.head, TimmMapHead) else CLS_FAMILY

    def _blocks(self, trunk: nn.Module) -> list:
        if isinstance(trunk, Eva):
            rope = RopeTable(trunk.rope) if trunk.rope is not None else None
            return [TimmEvaBlock(block, rope) for block in trunk.blocks]
        return [TimmVitBlock(block) for block in trunk.blocks]

    def _project(self, x: Tensor) -> Tensor:
        return self.visual.head(self.trunk.head(self.trunk.fc_norm(x)))

    def _head(self, trunk: nn.Module):
        if trunk.attn_pool is not None:
            pool_prefix = isinstance(trunk, Eva) or trunk.pool_include_prefix
            return TimmMapHead(trunk, self._project, pool_prefix)
        return ClsHead(trunk.norm, self._project, self.prefix)

    def embed(self, images: Tensor, positions: PositionMode) -> tuple[Tensor, Grid]:
        """Patch embedding, prefix tokens, resized absolute positions, ``norm_pre``."""
        trunk, patch = self.trunk, self.trunk.patch_embed
        x = patch.proj(images.to(next(patch.proj.parameters()).dtype))  # a conv or a stem
        grid = (x.shape[-2], x.shape[-1])
        x = patch.norm(x.flatten(2).transpose(1, 2))
        prefix = [
            token.expand(len(x), -1, -1).to(x.dtype)
            for token in (getattr(trunk, "cls_token", None), getattr(trunk, "reg_token", None))
            if token is not None
        ]
        table = None
        if trunk.pos_embed is not None:
            table = interpolate_positions(trunk.pos_embed[0], self.native_grid, grid, positions)
            table = table.to(x.dtype)
        if trunk.no_embed_class:
            x = torch.cat([*prefix, x if table is None else x + table], dim=1)
        else:
            x = torch.cat([*prefix, x], dim=1)
            x = x if table is None else x + table
        return trunk.norm_pre(x), grid


def _check_trunk(visual: TimmModel, trunk: nn.Module) -> None:
    """ModelError for what these adapters do not read."""
    if "pool" in dict(visual.head.named_children()):
        raise _unsupported("open_clip attention pooling over timm features (abs_attn, rot_attn)")
    if isinstance(trunk, VisionTransformer):
        _check_vit(trunk)
    elif isinstance(trunk, Eva):
        _check_eva(trunk)
    else:
        raise _unsupported(f"trunk {type(trunk).__name__}")
    if getattr(trunk.patch_embed, "dynamic_img_pad", False):
        raise _unsupported("dynamic image padding")
    if trunk.attn_pool is not None:
        _check_map(trunk.attn_pool)
    elif trunk.global_pool != "token":
        raise _unsupported(f"global pool {trunk.global_pool!r} (needs 'map' or 'token')")


def _check_vit(trunk: VisionTransformer) -> None:
    for block in trunk.blocks:
        attention = block.attn
        if type(block) is not TimmBlock or type(attention) is not TimmAttention:
            raise _unsupported(f"block {type(block).__name__} with {type(attention).__name__}")
        if getattr(attention, "gate", None) is not None:
            raise _unsupported("gated attention")


def _check_eva(trunk: Eva) -> None:
    if trunk.rope is not None and (
        type(trunk.rope) is not RotaryEmbeddingCat or getattr(trunk, "rope_mixed", False)
    ):
        raise _unsupported(f"rotary embedding {type(trunk.rope).__name__}")
    for block in trunk.blocks:
        if type(block) is not EvaBlock or type(block.attn) is not EvaAttention:
            raise _unsupported(f"block {type(block).__name__} with {type(block.attn).__name__}")
        if getattr(block.attn, "gate", None) is not None:
            raise _unsupported("gated attention")


def _check_map(pool: nn.Module) -> None:
    if not isinstance(pool, AttentionPoolLatent):
        raise _unsupported(f"pooling head {type(pool).__name__}")
    if pool.latent_len != 1 or pool.pos_embed is not None or pool.mlp is None:
        raise _unsupported("a MAP head with several latents, its own positions or no MLP")


def matches(visual: nn.Module) -> bool:
    """True for an open_clip ``TimmModel`` tower."""
    return isinstance(visual, TimmModel)
