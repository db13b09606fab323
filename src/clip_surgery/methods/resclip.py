"""ResCLIP: residual cross-correlation attention (RCS) and semantic feedback refinement (SFR).

Yang, Deng, Li and Duan, "ResCLIP: Residual Attention for Training-free Dense Vision-language
Inference", CVPR 2025 (arXiv 2411.15851); code github.com/yvhangyang/ResCLIP (on NACLIP:
``arch='wo_resi'``, ``attn_strategy='resclip'``, ``gaussian_std=5``; its
``clip/model.py`` is what is implemented here). The last block runs k-k attention plus NACLIP's
Gaussian window, without residual and FFN:

- **RCS**: ``A <- tau_rcs ((1 - l_rcs) softmax(k k^T / sqrt(d) + G) + l_rcs C)`` with ``C`` the
  mean of the q-k attention probabilities of blocks 5-8 (0-based, of 12), head by head.
- **SFR**: a first pass with RCS alone gives per-text cosines, bilinearly resized to the input,
  refined by PAMR (10 steps, dilations 8, 16; ``clip_surgery.refine``) and softmaxed with
  ``logit_scale``; each pixel takes its top text (text 0 where its probability is below
  ``sfr_threshold``) and each patch the most frequent one (the smallest on ties). ``S[i, j]``
  is 1 when patches i and j share it (and on the diagonal); with ``sfr_paths``, a pair whose
  straight path leaves that text keeps ``S * exp(-steps / max_steps)`` (Chebyshev steps;
  as the code, the path is sampled at ``max_steps + 1`` points and only its first
  ``steps + 1`` are checked). Each row is smoothed by a 1-D Gaussian over the raster index
  (``std``, kernel ``min(N, 6 std + 1)`` made odd), row-normalised, divided by its maximum,
  and mixed into the logits: ``tau_sfr ((1 - l_sfr) k k^T / sqrt(d) + l_sfr S)`` before the
  Gaussian window, the softmax and RCS.

The code's defaults are per dataset; the defaults here are its ADE20K config
(``temp_thd=0.25``, ``attn_rcs_weights=[2.0, 0.3]``, ``attn_sfr_weights=[2.1, 0.7]``,
``logit_scale=40``); ``eval.presets`` has each dataset's. Departures: any batch size (the code
handles one image), no float16 cast of ``S``, layers given for other depths are the same
relative depth (``rcs_first``/``rcs_last``), and SFR needs the texts, so ``encode`` alone runs
RCS only when ``sfr=False``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import engine
from ..errors import ModelError, OptionError
from ..refine import pamr
from ..typedefs import Grid, PositionMode
from .base import ForwardMethod, Scores, TextQuery
from .common import check_range, cosine_scores, layer, probabilities, run_plan
from .naclip import neighbourhood_bias


@dataclass(frozen=True)
class ResclipOptions:
    """rcs/sfr: the two modules; rcs_first/rcs_last: blocks averaged by RCS (None: 5 and 8 of
    12); rcs_weight/rcs_mix and sfr_weight/sfr_mix: tau and lambda of each module;
    sfr_threshold: below this probability a pixel takes text 0; logit_scale: SFR's softmax
    scale; sfr_paths: decay same-text pairs whose path leaves the text; gaussian_std: NACLIP's
    window and SFR's smoothing; residual/ffn of the last block (ResCLIP drops both)."""

    rcs: bool = True
    sfr: bool = True
    rcs_first: int | None = None
    rcs_last: int | None = None
    rcs_weight: float = 2.0
    rcs_mix: float = 0.3
    sfr_weight: float = 2.1
    sfr_mix: float = 0.7
    sfr_threshold: float = 0.25
    logit_scale: float = 40.0
    sfr_paths: bool = True
    gaussian_std: float = 5.0
    residual: bool = False
    ffn: bool = False
    positions: PositionMode = "bicubic-dino"

    def __post_init__(self) -> None:
        for name in ("rcs_mix", "sfr_mix", "sfr_threshold"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"option {name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("rcs_weight", "sfr_weight", "logit_scale", "gaussian_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"option {name} must be positive, got {getattr(self, name)}")


class Resclip(ForwardMethod):
    """ResCLIP (Yang et al., CVPR 2025) on NACLIP's last block."""

    name = "resclip"
    needs_plain_positions = True
    requirement = "reads mid blocks' q and k itself (no rotary position embeddings)"
    summary = "last block: k-k + Gaussian window, + mid-layer q-k attention + text feedback"
    citation = (
        "Yang et al., ResCLIP: Residual Attention for Training-free Dense "
        "Vision-language Inference, CVPR 2025"
    )
    Options = ResclipOptions

    def plan(self, options: ResclipOptions, tower) -> engine.Plan:
        """RCS alone (SFR reads the texts: ``scores`` runs it)."""
        if options.sfr:
            raise ModelError(
                "resclip's semantic feedback needs the texts: use explain/score, or sfr=false"
            )
        return self.full_plan(options, tower, None, None)

    def scores(self, backbone, images: Tensor, query: TextQuery, options) -> Scores:
        """Cosines of the tokens of the last block with RCS and SFR."""
        self.check(backbone)
        plan = self.full_plan(options, backbone.vision, images, query.embeddings)
        return cosine_scores(run_plan(backbone, images, plan), query.embeddings)

    def resolved(self, options: ResclipOptions, tower) -> ResclipOptions:
        """The RCS blocks that run on ``tower``."""
        count = len(tower.blocks)
        if not options.rcs or count < 2:
            return options
        first = layer(options.rcs_first, 5, count, highest=count - 2)
        return replace(
            options, rcs_first=first, rcs_last=layer(options.rcs_last, 8, count, highest=count - 2)
        )

    def full_plan(self, options: ResclipOptions, tower, images, text) -> engine.Plan:
        """The plan: a tap averages the RCS blocks' attention; the last block's callable
        runs the first (feedback) pass and the final one."""
        count = len(tower.blocks)
        if options.rcs and count < 2:
            raise OptionError("resclip's RCS reads blocks before the last: it needs 2 or more")
        chosen = self.resolved(options, tower)
        first, last = chosen.rcs_first, chosen.rcs_last
        if options.rcs:
            check_range(self.name, "rcs_first", first, 0, count - 2)
            check_range(self.name, "rcs_last", last, first, count - 2)
        state: dict = {}

        def tap(point: str, block: int, tensor: Tensor) -> Tensor:
            if point == "normed" and options.rcs and first <= block <= last:
                q, k, _ = tower.blocks[block].qkv(tensor, None)  # no rotary: grid unread
                state["rcs"] = state.get("rcs", 0) + probabilities(q, k) / (last - first + 1)
            if (point, block) in (("embed", -1), ("block", count - 2)):
                state["input"] = tensor  # the last block's input (for residual=True)
            return tensor

        def attention(q, k, v, context):
            feedback = Feedback(options, tower, images, text, state) if options.sfr else None
            return last_attention(q, k, v, context, options, state.get("rcs"), feedback)

        return engine.Plan(
            blocks=1,
            attention=attention,
            residual=options.residual,
            ffn=options.ffn,
            positions=options.positions,
            tap=tap,
        )


def mix(weights: Tensor, rcs: Tensor | None, options: ResclipOptions) -> Tensor:
    """RCS: ``tau ((1 - lambda) A + lambda C)`` (A unchanged without RCS)."""
    if rcs is None:
        return weights
    return options.rcs_weight * ((1 - options.rcs_mix) * weights + options.rcs_mix * rcs)


def last_attention(q, k, v, context, options: ResclipOptions, rcs, feedback) -> Tensor:
    """The last block's attention output: the RCS pass, then (with SFR) the refined one."""
    scale = q.shape[-1] ** -0.5
    bias = neighbourhood_bias(context.grid, context.prefix, options.gaussian_std, q.device, q.dtype)
    logits = k @ k.transpose(-1, -2) * scale
    weights = mix(torch.softmax(logits + bias, dim=-1), rcs, options)
    if feedback is None:
        return weights @ v
    matrix = feedback.matrix(weights @ v, context)[:, None]  # [B, 1, N, N]
    logits = options.sfr_weight * ((1 - options.sfr_mix) * logits + options.sfr_mix * matrix)
    return mix(torch.softmax(logits + bias, dim=-1), rcs, options) @ v


@dataclass
class Feedback:
    """SFR: the first pass's segmentation turned into an attention prior ``[B, N, N]``."""

    options: ResclipOptions
    tower: object
    images: Tensor  # the normalised inputs [B, 3, H, W] (PAMR's guide)
    text: Tensor  # normalised text embeddings [T, D]
    state: dict  # what the tap saw (the last block's input)

    def matrix(self, heads: Tensor, context) -> Tensor:
        """The SFR matrix from the first pass's per-head outputs ``heads``."""
        labels = self.patch_labels(self.first_pass_scores(heads, context), context.grid)
        matrices = [
            feedback_matrix(image_labels, context.prefix, self.options) for image_labels in labels
        ]
        return torch.stack(matrices).to(heads.dtype)

    def first_pass_scores(self, heads: Tensor, context) -> Tensor:
        """Per-text cosines ``[B, T, H, W]`` of the first pass, at the input's size."""
        block = self.tower.blocks[-1]
        tokens = block.out(heads)
        if self.options.residual:
            tokens = self.state["input"] + tokens
        if self.options.ffn:
            tokens = block.ffn(tokens)
        dense = self.tower.head.dense(tokens, context.grid, self.options.positions, None)
        cosines = F.normalize(dense.float(), dim=-1) @ self.text.float().T  # [B, N, T]
        grid_maps = cosines.transpose(1, 2).reshape(len(cosines), -1, *context.grid)
        size = self.images.shape[-2:]
        return F.interpolate(grid_maps, size=size, mode="bilinear", align_corners=False)

    def patch_labels(self, scores: Tensor, grid: Grid) -> Tensor:
        """Each patch's most frequent pixel label ``[B, h, w]`` (PAMR, softmax, threshold)."""
        refined = pamr(self.images.float(), scores)
        probs = torch.softmax(refined * self.options.logit_scale, dim=1)
        top, labels = probs.max(dim=1)
        labels[top < self.options.sfr_threshold] = 0
        return patch_mode(labels, grid, self.tower.min_size, scores.shape[1])


def patch_mode(labels: Tensor, grid: Grid, patch: int, classes: int) -> Tensor:
    """The most frequent label of each ``patch x patch`` cell (smallest on ties) ``[B, h, w]``."""
    rows, cols = grid
    cells = labels[:, : rows * patch, : cols * patch]
    cells = cells.reshape(len(labels), rows, patch, cols, patch).permute(0, 1, 3, 2, 4)
    counts = F.one_hot(cells.reshape(len(labels), rows, cols, -1), classes).sum(dim=3)
    return counts.argmax(dim=-1)  # the first maximum: the smallest label


def feedback_matrix(labels: Tensor, prefix: int, options: ResclipOptions) -> Tensor:
    """One image's SFR matrix ``[P+N, P+N]`` from its patch labels ``[h, w]``."""
    flat = labels.flatten()
    same = (flat[:, None] == flat[None, :]).float()
    same.fill_diagonal_(1)
    if options.sfr_paths:
        valid, steps, longest = straight_paths(labels)
        decay = torch.exp(-steps.float() / longest) if longest else torch.ones_like(same)
        same = torch.where(valid, same, same * decay)
    smoothed = F.relu(smooth_rows(same, options.gaussian_std))
    smoothed = smoothed / (smoothed.sum(dim=1, keepdim=True) + 1e-8)
    tokens = len(flat) + prefix
    matrix = torch.zeros(tokens, tokens, device=labels.device)
    matrix[prefix:, prefix:] = smoothed
    return matrix / matrix.max()


def straight_paths(labels: Tensor, chunk: int = 64) -> tuple[Tensor, Tensor, int]:
    """For every patch pair: does the sampled straight path stay on the start's label; the
    Chebyshev steps ``[N, N]``; the longest steps (ResCLIP's ``check_path``)."""
    rows, cols = labels.shape
    device = labels.device
    coords = (
        torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), dim=-1)
        .reshape(-1, 2)
        .to(device)
    )
    steps = (coords[:, None] - coords[None]).abs().max(dim=-1).values  # [N, N]
    longest = int(steps.max())
    t = torch.linspace(0, 1, longest + 1, device=device)[None, :, None]
    valid = torch.empty_like(steps, dtype=torch.bool)
    for begin in range(0, len(coords), chunk):
        start = coords[begin : begin + chunk, None].expand(-1, len(coords), 2).reshape(-1, 2)
        end = coords[None].expand(len(start) // len(coords), -1, 2).reshape(-1, 2)
        points = (start[:, None] * (1 - t) + end[:, None] * t).round().long()
        seen = labels[points[..., 0], points[..., 1]] == labels[start[:, 0], start[:, 1]][:, None]
        reach = steps[begin : begin + chunk].reshape(-1, 1)
        needed = torch.arange(longest + 1, device=device)[None] <= reach
        valid[begin : begin + chunk] = (seen | ~needed).all(dim=1).reshape(-1, len(coords))
    return valid, steps, longest


def smooth_rows(matrix: Tensor, std: float) -> Tensor:
    """Each row convolved with a normalised 1-D Gaussian (zero padding, odd kernel)."""
    size = min(matrix.shape[1], int(6 * std + 1))
    size = size if size % 2 == 1 else size + 1
    x = torch.arange(size, device=matrix.device, dtype=torch.float32) - size // 2
    kernel = torch.exp(-(x**2) / (2 * std**2))
    kernel = (kernel / kernel.sum()).view(1, 1, -1)
    return F.conv1d(matrix[:, None], kernel, padding=size // 2)[:, 0]
