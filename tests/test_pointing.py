"""The pointing game metric (clip_surgery.eval.metrics.pointing_hits)."""

from __future__ import annotations

import pytest
import torch

from clip_surgery.eval.metrics import pointing_hits


def _loop_reference(heatmaps, masks, valid=None):
    """Straightforward per-map reference: scan pixels in raster order, keep the first max."""
    hits = []
    for heatmap, mask in zip(heatmaps, masks, strict=True):
        best, where = None, None
        for y in range(heatmap.shape[0]):
            for x in range(heatmap.shape[1]):
                if valid is not None and not valid[y, x]:
                    continue
                value = float(heatmap[y, x])
                if value != value:  # NaN never wins
                    continue
                if best is None or value > best:
                    best, where = value, (y, x)
        hits.append(bool(mask[where]))
    return hits


def test_peak_on_mask_is_a_hit_and_off_mask_a_miss():
    heatmaps = torch.zeros(2, 4, 5)
    heatmaps[0, 1, 2] = 1.0  # peak inside the mask
    heatmaps[1, 3, 4] = 1.0  # peak outside it
    masks = torch.zeros(2, 4, 5, dtype=torch.bool)
    masks[:, 0:2, 1:3] = True
    assert pointing_hits(heatmaps, masks).tolist() == [True, False]


def test_ties_resolve_to_the_first_peak_in_raster_order():
    heatmap = torch.zeros(1, 3, 3)
    heatmap[0, 0, 2] = heatmap[0, 2, 0] = 0.9  # two equal maxima; (0, 2) comes first
    first = torch.zeros(1, 3, 3, dtype=torch.bool)
    first[0, 0, 2] = True
    second = torch.zeros(1, 3, 3, dtype=torch.bool)
    second[0, 2, 0] = True
    assert pointing_hits(heatmap, first).tolist() == [True]
    assert pointing_hits(heatmap, second).tolist() == [False]


def test_invalid_pixels_and_nan_are_never_the_peak():
    heatmap = torch.tensor([[[5.0, float("nan")], [0.5, 0.2]]])
    mask = torch.tensor([[[False, False], [True, False]]])
    valid = torch.tensor([[False, True], [True, True]])
    assert pointing_hits(heatmap, mask).tolist() == [False]  # peak 5.0 off the mask
    assert pointing_hits(heatmap, mask, valid).tolist() == [True]  # 5.0 excluded, 0.5 wins


@pytest.mark.parametrize("seed", range(5))
def test_matches_a_loop_reference_on_random_maps(seed):
    generator = torch.Generator().manual_seed(seed)
    heatmaps = torch.randint(0, 4, (6, 7, 9), generator=generator).float()  # many ties
    masks = torch.rand(6, 7, 9, generator=generator) < 0.3
    valid = torch.rand(7, 9, generator=generator) < 0.8
    assert pointing_hits(heatmaps, masks).tolist() == _loop_reference(heatmaps, masks)
    assert pointing_hits(heatmaps, masks, valid).tolist() == _loop_reference(heatmaps, masks, valid)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        pointing_hits(torch.zeros(2, 4, 4), torch.zeros(2, 4, 5, dtype=torch.bool))
