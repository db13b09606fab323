"""Token forwards over an open_clip visual tower's own parameters.

The architecture surgery of CLIP Surgery (Li et al., "A Closer Look at the Explainability of
Contrastive Language-Image Pre-training", Pattern Recognition 2025, arXiv 2304.05653;
reference code github.com/xmed-lab/CLIP_Surgery) as a separate forward: the wrapped model is
read, never modified, so the same model still gives raw CLIP outputs at any resolution.

ViT: blocks run unchanged up to ``L - depth``; from there an original path (the model's blocks)
and a surgery path (value-value attention of each block on the original path's input, no FFN,
never fed back) run side by side. One pass yields CLIP's CLS and the dense surgery tokens.

ModifiedResNet: the attention pool becomes value-value for the spatial tokens; the CLS is the
model's ordinary attention-pool output. (The reference code also turns the pooled token into the
v-v form; we keep CLIP's real image embedding instead.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

from .errors import ImageError, ModelError


def interpolate_positions(
    table: torch.Tensor, native_grid: tuple[int, int], grid: tuple[int, int]
) -> torch.Tensor:
    """Bilinearly resize the patch part of a ``[1 + h*w, C]`` positional table; CLS stays.

    Returns a new tensor (the model's table is never written to).
    """
    if tuple(native_grid) == tuple(grid):
        return table
    cls_position, patches = table[:1], table[1:]
    patches = patches.reshape(1, native_grid[0], native_grid[1], -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=grid, mode="bilinear", align_corners=False)
    return torch.cat([cls_position, patches.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)])


def check_supported(visual: nn.Module) -> None:
    """Raise ModelError unless the tower is a ViT or ModifiedResNet this engine can run."""
    if isinstance(visual, ModifiedResNet):
        return
    if not isinstance(visual, VisionTransformer):
        raise ModelError(
            f"unsupported visual tower {type(visual).__name__}: clip-surgery runs open_clip "
            "VisionTransformer and ModifiedResNet towers"
        )
    if visual.attn_pool is not None or visual.pool_type != "tok" or visual.proj is None:
        raise ModelError("unsupported ViT: needs CLS-token pooling and a projection (no attn pool)")
    for block in visual.transformer.resblocks:
        if not isinstance(block, ResidualAttentionBlock) or hasattr(block, "ln_1_kv"):
            raise ModelError(f"unsupported ViT block type {type(block).__name__}")


def min_input_size(visual: nn.Module) -> int:
    """The smallest input side in pixels that gives at least one token."""
    return 32 if isinstance(visual, ModifiedResNet) else max(visual.patch_size)


def encode_tokens(
    visual: nn.Module, images: torch.Tensor, depth: int
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Projected tokens ``[B, 1+N, D]`` (CLS first) and their grid ``(h, w)``.

    ``depth`` 0 is the plain model; for a ResNet any positive depth means surgery.
    """
    if images.shape[-2] < min_input_size(visual) or images.shape[-1] < min_input_size(visual):
        raise ImageError(
            f"input {tuple(images.shape[-2:])} is smaller than {min_input_size(visual)} pixels"
        )
    if isinstance(visual, ModifiedResNet):
        return _resnet_tokens(visual, images, surgery=depth > 0)
    return _vit_tokens(visual, images, depth)


# ---------------------------------------------------------------- ViT


def _vit_embed(
    visual: VisionTransformer, images: torch.Tensor
) -> tuple[torch.Tensor, tuple[int, int]]:
    x = visual.conv1(images.to(visual.conv1.weight.dtype))
    batch, _, grid_h, grid_w = x.shape
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(batch, 1, -1)
    x = torch.cat([cls, x], dim=1)
    native = tuple(visual.grid_size)
    x = x + interpolate_positions(visual.positional_embedding, native, (grid_h, grid_w)).to(x.dtype)
    return visual.ln_pre(x), (grid_h, grid_w)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, tokens, width = x.shape
    return x.view(batch, tokens, heads, width // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


def _qkv(block: ResidualAttentionBlock, x: torch.Tensor):
    attn = block.attn
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    return tuple(_split_heads(t, attn.num_heads) for t in (q, k, v))


def _out_proj(block: ResidualAttentionBlock, heads_out: torch.Tensor) -> torch.Tensor:
    out_proj = block.attn.out_proj
    return F.linear(_merge_heads(heads_out), out_proj.weight, out_proj.bias)


def _ffn(block: ResidualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _plain_block(block: ResidualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
    q, k, v = _qkv(block, block.ln_1(x))
    x = x + block.ls_1(_out_proj(block, F.scaled_dot_product_attention(q, k, v)))
    return _ffn(block, x)


def _dual_block(
    block: ResidualAttentionBlock, original: torch.Tensor, surgery: torch.Tensor, last: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = _qkv(block, block.ln_1(original))
    value_value = F.scaled_dot_product_attention(v, v, v)
    surgery = surgery + block.ls_1(_out_proj(block, value_value))
    if last:
        # After the last block only the original path's CLS is used: one query, one FFN row.
        q, original = q[:, :, :1], original[:, :1]
    attended = F.scaled_dot_product_attention(q, k, v)
    original = _ffn(block, original + block.ls_1(_out_proj(block, attended)))
    return original, surgery


def _vit_tokens(
    visual: VisionTransformer, images: torch.Tensor, depth: int
) -> tuple[torch.Tensor, tuple[int, int]]:
    blocks = visual.transformer.resblocks
    if not 0 <= depth <= len(blocks):
        raise ModelError(f"surgery depth must be in [0, {len(blocks)}], got {depth}")
    x, grid = _vit_embed(visual, images)
    start = len(blocks) - depth
    for block in blocks[:start]:
        x = _plain_block(block, x)
    if depth > 0:
        original, surgery = x, x
        for index, block in enumerate(blocks[start:], start=start):
            original, surgery = _dual_block(block, original, surgery, last=index == len(blocks) - 1)
        x = torch.cat([original[:, :1], surgery[:, 1:]], dim=1)
    return visual.ln_post(x) @ visual.proj, grid


# ---------------------------------------------------------------- ModifiedResNet


def _resnet_tokens(
    visual: ModifiedResNet, images: torch.Tensor, surgery: bool
) -> tuple[torch.Tensor, tuple[int, int]]:
    x = visual.stem(images.to(visual.conv1.weight.dtype))
    x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
    pool = visual.attnpool
    _, _, grid_h, grid_w = x.shape
    tokens = x.flatten(2).transpose(1, 2)
    tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
    side = round((pool.positional_embedding.shape[0] - 1) ** 0.5)
    positions = interpolate_positions(pool.positional_embedding, (side, side), (grid_h, grid_w))
    tokens = tokens + positions.to(tokens.dtype)

    heads = pool.num_heads
    v = _split_heads(pool.v_proj(tokens), heads)
    k = _split_heads(pool.k_proj(tokens), heads)
    q = _split_heads(pool.q_proj(tokens[:, :1] if surgery else tokens), heads)
    plain = pool.c_proj(_merge_heads(F.scaled_dot_product_attention(q, k, v)))
    if not surgery:
        return plain, (grid_h, grid_w)
    value_value = pool.c_proj(_merge_heads(F.scaled_dot_product_attention(v, v, v)))
    return torch.cat([plain, value_value[:, 1:]], dim=1), (grid_h, grid_w)
