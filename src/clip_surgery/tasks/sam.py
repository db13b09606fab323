"""Text to SAM masks: CLIP Surgery's map gives point (or box) prompts to Segment Anything.

The demo of CLIP Surgery (Li et al., arXiv 2304.05653; github.com/xmed-lab/CLIP_Surgery):
free-form texts use the empty-string redundancy, ``"person+bench"`` combines targets.
Backends: ``segment-anything`` (Kirillov et al., ICCV 2023) and ``sam2`` (Ravi et al., 2024),
both behind one small predictor protocol (set the image once, predict from points/box).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from ..errors import InputFileError, ModelError
from ..points import box_from_map, instance_prompts, points_for_targets, points_from_map

SAM_TYPES = ("vit_b", "vit_l", "vit_h")
SAM2_CONFIGS = {
    "sam2_hiera_t": "sam2_hiera_t.yaml",
    "sam2_hiera_s": "sam2_hiera_s.yaml",
    "sam2_hiera_b+": "sam2_hiera_b+.yaml",
    "sam2_hiera_l": "sam2_hiera_l.yaml",
}


class Predictor(Protocol):
    """What SamPredictor (segment-anything) and SAM2ImagePredictor (sam2) both provide."""

    def set_image(self, image: np.ndarray) -> None:
        """Embed an ``[H, W, 3]`` uint8 RGB image once."""

    def predict(self, point_coords=None, point_labels=None, box=None, multimask_output=True):
        """Masks ``[M, H, W]``, scores ``[M]`` and low-resolution logits."""


def load_predictor(checkpoint: str | Path, sam_type: str = "vit_b", device: str = "cpu"):
    """A SAM or SAM 2 predictor from a local checkpoint (``pip install 'clip-surgery[sam]'``)."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise InputFileError(f"SAM checkpoint not found: {checkpoint}")
    if sam_type in SAM_TYPES:
        try:
            from segment_anything import SamPredictor, sam_model_registry
        except ImportError:
            raise ModelError(
                "segment-anything is not installed: pip install 'clip-surgery[sam]'"
            ) from None
        try:
            sam = sam_model_registry[sam_type](checkpoint=str(checkpoint))
        except Exception as error:  # torch.load and load_state_dict raise many types
            raise ModelError(_sam_error(checkpoint, sam_type, error)) from None
        return SamPredictor(sam.to(device))
    if sam_type in SAM2_CONFIGS:
        try:
            from sam2.build_sam import build_sam2
            from sam2.sam2_image_predictor import SAM2ImagePredictor
        except ImportError:
            raise ModelError("sam2 is not installed: pip install 'clip-surgery[sam2]'") from None
        try:
            sam = build_sam2(SAM2_CONFIGS[sam_type], str(checkpoint), device=device)
        except Exception as error:  # torch.load, hydra and load_state_dict raise many types
            raise ModelError(_sam_error(checkpoint, sam_type, error)) from None
        return SAM2ImagePredictor(sam)
    known = ", ".join([*SAM_TYPES, *SAM2_CONFIGS])
    raise ModelError(f"unknown SAM type {sam_type!r}; known: {known}")


def _sam_error(checkpoint: Path, sam_type: str, error: Exception) -> str:
    detail = " ".join(str(error).split())[:140]
    return (
        f"{checkpoint} is not a {sam_type} SAM checkpoint (corrupt, or another --sam-type?): "
        f"{type(error).__name__}: {detail}"
    )


@dataclass
class TextMask:
    """SAM's answer for one text target."""

    target: str
    mask: np.ndarray  # [H, W] bool, the highest-scoring mask (union over instances)
    score: float
    points: np.ndarray  # [K, 2] (x, y)
    labels: np.ndarray  # [K] 1 positive, 0 negative
    box: np.ndarray | None
    instances: list[np.ndarray]  # one mask per instance when instances=True


def grid_maps(model, image: Image.Image, texts: list[str], method: str, size, **options):
    """Each text's ``[h, w]`` patch-grid similarities (free-form: empty-string redundancy)."""
    result = model.explain(image, texts, method=method, size=size, single=True, **options)
    grid_h, grid_w = result.grid
    return result.similarity[0].T.reshape(len(texts), grid_h, grid_w)


def segment_text(
    model,
    predictor: Predictor,
    image: Image.Image,
    target: str,
    *,
    method: str = "clip_surgery",
    size: int | None = None,
    threshold: float | str = 0.8,
    downsample: int = 2,
    max_points: int | None = None,
    use_box: bool = False,
    instances: bool = False,
    image_set: bool = False,
    **options,
) -> TextMask:
    """SAM mask(s) for ``target`` (``"person+bench"`` combines texts) from CLIP's own map."""
    texts = [t.strip() for t in target.split("+") if t.strip()]
    image = image.convert("RGB")
    hw = (image.height, image.width)
    maps = grid_maps(model, image, texts, method, size, **options)
    if len(texts) == 1:
        points, labels = points_from_map(maps[0], hw, threshold, downsample, max_points=max_points)
    else:
        points, labels = points_for_targets(maps, hw, threshold, downsample)
    box = box_from_map(maps.mean(dim=0), hw, threshold, downsample) if use_box else None
    if not image_set:
        predictor.set_image(np.asarray(image))
    if instances and len(texts) == 1:
        prompts = instance_prompts(maps[0], hw, threshold, downsample)
        masks = [_best(predictor, p, lab, None) for p, lab in prompts]
        union = np.any([m for m, _ in masks], axis=0) if masks else np.zeros(hw, bool)
        score = float(np.mean([s for _, s in masks])) if masks else 0.0
        return TextMask(target, union, score, points, labels, box, [m for m, _ in masks])
    mask, score = _best(predictor, points, labels, box)
    return TextMask(target, mask, score, points, labels, box, [mask])


def _best(predictor: Predictor, points, labels, box) -> tuple[np.ndarray, float]:
    coords = points.astype(np.float32) if len(points) else None
    point_labels = labels if len(points) else None
    masks, scores, _ = predictor.predict(
        point_coords=coords, point_labels=point_labels, box=box, multimask_output=True
    )
    best = int(np.argmax(scores))
    return np.asarray(masks[best]).astype(bool), float(scores[best])


def mask_overlay(image: Image.Image, result: TextMask) -> Image.Image:
    """The image with the mask tinted and the prompts drawn (positive green, negative red)."""
    from PIL import ImageDraw

    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    tint = np.array([30, 144, 255], np.float32)
    rgb[result.mask] = rgb[result.mask] * 0.45 + tint * 0.55
    picture = Image.fromarray(rgb.round().astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    radius = max(3, min(image.size) // 80)
    for (x, y), label in zip(result.points, result.labels, strict=True):
        colour = (40, 220, 60) if label == 1 else (230, 40, 40)
        draw.ellipse(
            (x - radius, y - radius, x + radius, y + radius), fill=colour, outline=(255, 255, 255)
        )
    if result.box is not None:
        draw.rectangle(tuple(float(v) for v in result.box), outline=(255, 215, 0), width=2)
    return picture
