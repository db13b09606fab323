"""Segmentation, explainability and multi-label metrics (docs/protocols.md, "Metrics")."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import DatasetError
from .datasets import IGNORE

THRESHOLDS = np.round(np.linspace(0.0, 1.0, 21), 2)  # the explainability grid, same for all


class ConfusionMatrix:
    """Dataset-level confusion matrix accumulated over all images (ignore label excluded)."""

    def __init__(self, num_classes: int, matrix: np.ndarray | None = None):
        self.num_classes = num_classes
        self.matrix = np.zeros((num_classes, num_classes), np.int64) if matrix is None else matrix

    def update(self, prediction: np.ndarray, label: np.ndarray) -> None:
        """Add one image: ``prediction`` and ``label`` are ``[H, W]`` class indices."""
        if prediction.shape != label.shape:
            raise ValueError(f"prediction {prediction.shape} and label {label.shape} differ")
        valid = label != IGNORE
        truth = label[valid].astype(np.int64)
        guess = prediction[valid].astype(np.int64)
        if guess.size and (guess.max() >= self.num_classes or guess.min() < 0):
            raise ValueError(f"predicted class outside [0, {self.num_classes})")
        index = truth * self.num_classes + guess
        self.matrix += np.bincount(index, minlength=self.num_classes**2).reshape(
            self.num_classes, self.num_classes
        )

    def results(self) -> dict:
        """mIoU over the classes present in labels or predictions (a class in neither is
        undefined: None, left out of the mean, counted), aAcc, mAcc, per-class IoU.

        DatasetError when nothing could be scored (every label pixel ignored).
        """
        intersection = np.diag(self.matrix).astype(np.float64)
        label_area = self.matrix.sum(axis=1).astype(np.float64)
        predicted_area = self.matrix.sum(axis=0).astype(np.float64)
        total = label_area.sum()
        if not total:
            raise DatasetError("nothing could be scored: every label pixel is ignored (255)")
        union = label_area + predicted_area - intersection
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, intersection / union, np.nan)
            accuracy = np.where(label_area > 0, intersection / label_area, np.nan)
        return {
            "miou": float(np.nanmean(iou) * 100),
            "aacc": float(intersection.sum() / total * 100),
            "macc": float(np.nanmean(accuracy) * 100),
            "per_class_iou": [None if np.isnan(v) else float(v * 100) for v in iou],
            "undefined_classes": int(np.isnan(iou).sum()),
        }


class ExplainabilityMeter:
    """The paper's explainability protocol: each (image, present label) is one binary task.

    For every pair it keeps the IoU of the thresholded min-max map at each grid threshold (the
    grid search then picks one threshold for the whole run) and the score contrast
    ``mean(map inside) - mean(map outside)``.
    """

    def __init__(self):
        self.iou_sums = np.zeros(len(THRESHOLDS))
        self.contrast_sum = 0.0
        self.pairs = 0
        self.undefined = 0  # masks empty or covering every valid pixel: no contrast to measure

    def update(self, heatmap: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor) -> None:
        """``heatmap`` in [0, 1] and boolean ``mask``/``valid`` (not ignored), all ``[H, W]``."""
        self.add(self.score(heatmap, mask, valid))

    @staticmethod
    def score(
        heatmap: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor
    ) -> tuple[np.ndarray, float] | None:
        """One pair's IoU at each grid threshold and its contrast; None when undefined."""
        values, inside = heatmap[valid].double(), mask[valid]
        if not inside.any() or inside.all():
            return None
        thresholds = torch.as_tensor(THRESHOLDS, dtype=values.dtype)
        above = values[None, :] >= thresholds[:, None]
        intersection = (above & inside[None]).sum(dim=1).double()
        union = (above | inside[None]).sum(dim=1).double()
        return (intersection / union).numpy(), float(values[inside].mean() - values[~inside].mean())

    def add(self, scored: tuple[np.ndarray, float] | None) -> None:
        """Count one pair as ``score`` returned it (None: an undefined pair). Adding the same
        pairs in the same order gives the same sums, whichever process scored them."""
        if scored is None:
            self.undefined += 1
            return
        ious, contrast = scored
        self.iou_sums += ious
        self.contrast_sum += contrast
        self.pairs += 1

    def results(self) -> dict:
        """mIoU at the best grid threshold, that threshold, and mSC (percent), over all pairs;
        DatasetError when no pair could be scored."""
        if not self.pairs:
            raise DatasetError(
                "nothing could be scored: no image has a labelled class that covers part, but "
                f"not all, of its valid pixels ({self.undefined} undefined pairs)"
            )
        mean_iou = self.iou_sums / self.pairs
        best = int(np.argmax(mean_iou))
        return {
            "miou": float(mean_iou[best] * 100),
            "threshold": float(THRESHOLDS[best]),
            "msc": float(self.contrast_sum / self.pairs * 100),
            "pairs": self.pairs,
            "undefined_pairs": self.undefined,
        }


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """AP of one class over all images (labels -1, VOC's difficult, left out): the sum over
    distinct score thresholds of the recall gained there times the precision there. Tied
    scores form one threshold, so their order does not matter (as scikit-learn's
    ``average_precision_score``); without ties this is the mean precision at each positive.
    NaN when the class has no positive."""
    keep = labels >= 0
    scores, labels = scores[keep], labels[keep]
    positives = int((labels == 1).sum())
    if positives == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    scores, hits = scores[order], (labels[order] == 1)
    last_of_tie = np.r_[np.diff(scores) != 0, True]  # each threshold's last index
    true_positives = np.cumsum(hits)[last_of_tie]
    predicted = np.arange(1, len(hits) + 1)[last_of_tie]
    recall_gain = np.diff(np.r_[0, true_positives]) / positives
    return float((recall_gain * true_positives / predicted).sum())


def mean_average_precision(scores: np.ndarray, labels: np.ndarray) -> dict:
    """mAP (percent) over classes with at least one positive (the others are undefined: None,
    counted); DatasetError when no class has a positive."""
    per_class = [average_precision(scores[:, c], labels[:, c]) for c in range(labels.shape[1])]
    valid = [ap for ap in per_class if not np.isnan(ap)]
    if not valid:
        raise DatasetError("nothing could be scored: no class has a positive image")
    return {
        "map": float(np.mean(valid) * 100),
        "per_class_ap": [None if np.isnan(ap) else ap * 100 for ap in per_class],
        "undefined_classes": len(per_class) - len(valid),
    }


def pointing_hits(
    heatmaps: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """The pointing game: does each map's peak pixel lie on its object's mask?

    Zhang et al., "Top-down Neural Attention by Excitation Backprop", ECCV 2016; here with no
    tolerance radius: the peak must fall on the exact mask. ``heatmaps`` ``[K, H, W]`` (any
    scale), boolean ``masks`` ``[K, H, W]`` and optional boolean ``valid`` ``[H, W]`` or
    ``[K, H, W]`` (pixels outside it are never the peak). The peak is the first maximum in
    raster order (row by row), so ties resolve deterministically. Returns bool ``[K]``.
    """
    if heatmaps.dim() != 3 or heatmaps.shape != masks.shape:
        raise ValueError(
            f"expected heatmaps and masks [K, H, W] alike, got {tuple(heatmaps.shape)} "
            f"and {tuple(masks.shape)}"
        )
    peak = peak_indices(heatmaps, valid)
    return masks.reshape(len(masks), -1).gather(1, peak[:, None])[:, 0].bool()


def peak_indices(heatmaps: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Each map's peak pixel as a flat index ``[K]`` (the pointing game's rule).

    The first maximum in raster order; NaN pixels and pixels outside ``valid`` are never it.
    """
    count, height, width = heatmaps.shape
    values = heatmaps.detach().double().reshape(count, -1).clone()
    if valid is not None:
        allowed = valid.expand(count, height, width).reshape(count, -1)
        values[~allowed] = -torch.inf
    values[torch.isnan(values)] = -torch.inf
    top = values.max(dim=1, keepdim=True).values
    return (values == top).double().argmax(dim=1)  # the first index holding the maximum
