"""Feature surgery, similarity maps and points against explicit forms of docs/method.md."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import relative_error

from clip_surgery import feature_surgery, points_for_targets, points_from_map, similarity_map
from clip_surgery.errors import ImageError


def normalized(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def explicit_feature_surgery(f, t, token_weights=False):
    """The reference's materialised [B, N, T, D] form, generalised to a batch."""
    batch, tokens, dim = f.shape
    source = f if token_weights else f[:, :1].expand(-1, tokens, -1)
    prob = (2 * source @ t.T).softmax(dim=-1)  # [B, N, T]
    weights = prob / prob.mean(dim=-1, keepdim=True)
    feats = f.reshape(batch, tokens, 1, dim) * t.reshape(1, 1, -1, dim)  # [B, N, T, D]
    feats = feats * weights.unsqueeze(-1)
    feats = feats - feats.mean(dim=2, keepdim=True)
    return feats.sum(dim=-1)


@pytest.mark.parametrize("weighting", ["cls", "token"])
def test_class_set_matches_materialised_form(weighting):
    f, t = normalized(3, 50, 32), normalized(7, 32, seed=1)
    expected = explicit_feature_surgery(f, t, token_weights=weighting == "token")
    actual = feature_surgery(f, t, weighting=weighting)
    assert actual.shape == (3, 50, 7)
    assert relative_error(actual, expected) < 2e-5


def test_cls_weighting_differs_from_token_weighting():
    f, t = normalized(1, 50, 32), normalized(5, 32, seed=1)
    assert (feature_surgery(f, t) - feature_surgery(f, t, weighting="token")).abs().max() > 1e-4


def test_redundant_mode_subtracts_the_redundant_feature():
    f, t, r = normalized(2, 10, 16), normalized(3, 16, seed=1), normalized(1, 16, seed=2)
    expected = torch.einsum("bnd,td->bnt", f, t) - torch.einsum("bnd,d->bn", f, r[0])[..., None]
    assert relative_error(feature_surgery(f, t, r), expected) < 1e-6
    assert relative_error(feature_surgery(f, t, r[0]), expected) < 1e-6


def test_class_set_rows_sum_to_zero_and_batch_is_independent():
    f, t = normalized(4, 20, 16), normalized(6, 16, seed=3)
    sim = feature_surgery(f, t)
    assert sim.sum(dim=-1).abs().max() < 1e-5
    one_by_one = torch.cat([feature_surgery(f[i : i + 1], t) for i in range(4)])
    assert relative_error(sim, one_by_one) < 1e-6


def test_feature_surgery_bad_shapes():
    with pytest.raises(ValueError):
        feature_surgery(torch.zeros(2, 5), torch.zeros(3, 5))
    with pytest.raises(ValueError):
        feature_surgery(torch.zeros(1, 2, 5), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="weighting"):
        feature_surgery(torch.zeros(1, 2, 4), torch.zeros(3, 4), weighting="mean")


def test_similarity_map_known_answer():
    # 2x2 grid with values 0, 1, 2, 3 -> min-max 0, 1/3, 2/3, 1; at grid size no resampling.
    sim = torch.tensor([0.0, 1.0, 2.0, 3.0]).reshape(1, 4, 1)
    maps = similarity_map(sim, 2)
    assert maps.shape == (1, 1, 2, 2)
    assert torch.allclose(maps[0, 0], torch.tensor([[0.0, 1 / 3], [2 / 3, 1.0]]))


def test_similarity_map_matches_reference_steps():
    sim = torch.randn(2, 14 * 14, 3)
    maps = similarity_map(sim, (100, 60))
    low, high = sim.min(1, keepdim=True)[0], sim.max(1, keepdim=True)[0]
    expected = ((sim - low) / (high - low)).reshape(2, 14, 14, 3).permute(0, 3, 1, 2)
    expected = F.interpolate(expected, (100, 60), mode="bilinear", align_corners=False)
    assert maps.shape == (2, 3, 100, 60)
    assert relative_error(maps, expected) < 1e-5
    assert maps.min() >= 0 and maps.max() <= 1


def test_similarity_map_non_square_grid_and_errors():
    sim = torch.randn(1, 3 * 5, 2)
    assert similarity_map(sim, (30, 50), grid=(3, 5)).shape == (1, 2, 30, 50)
    with pytest.raises(ImageError, match="square"):
        similarity_map(sim, 10)
    with pytest.raises(ImageError, match="does not hold"):
        similarity_map(sim, 10, grid=(4, 4))


def test_constant_map_gives_zeros_not_nan():
    maps = similarity_map(torch.full((1, 16, 2), 0.7), 8)
    assert torch.equal(maps, torch.zeros(1, 2, 8, 8))


# ------------------------------------------------------------------ points


def explicit_points(grid_map, shape, t=0.8, down=2):
    """docs/method.md section 5, written out with Python loops (reference ordering)."""
    side_h, side_w = grid_map.shape
    small = F.interpolate(
        grid_map[None, None], (side_h // down, side_w // down), mode="bilinear", align_corners=False
    )[0, 0]
    h, w = small.shape
    flat = small.reshape(-1)
    flat = (flat - flat.min()) / (flat.max() - flat.min())
    rank = [int(i) for i in np.argsort(flat.numpy(), kind="stable")]
    num = min(int((flat >= t).sum()), flat.numel() // 2)
    points = []
    for idx in rank[len(rank) - num :] + rank[:num]:
        x = min((idx % w + 0.5) * shape[1] / w, shape[1] - 1)
        y = min((idx // w + 0.5) * shape[0] / h, shape[0] - 1)
        points.append([int(x), int(y)])
    return np.array(points, dtype=np.int64).reshape(-1, 2), np.array([1] * num + [0] * num)


@pytest.mark.parametrize("seed", range(6))
def test_points_match_explicit_definition(seed):
    generator = torch.Generator().manual_seed(seed)
    grid_map = torch.rand(14, 14, generator=generator) ** 3
    shape = (480, 640) if seed % 2 else (224, 224)
    points, labels = points_from_map(grid_map, shape)
    expected_points, expected_labels = explicit_points(grid_map, shape)
    assert np.array_equal(points, expected_points)
    assert np.array_equal(labels, expected_labels)
    assert points.dtype == np.int64 and points.shape[1] == 2


def test_points_known_answer_single_peak():
    grid_map = torch.zeros(4, 4)
    grid_map[:2, 2:] = 1.0  # top-right quadrant -> after 2x downsampling, cell (0, 1)
    points, labels = points_from_map(grid_map, (100, 200))
    assert labels.tolist() == [1, 0]
    assert points[0].tolist() == [150, 25]  # centre of the top-right cell in (x, y)


def test_points_none_when_map_is_constant():
    points, labels = points_from_map(torch.ones(6, 6), (60, 60))
    assert points.shape == (0, 2) and labels.shape == (0,)


def test_combined_targets():
    maps = torch.zeros(2, 8, 8)
    maps[0, :4, :4] = 1.0
    maps[1, 4:, 4:] = 1.0
    points, labels = points_for_targets(maps, (80, 80))
    positives = points[labels == 1]
    assert len(positives) == 2 * 4  # each text's own 4 cells (k = 4 in a 4x4 cell grid)
    assert {tuple(p) for p in positives[:4]} == {(10, 10), (30, 10), (10, 30), (30, 30)}
    assert {tuple(p) for p in positives[4:]} == {(50, 50), (70, 50), (50, 70), (70, 70)}
    negatives = points[labels == 0]
    mean_map = (maps[0] + maps[1]) / 2
    expected = explicit_points(mean_map, (80, 80))
    assert np.array_equal(negatives, expected[0][expected[1] == 0])
    assert labels[: len(negatives)].tolist() == [0] * len(negatives)  # negatives come first
