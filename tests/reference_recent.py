"""Straightforward implementations of ResCLIP, SC-CLIP, CLIPer, LeGrad and PAMR, for tests only.

Written from the papers' equations and the official repositories' documented behaviour
(docs/method.md, section 7), with explicit loops over heads, images, tokens and pairs, explicit
convolution kernels and explicit attention matrices. Nothing here imports clip_surgery, so an
error in the library cannot hide in both.
"""

from __future__ import annotations

import math

import numpy as np
import reference as ref
import torch
import torch.nn.functional as F


def heads_of(block, x):
    """Per-head (q, k, v) lists of ``[B, N, d]`` for normalised tokens ``x``."""
    q, k, v = ref.qkv(block, x)
    heads = block.attn.num_heads
    size = q.shape[-1] // heads
    parts = [slice(h * size, (h + 1) * size) for h in range(heads)]
    return [q[..., p] for p in parts], [k[..., p] for p in parts], [v[..., p] for p in parts]


def out_proj(block, per_head):
    """The block's output projection of per-head outputs (a list of ``[B, N, d]``)."""
    merged = torch.cat(per_head, dim=-1)
    return merged @ block.attn.out_proj.weight.T + block.attn.out_proj.bias


def qk_probabilities(block, normed):
    """A list over heads of ``softmax(q k^T / sqrt(d))`` ``[B, N, N]``."""
    qs, ks, _ = heads_of(block, normed)
    scale = qs[0].shape[-1] ** -0.5
    pairs = zip(qs, ks, strict=True)
    return [torch.softmax(q @ k.transpose(1, 2) * scale, dim=-1) for q, k in pairs]


def plain_embedding(model, images, mode):
    """CLIP's own image embedding ``[B, D]`` with positions resized by ``mode``."""
    x, _ = ref.embed(model.visual, images, mode)
    for block in model.visual.transformer.resblocks:
        x = ref.plain_block(block, x)
    return ref.project(model.visual, x[:, 0])


def layer_at(paper, depth):
    """The paper's ViT-B/16 block ``paper`` at the same relative depth of a ``depth`` model."""
    return math.floor(paper * depth / 12 + 0.5)


# ----------------------------------------------------------------------------- PAMR


def pamr(image, mask, steps=10, dilations=(8, 16)):
    """Araslanov and Roth's PAMR with explicit 3 x 3 dilated kernels (replicate padding)."""
    shift = torch.zeros(8, 1, 3, 3)
    positions = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]
    for index, (row, col) in enumerate(positions):
        shift[index, 0, row, col] = 1
    window = torch.zeros(9, 1, 3, 3)
    for index in range(9):
        window[index, 0, index // 3, index % 3] = 1

    def local(x, kernel):
        batch, channels, height, width = x.shape
        flat = x.reshape(batch * channels, 1, height, width)
        parts = [
            F.conv2d(F.pad(flat, [d] * 4, mode="replicate"), kernel, dilation=d) for d in dilations
        ]
        return torch.cat(parts, dim=1).reshape(batch, channels, -1, height, width)

    if mask.shape[-2:] != image.shape[-2:]:
        mask = F.interpolate(mask, size=image.shape[-2:], mode="bilinear", align_corners=True)
    centre = image[:, :, None]
    spread = local(image, window).std(dim=2, keepdim=True)
    affinity = -(centre - local(image, shift)).abs() / (1e-8 + 0.1 * spread)
    affinity = affinity.mean(dim=1, keepdim=True).softmax(dim=2)
    for _ in range(steps):
        mask = (local(mask, shift) * affinity).sum(dim=2)
    return mask


# ----------------------------------------------------------------------------- ResCLIP


def resclip(model, images, text, rcs=None, tau_rcs=2.0, l_rcs=0.3, tau_sfr=2.1, l_sfr=0.7,
            threshold=0.25, scale=40.0, paths=True, std=5.0, sfr=True, residual=False,
            ffn=False):  # fmt: skip
    """ResCLIP on NACLIP (by default no residual, no FFN): projected tokens ``[B, 1+N, D]``."""
    visual = model.visual
    x, grid = ref.embed(visual, images, "bicubic-dino")
    blocks = list(visual.transformer.resblocks)
    first, last = rcs or (layer_at(5, len(blocks)), layer_at(8, len(blocks)))
    kept = []
    for index, block in enumerate(blocks[:-1]):
        if first <= index <= last:
            kept.append(qk_probabilities(block, ref.layer_norm(x, block.ln_1)))
        x = ref.plain_block(block, x)
    mid = [torch.stack([probs[h] for probs in kept]).mean(dim=0) for h in range(len(kept[0]))]
    block = blocks[-1]
    qs, ks, vs = heads_of(block, ref.layer_norm(x, block.ln_1))
    prior = ref.gaussian_prior(grid, std)
    scale_qk = qs[0].shape[-1] ** -0.5
    patch = visual.conv1.weight.shape[-1]
    outputs = []

    def finish(out, b):  # the last block's residual and FFN, when kept
        out = x[b] + out if residual else out
        return out + ref.mlp(block, ref.layer_norm(out, block.ln_2)) if ffn else out

    for b in range(len(images)):
        logits = [ks[h][b] @ ks[h][b].T * scale_qk for h in range(len(ks))]
        weights = [
            tau_rcs * ((1 - l_rcs) * torch.softmax(lg + prior, dim=-1) + l_rcs * mid[h][b])
            for h, lg in enumerate(logits)
        ]
        if sfr:
            first_pass = finish(out_proj(block, [w @ vs[h][b] for h, w in enumerate(weights)]), b)
            feats = F.normalize(ref.project(visual, first_pass)[1:], dim=-1)
            cos = (feats @ text.T).T.reshape(len(text), *grid)[None]
            cos = F.interpolate(cos, size=images.shape[-2:], mode="bilinear", align_corners=False)
            probs = torch.softmax(pamr(images[b : b + 1], cos)[0] * scale, dim=0)
            labels = probs.argmax(dim=0)
            labels[probs.max(dim=0).values < threshold] = 0
            matrix = sfr_matrix(patch_labels(labels, grid, patch), std, paths)
            weights = [
                tau_rcs
                * (
                    (1 - l_rcs)
                    * torch.softmax(tau_sfr * ((1 - l_sfr) * lg + l_sfr * matrix) + prior, dim=-1)
                    + l_rcs * mid[h][b]
                )
                for h, lg in enumerate(logits)
            ]
        outputs.append(finish(out_proj(block, [w @ vs[h][b] for h, w in enumerate(weights)]), b))
    return ref.project(visual, torch.stack(outputs))


def patch_labels(labels, grid, patch):
    """``torch.mode`` of each patch's pixel labels, patch by patch."""
    result = torch.zeros(grid, dtype=torch.long)
    for row in range(grid[0]):
        for col in range(grid[1]):
            cell = labels[row * patch : (row + 1) * patch, col * patch : (col + 1) * patch]
            result[row, col] = torch.mode(cell.flatten()).values
    return result


def sfr_matrix(labels, std, paths):
    """The SFR prior ``[1+N, 1+N]`` (CLS row and column 0), divided by its maximum."""
    rows, cols = labels.shape
    flat = labels.flatten().numpy()
    tokens = len(flat)
    same = (flat[:, None] == flat[None, :]).astype(np.float32)
    np.fill_diagonal(same, 1)
    if paths:
        same = decayed(same, labels.numpy(), rows, cols)
    size = min(tokens, int(6 * std + 1))
    size += 1 - size % 2
    offsets = np.arange(size) - size // 2
    kernel = np.exp(-(offsets.astype(np.float32) ** 2) / (2 * std**2))
    kernel = kernel / kernel.sum()
    smooth = np.zeros_like(same)
    for j in range(tokens):  # each output column: the kernel-weighted row values around it
        for offset, weight in zip(offsets, kernel, strict=True):
            if 0 <= j + offset < tokens:
                smooth[:, j] += weight * same[:, j + offset]
    smooth = np.maximum(smooth, 0)
    smooth = smooth / (smooth.sum(axis=1, keepdims=True) + 1e-8)
    matrix = torch.zeros(tokens + 1, tokens + 1)
    matrix[1:, 1:] = torch.from_numpy(smooth)
    return matrix / matrix.max()


def decayed(same, labels, rows, cols):
    """Pairs whose sampled straight path leaves the start's label: times exp(-steps / max).

    For each start and each sample index s (float32 arithmetic, as the code), every end at
    least s steps away must still see the start's label at sample s."""
    longest = max(rows, cols) - 1
    t = torch.linspace(0, 1, longest + 1).numpy()  # float32 samples, as the code
    end_r, end_c = np.divmod(np.arange(rows * cols), cols)
    result = same.copy()
    for i in range(rows * cols):
        r0, c0 = divmod(i, cols)
        steps = np.maximum(np.abs(end_r - r0), np.abs(end_c - c0))
        ok = np.ones(rows * cols, dtype=bool)
        for s in range(longest + 1):
            r = np.round(np.float32(r0) * (np.float32(1) - t[s]) + end_r.astype(np.float32) * t[s])
            c = np.round(np.float32(c0) * (np.float32(1) - t[s]) + end_c.astype(np.float32) * t[s])
            seen = labels[r.astype(int), c.astype(int)] == labels[r0, c0]
            ok &= seen | (s > steps)
        decay = np.exp(-steps.astype(np.float32) / np.float32(longest))
        result[i] = np.where(ok, same[i], same[i] * decay)
    return result


# ----------------------------------------------------------------------------- SC-CLIP


def scclip(model, images, pre=None, post=None, start=None, end=None, res_cls=0.3, beta=0.4,
           neighbors=30, contamination=0.05):  # fmt: skip
    """SC-CLIP's projected patch tokens ``[B, N, D]``, one image at a time."""
    visual = model.visual
    blocks = list(visual.transformer.resblocks)
    depth = len(blocks)
    pre = layer_at(8, depth) if pre is None else pre
    post = layer_at(3, depth) if post is None else post
    start = layer_at(3, depth) if start is None else start
    end = layer_at(10, depth) if end is None else end
    results = []
    for b in range(len(images)):
        x, grid = ref.embed(visual, images[b : b + 1], "bicubic-dino")
        outputs = []
        for block in blocks[:-1]:
            x = ref.plain_block(block, x)
            outputs.append(x[0])
        cls, patches = outputs[-1][:1], outputs[-1][1:]
        outliers = lof_outliers(patches, min(neighbors, len(patches) - 1), contamination)
        patches = interpolate_outliers(patches, outliers, grid)
        before = cosine_matrix(interpolate_outliers(outputs[pre][1:], outliers, grid))
        after = cosine_matrix(outputs[post][1:])
        last = blocks[-1]
        x = weighted_mean(patches, before, beta)
        x = sc_attention(last, x, before) + res_cls * cls
        x = weighted_mean(x, after, beta)
        summed = sum(outputs[i] for i in range(start, end))
        extra = sc_attention(last, summed[1:], before) + res_cls * summed[:1]
        x = x + weighted_mean(extra, after, beta)
        results.append(ref.project(visual, x))
    return torch.stack(results)


def lof_outliers(points, k, contamination):
    """Indices whose local outlier factor (squared distances; reach = own k-distance, as the
    official code) exceeds the ``1 - contamination`` quantile."""
    count = len(points)
    distances = torch.zeros(count, count)
    for i in range(count):
        distances[i] = ((points - points[i]) ** 2).sum(dim=-1)
    order = torch.argsort(distances, dim=1, stable=True)[:, 1 : k + 1]
    kdist = torch.stack([distances[i, order[i, -1]] for i in range(count)])
    density = k / kdist
    factor = torch.stack([(density[order[i]] / density[i]).mean() for i in range(count)])
    return set(torch.nonzero(factor > torch.quantile(factor, 1 - contamination)).flatten().tolist())


def interpolate_outliers(tokens, outliers, grid):
    """Each outlier replaced by the mean of its non-outlier 8-neighbours inside the grid."""
    result = tokens.clone()
    rows, cols = grid
    for index in outliers:
        r, c = index // cols, index % cols
        neighbours = [
            (r + dr) * cols + (c + dc)
            for dr in (-1, 0, 1)
            for dc in (-1, 0, 1)
            if (dr or dc) and 0 <= r + dr < rows and 0 <= c + dc < cols
        ]
        valid = [n for n in neighbours if n not in outliers]
        if valid:
            result[index] = tokens[valid].mean(dim=0)
    return result


def cosine_matrix(tokens):
    normed = F.normalize(tokens, dim=-1)
    return normed @ normed.T


def weighted_mean(tokens, similarity, beta):
    weights = similarity.clone()
    weights[weights < beta] = 0
    return (weights / (weights.sum(dim=-1, keepdim=True) + 1e-6)) @ tokens


def sc_attention(block, tokens, similarity):
    """out_proj(((softmax(3 (S - mean S)) with -inf below 0) + softmax(k k^T)) / 2 v)."""
    qs, ks, vs = heads_of(block, ref.layer_norm(tokens, block.ln_1))
    centred = (similarity - similarity.mean()) * 3.0
    centred[centred < 0] = float("-inf")
    prior = torch.softmax(centred, dim=-1)
    scale = ks[0].shape[-1] ** -0.5
    per_head = [
        ((prior + torch.softmax(k @ k.T * scale, dim=-1)) / 2) @ v
        for k, v in zip(ks, vs, strict=True)
    ]
    return out_proj(block, per_head)


# ----------------------------------------------------------------------------- CLIPer


def cliper(model, images, text, scale=100.0, threshold=0.2):
    """CLIPer's early-layer fusion (no fine-grained compensation): ``[B, N, T]``."""
    visual = model.visual
    blocks = list(visual.transformer.resblocks)
    x, grid = ref.embed(visual, images, "bilinear")
    summed, embeddings = None, []
    for block in blocks[:-1]:
        normed = ref.layer_norm(x, block.ln_1)
        embeddings.append(normed)
        probs = torch.stack(qk_probabilities(block, normed), dim=1)  # [B, H, N, N]
        summed = probs if summed is None else summed + probs
        x = ref.plain_block(block, x)
    embeddings.append(x)
    texts = torch.cat([text, F.normalize(text.mean(dim=0, keepdim=True), dim=-1)])
    last = blocks[-1]
    per_layer = []
    for embedding in embeddings:
        summed = summed / summed.sum(dim=-2, keepdim=True)  # column-normalise, then rows
        summed = summed / summed.sum(dim=-1, keepdim=True)
        fused = (summed + summed.transpose(-1, -2)) / 2
        fused = torch.clamp(fused - fused.mean(dim=-2, keepdim=True), min=0)
        fused = fused / fused.sum(dim=-1, keepdim=True)
        _, _, vs = heads_of(last, ref.layer_norm(embedding, last.ln_1))
        out = out_proj(last, [fused[:, h] @ v for h, v in enumerate(vs)])
        feats = F.normalize(ref.project(visual, out)[:, 1:], dim=-1)
        per_layer.append(torch.softmax(scale * feats @ texts.T, dim=-1)[..., : len(text)])
    final = per_layer[-1].clone()
    for b in range(len(images)):
        for t in range(len(text)):
            column = final[b, :, t]
            column[column < column.max() * threshold] = 0
    per_layer[-1] = final
    spread = fused.mean(dim=1)[:, 1:, 1:]
    propagated = torch.einsum("bmt,bmn->bnt", final, spread)
    return propagated + torch.stack(per_layer).mean(dim=0)


# ----------------------------------------------------------------------------- LeGrad


def legrad(model, images, text, start=0):
    """LeGrad relevance ``[B, N, T]`` summed over blocks ``start..L-1``."""
    visual = model.visual
    blocks = list(visual.transformer.resblocks)
    maps = torch.zeros(len(images), 0)
    with torch.enable_grad():
        x, _ = ref.embed(visual, images, "bicubic-antialias")
        x = x.detach().requires_grad_(True)
        recorded, features = {}, {}
        for index, block in enumerate(blocks):
            if index < start:
                x = ref.plain_block(block, x)
                continue
            normed = ref.layer_norm(x, block.ln_1)
            qs, ks, vs = heads_of(block, normed)
            scale = qs[0].shape[-1] ** -0.5
            probs = [
                torch.softmax(q @ k.transpose(1, 2) * scale, dim=-1)
                for q, k in zip(qs, ks, strict=True)
            ]
            recorded[index] = probs
            x = x + out_proj(block, [p @ v for p, v in zip(probs, vs, strict=True)])
            x = x + ref.mlp(block, ref.layer_norm(x, block.ln_2))
            features[index] = F.normalize(ref.project(visual, x.mean(dim=1)), dim=-1)
        maps = 0
        for index, embedding in features.items():
            columns = []
            for t in range(len(text)):
                grads = torch.autograd.grad(
                    (embedding @ text[t]).sum(), recorded[index], retain_graph=True
                )
                per_head = [g.clamp(min=0).mean(dim=1) for g in grads]  # mean over queries
                columns.append(torch.stack(per_head).mean(dim=0)[:, 1:])
            maps = maps + torch.stack(columns, dim=-1)
    return maps.detach()
