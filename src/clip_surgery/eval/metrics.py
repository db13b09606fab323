"""Segmentation, explainability and multi-label metrics (docs/protocols.md, "Metrics")."""

from __future__ import annotations

import numpy as np
import torch

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
        """mIoU (mean over classes present in labels or predictions), aAcc, mAcc, per-class IoU."""
        intersection = np.diag(self.matrix).astype(np.float64)
        label_area = self.matrix.sum(axis=1).astype(np.float64)
        predicted_area = self.matrix.sum(axis=0).astype(np.float64)
        union = label_area + predicted_area - intersection
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, intersection / union, np.nan)
            accuracy = np.where(label_area > 0, intersection / label_area, np.nan)
        total = label_area.sum()
        return {
            "miou": float(np.nanmean(iou) * 100) if np.isfinite(iou).any() else 0.0,
            "aacc": float(intersection.sum() / total * 100) if total else 0.0,
            "macc": float(np.nanmean(accuracy) * 100) if np.isfinite(accuracy).any() else 0.0,
            "per_class_iou": [None if np.isnan(v) else float(v * 100) for v in iou],
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

    def update(self, heatmap: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor) -> None:
        """``heatmap`` in [0, 1] and boolean ``mask``/``valid`` (not ignored), all ``[H, W]``."""
        values, inside = heatmap[valid].double(), mask[valid]
        if not inside.any() or inside.all():
            return
        thresholds = torch.as_tensor(THRESHOLDS, dtype=values.dtype)
        above = values[None, :] >= thresholds[:, None]
        intersection = (above & inside[None]).sum(dim=1).double()
        union = (above | inside[None]).sum(dim=1).double()
        self.iou_sums += (intersection / union).numpy()
        self.contrast_sum += float(values[inside].mean() - values[~inside].mean())
        self.pairs += 1

    def results(self) -> dict:
        """mIoU at the best grid threshold, that threshold, and mSC (percent), over all pairs."""
        if not self.pairs:
            return {"miou": 0.0, "threshold": None, "msc": 0.0, "pairs": 0}
        mean_iou = self.iou_sums / self.pairs
        best = int(np.argmax(mean_iou))
        return {
            "miou": float(mean_iou[best] * 100),
            "threshold": float(THRESHOLDS[best]),
            "msc": float(self.contrast_sum / self.pairs * 100),
            "pairs": self.pairs,
        }


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """AP of one class: mean precision at each positive, ranking by score (labels -1 ignored)."""
    keep = labels >= 0
    scores, labels = scores[keep], labels[keep]
    positives = labels.sum()
    if positives == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    hits = labels[order] == 1
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].sum() / positives)


def mean_average_precision(scores: np.ndarray, labels: np.ndarray) -> dict:
    """mAP (percent) over classes with at least one positive, and the per-class APs."""
    per_class = [average_precision(scores[:, c], labels[:, c]) for c in range(labels.shape[1])]
    valid = [ap for ap in per_class if not np.isnan(ap)]
    return {
        "map": float(np.mean(valid) * 100) if valid else 0.0,
        "per_class_ap": [None if np.isnan(ap) else ap * 100 for ap in per_class],
    }
