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

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

from .errors import ImageError, ModelError

POSITION_MODES = ("bilinear", "bicubic-dino", "bicubic-antialias")


def interpolate_positions(
    table: torch.Tensor,
    native_grid: tuple[int, int],
    grid: tuple[int, int],
    mode: str = "bilinear",
) -> torch.Tensor:
    """Resize the patch part of a ``[1 + h*w, C]`` positional table to ``grid``; CLS stays.

    ``bilinear``: CLIP Surgery's reference (``align_corners=False``, no antialias).
    ``bicubic-dino``: bicubic with DINO's ``scale_factor=(g + 0.1) / side`` trick, as SCLIP,
    ClearCLIP and NACLIP do. ``bicubic-antialias``: timm's resampling, as GEM does.
    Returns a new tensor (the model's table is never written to).
    """
    if tuple(native_grid) == tuple(grid):
        return table
    cls_position, patches = table[:1], table[1:]
    patches = patches.reshape(1, native_grid[0], native_grid[1], -1).permute(0, 3, 1, 2)
    if mode == "bilinear":
        patches = F.interpolate(patches, size=grid, mode="bilinear", align_corners=False)
    elif mode == "bicubic-dino":
        factor = ((grid[0] + 0.1) / native_grid[0], (grid[1] + 0.1) / native_grid[1])
        patches = F.interpolate(patches, scale_factor=factor, mode="bicubic")
    elif mode == "bicubic-antialias":
        patches = F.interpolate(patches, size=grid, mode="bicubic", antialias=True)
    else:
        raise ValueError(f"unknown position interpolation {mode!r}; one of {POSITION_MODES}")
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


ATTENTIONS = ("qk", "vv", "kk", "qq", "identity", "csa", "neighbourhood", "self-self")


@dataclass(frozen=True)
class Policy:
    """What the last ``blocks`` blocks of a ViT do; the earlier blocks always run unchanged.

    kind ``plain``: the model as is. ``dual``: a new path beside the original one (CLIP Surgery,
    GEM): ``s <- s + attention(ln_1(o))``, optionally its block's FFN, never fed back; its CLS
    comes from the original path (``cls="original"``) or its own (``cls="new"``).
    ``replace``: each of those blocks becomes ``[x +] attention(ln_1(x)) [+ FFN]``.
    ``attention`` is one of ATTENTIONS: softmax(a b^T / sqrt(d)) v with a, b from q/k/v;
    ``identity`` (v itself); ``csa`` (qq + kk); ``neighbourhood`` (kk plus a Gaussian window of
    ``gaussian_std`` patches); ``self-self`` (GEM's normalised q-q, k-k, v-v, iterated).
    """

    kind: str = "plain"
    blocks: int = 0
    attention: str = "qk"
    residual: bool = True
    ffn: bool = False
    cls: str = "original"
    positions: str = "bilinear"
    gaussian_std: float = 5.0
    self_self_iterations: int = 1
    self_self_temperature: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("plain", "dual", "replace"):
            raise ValueError(f"policy kind must be plain, dual or replace, got {self.kind!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {POSITION_MODES}, got {self.positions!r}")
        if self.cls not in ("original", "new"):
            raise ValueError(f"cls must be 'original' or 'new', got {self.cls!r}")


PLAIN = Policy()


def surgery_policy(depth: int) -> Policy:
    """CLIP Surgery's architecture surgery over the last ``depth`` blocks (0: plain)."""
    return Policy(kind="dual", blocks=depth, attention="vv") if depth > 0 else PLAIN


def encode_tokens(
    visual: nn.Module, images: torch.Tensor, depth: int
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Projected tokens ``[B, 1+N, D]`` (CLS first) and their grid ``(h, w)``.

    ``depth`` 0 is the plain model; for a ResNet any positive depth means surgery.
    """
    if isinstance(visual, ModifiedResNet):
        return _resnet_tokens(visual, images, surgery=depth > 0)
    return encode_vit(visual, images, surgery_policy(depth))


def check_input(visual: nn.Module, images: torch.Tensor) -> None:
    """Raise ImageError for an input smaller than one patch."""
    if min(images.shape[-2:]) < min_input_size(visual):
        raise ImageError(
            f"input {tuple(images.shape[-2:])} is smaller than {min_input_size(visual)} pixels"
        )


# ---------------------------------------------------------------- ViT


def embed(
    visual: VisionTransformer, images: torch.Tensor, positions: str = "bilinear"
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Patch embedding, CLS, interpolated positions and ``ln_pre``: ``[B, 1+N, W]``, grid."""
    check_input(visual, images)
    x = visual.conv1(images.to(visual.conv1.weight.dtype))
    batch, _, grid_h, grid_w = x.shape
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(batch, 1, -1)
    x = torch.cat([cls, x], dim=1)
    table = interpolate_positions(
        visual.positional_embedding, tuple(visual.grid_size), (grid_h, grid_w), positions
    )
    return visual.ln_pre(x + table.to(x.dtype)), (grid_h, grid_w)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, N, W]`` to ``[B, heads, N, W / heads]``."""
    batch, tokens, width = x.shape
    return x.view(batch, tokens, heads, width // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[B, heads, N, d]`` to ``[B, N, heads * d]``."""
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


def block_qkv(block: ResidualAttentionBlock, x: torch.Tensor):
    """The block's q, k, v of already-normalised tokens, each ``[B, heads, N, d]``."""
    attn = block.attn
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    return tuple(split_heads(t, attn.num_heads) for t in (q, k, v))


def out_proj(block: ResidualAttentionBlock, heads_out: torch.Tensor) -> torch.Tensor:
    """The block's output projection (with bias) of per-head outputs."""
    projection = block.attn.out_proj
    return F.linear(merge_heads(heads_out), projection.weight, projection.bias)


def ffn(block: ResidualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """``x + FFN(ln_2(x))`` with the block's layer scale."""
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def plain_block(block: ResidualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """The block's own forward, with scaled-dot-product attention."""
    q, k, v = block_qkv(block, block.ln_1(x))
    x = x + block.ls_1(out_proj(block, F.scaled_dot_product_attention(q, k, v)))
    return ffn(block, x)


def neighbourhood_bias(grid: tuple[int, int], std: float, device, dtype) -> torch.Tensor:
    """NACLIP's additive Gaussian window over patch distances, zero for the CLS row/column."""
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], device=device), torch.arange(grid[1], device=device), indexing="ij"
    )
    cells = torch.stack([rows.flatten(), cols.flatten()], dim=1).to(torch.float32)
    squared = torch.cdist(cells, cells).pow(2)
    bias = torch.zeros(len(cells) + 1, len(cells) + 1, device=device)
    bias[1:, 1:] = torch.exp(-squared / (2 * std**2))
    return bias.to(dtype)


def _self_self(q, k, v, normed: torch.Tensor, policy: Policy) -> torch.Tensor:
    """GEM's self-self attention (Bousselham et al., CVPR 2024, github.com/WalBouss/GEM)."""
    scale = q.shape[-1] ** -0.5
    if policy.self_self_temperature is None:
        temperature = normed.norm(dim=-1).mean(dim=-1).view(-1, 1, 1, 1) * scale
    else:
        temperature = policy.self_self_temperature
    outputs = []
    for x in (v, k, q):
        for _ in range(policy.self_self_iterations):
            x = F.normalize(x, dim=-1)
            x = torch.softmax(x @ x.transpose(-1, -2) * temperature, dim=-1) @ x
        x = F.normalize(x, dim=-1)
        outputs.append(torch.softmax(x @ x.transpose(-1, -2) * temperature, dim=-1) @ v)
    return sum(outputs) / 3


def attend(policy: Policy, q, k, v, normed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Per-head outputs ``[B, heads, N, d]`` of the policy's attention."""
    sdpa = F.scaled_dot_product_attention
    kind = policy.attention
    if kind == "qk":
        return sdpa(q, k, v)
    if kind in ("vv", "kk", "qq"):
        source = {"vv": v, "kk": k, "qq": q}[kind]
        return sdpa(source, source, v)
    if kind == "identity":
        return v
    if kind == "csa":
        return sdpa(q, q, v) + sdpa(k, k, v)
    if kind == "neighbourhood":
        bias = neighbourhood_bias(grid, policy.gaussian_std, q.device, q.dtype)
        return sdpa(k, k, v, attn_mask=bias)
    return _self_self(q, k, v, normed, policy)


def _dual_block(block, policy: Policy, original, new, grid, last: bool):
    normed = block.ln_1(original)
    q, k, v = block_qkv(block, normed)
    new = new + block.ls_1(out_proj(block, attend(policy, q, k, v, normed, grid)))
    if policy.ffn:
        new = ffn(block, new)
    if last and policy.cls == "original":
        # After the last block only the original path's CLS is used: one query, one FFN row.
        q, original = q[:, :, :1], original[:, :1]
    attended = F.scaled_dot_product_attention(q, k, v)
    return ffn(block, original + block.ls_1(out_proj(block, attended))), new


def _replaced_block(block, policy: Policy, x, grid):
    normed = block.ln_1(x)
    q, k, v = block_qkv(block, normed)
    out = block.ls_1(out_proj(block, attend(policy, q, k, v, normed, grid)))
    x = x + out if policy.residual else out
    return ffn(block, x) if policy.ffn else x


def encode_vit(
    visual: VisionTransformer, images: torch.Tensor, policy: Policy = PLAIN
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Projected tokens ``[B, 1+N, D]`` of a ViT under ``policy``, and the grid."""
    blocks = visual.transformer.resblocks
    touched = 0 if policy.kind == "plain" else policy.blocks
    if not 0 <= touched <= len(blocks):
        raise ModelError(f"depth must be in [0, {len(blocks)}] for this model, got {touched}")
    x, grid = embed(visual, images, policy.positions)
    start = len(blocks) - touched
    for block in blocks[:start]:
        x = plain_block(block, x)
    if policy.kind == "replace":
        for block in blocks[start:]:
            x = _replaced_block(block, policy, x, grid)
    elif policy.kind == "dual" and touched:
        original, new = x, x
        for index, block in enumerate(blocks[start:], start=start):
            last = index == len(blocks) - 1
            original, new = _dual_block(block, policy, original, new, grid, last)
        x = torch.cat([original[:, :1], new[:, 1:]], dim=1) if policy.cls == "original" else new
    return visual.ln_post(x) @ visual.proj, grid


# ---------------------------------------------------------------- ModifiedResNet


def resnet_features(visual: ModifiedResNet, images: torch.Tensor) -> torch.Tensor:
    """The ResNet trunk's last feature map ``[B, C, h, w]`` (the model's own stem and layers)."""
    check_input(visual, images)
    x = visual.stem(images.to(visual.conv1.weight.dtype))
    return visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))


def _pool_tokens(visual: ModifiedResNet, features: torch.Tensor) -> torch.Tensor:
    """``[mean, spatial...] + positions`` (table interpolated bilinearly, never written back)."""
    pool = visual.attnpool
    _, _, grid_h, grid_w = features.shape
    tokens = features.flatten(2).transpose(1, 2)
    tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
    side = round((pool.positional_embedding.shape[0] - 1) ** 0.5)
    positions = interpolate_positions(pool.positional_embedding, (side, side), (grid_h, grid_w))
    return tokens + positions.to(tokens.dtype)


def resnet_pool(
    visual: ModifiedResNet, features: torch.Tensor, surgery: bool, cls_only: bool = False
) -> torch.Tensor:
    """Attention-pool the tokens of ``features``: ``[B, 1+N, D]`` (``[B, 1, D]`` if cls_only).

    Plain: the model's q-k attention pool with each token as a query (its CLS is CLIP's image
    embedding). Surgery: v-v attention for the spatial tokens, the plain pool's CLS.
    """
    pool = visual.attnpool
    tokens = _pool_tokens(visual, features)
    heads = pool.num_heads
    v = split_heads(pool.v_proj(tokens), heads)
    k = split_heads(pool.k_proj(tokens), heads)
    q = split_heads(pool.q_proj(tokens[:, :1] if surgery or cls_only else tokens), heads)
    plain = pool.c_proj(merge_heads(F.scaled_dot_product_attention(q, k, v)))
    if not surgery or cls_only:
        return plain
    value_value = pool.c_proj(merge_heads(F.scaled_dot_product_attention(v, v, v)))
    return torch.cat([plain, value_value[:, 1:]], dim=1)


def _resnet_tokens(
    visual: ModifiedResNet, images: torch.Tensor, surgery: bool
) -> tuple[torch.Tensor, tuple[int, int]]:
    features = resnet_features(visual, images)
    return resnet_pool(visual, features, surgery), tuple(features.shape[-2:])
