"""Feature surgery and similarity maps (docs/method.md, sections 4-5).

Feature surgery is from CLIP Surgery (Li et al., Pattern Recognition 2025, arXiv 2304.05653;
github.com/xmed-lab/CLIP_Surgery). The reference materialises a ``[B, N, T, D]`` tensor and
works for one image; here it is computed in ``O(B*N*T)`` memory for any batch, using
``sum_d(f_d t_d w) = w <f, t>``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import ImageError


def feature_surgery(
    image_tokens: torch.Tensor,
    text: torch.Tensor,
    redundant: torch.Tensor | None = None,
    *,
    weighting: str = "cls",
) -> torch.Tensor:
    """Similarities ``[B, 1+N, T]`` of normalized tokens and texts with redundancy removed.

    With ``redundant`` (``[D]`` or ``[1, D]``, e.g. the embedding of ""): ``f @ (t - r)^T``.
    Without it (class-set mode): ``w_k s_k - mean_j(w_j s_j)`` with ``s = f @ t^T`` and
    ``w = p / mean(p)``, ``p = softmax(2 s)``. ``weighting="cls"`` takes ``p`` from each image's
    CLS token, as the reference code does (``image_features[:, :1, :]``);
    ``weighting="token"`` takes it from every token, as the reference's first commit did.
    """
    if image_tokens.dim() != 3 or text.dim() != 2 or image_tokens.shape[-1] != text.shape[-1]:
        raise ValueError(
            f"expected image tokens [B, N, D] and text [T, D], got {tuple(image_tokens.shape)} "
            f"and {tuple(text.shape)}"
        )
    text = text.to(image_tokens.dtype)
    if redundant is not None:
        return image_tokens @ (text - redundant.reshape(1, -1).to(text.dtype)).T
    if weighting not in ("cls", "token"):
        raise ValueError(f"weighting must be 'cls' or 'token', got {weighting!r}")
    similarity = image_tokens @ text.T
    source = similarity[:, :1] if weighting == "cls" else similarity
    probability = (2 * source).softmax(dim=-1)
    weighted = probability / probability.mean(dim=-1, keepdim=True) * similarity
    return weighted - weighted.mean(dim=-1, keepdim=True)


def min_max(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Scale to [0, 1] along ``dim``; a constant slice gives zeros, not NaN."""
    low = values.amin(dim=dim, keepdim=True)
    spread = values.amax(dim=dim, keepdim=True) - low
    safe = torch.where(spread > 0, spread, torch.ones_like(spread))
    return torch.where(spread > 0, (values - low) / safe, torch.zeros_like(values))


def infer_grid(tokens: int) -> tuple[int, int]:
    """The square grid of ``tokens`` patch tokens; an error if it is not a square."""
    side = round(tokens**0.5)
    if side * side != tokens:
        raise ImageError(f"{tokens} patch tokens are not a square grid: pass grid=(h, w)")
    return side, side


def similarity_map(
    sim: torch.Tensor, size: int | tuple[int, int], grid: tuple[int, int] | None = None
) -> torch.Tensor:
    """Maps ``[B, T, H, W]`` in [0, 1] from patch similarities ``sim`` ``[B, N, T]`` (no CLS).

    Min-max over the N patches per image and text, reshape to the grid, bilinear resize.
    """
    if sim.dim() != 3:
        raise ValueError(f"expected sim [B, N, T], got {tuple(sim.shape)}")
    batch, tokens, texts = sim.shape
    grid_h, grid_w = grid if grid is not None else infer_grid(tokens)
    if grid_h * grid_w != tokens:
        raise ImageError(f"grid {grid_h}x{grid_w} does not hold {tokens} patch tokens")
    size = (size, size) if isinstance(size, int) else tuple(size)
    maps = min_max(sim.float(), dim=1).transpose(1, 2).reshape(batch, texts, grid_h, grid_w)
    maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    return maps.clamp_(0.0, 1.0)
