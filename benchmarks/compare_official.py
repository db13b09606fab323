"""Our ResCLIP, SC-CLIP, CLIPer, LeGrad and PAMR against their official code, on a random
ViT-B/16.

TRANSCRIBED FOR COMPARISON ONLY. The functions marked "official, transcribed" re-type the core
computations of the official repositories at these commits, keeping their structure and
quirks (sequence-first layout, in-place updates, float16 casts, hard-coded layer indices):

- ResCLIP github.com/yvhangyang/ResCLIP @ 0e085f7f52f06098b383599e9653cd28cc665a8c
  (``clip/model.py``: ``VisionTransformer.forward``, ``custom_attn``, ``create_logit_temp``,
  ``create_patch_matrix``, ``check_path``, ``generate_attention_sfr``; ``pamr.py``)
- SC-CLIP github.com/SuleBai/SC-CLIP @ 0417ba92851e9dd7432d608f10a0804d01a23062
  (``clip/model.py``: ``VisionTransformer.forward``, ``custom_attn``, ``lof_pytorch``,
  ``mean_interpolation``, ``adaptively_aggregate``)
- CLIPer github.com/linsun449/cliper.code @ c05fa41a4966d0a43af513546b17c346ccd42559
  (``modified_clip/model.py``: ``forward_visual``, ``forward_transformer``, ``custom_attn``,
  ``forward`` without sliding windows and without the diffusion refinement)
- LeGrad github.com/WalBouss/LeGrad @ a9edb031422d5f5829d9e6238a1e21feb1972c92
  (``legrad/wrapper.py``: ``compute_legrad_clip``; ``legrad/utils.py``: the hooked block and
  attention, ``vit_dynamic_size_forward``, ``min_max``)

adapted only to run without their dependencies (mmseg, CUDA, OpenAI's ``clip`` package) on
an open_clip ViT-B/16 with seeded random weights, CPU, float32, one image at a time (their
batch size). They are not part of the library and are not used by it. Each row compares our
output with the transcription: the maximum absolute difference over the maximum absolute
value. Where the official code rounds to float16 (ResCLIP's SFR prior, CLIPer's positional
table) the transcription runs both as written and with that rounding removed; the second
isolates the float16 rounding from everything else.

Run: ``.venv/bin/python benchmarks/compare_official.py`` (about 2 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import logging
import math

import open_clip
import torch
import torch.nn.functional as F

import clip_surgery
from clip_surgery import methods
from clip_surgery.refine import pamr as our_pamr

TEXTS = ["a photo of a cat", "a photo of a dog", "grass", "the sky"]
LABELS: list[int] = []  # distinct patch labels each official ResCLIP call saw

# --------------------------------------------------------------- shared helpers (ours)


def random_vit_b16(seed: int = 0) -> torch.nn.Module:
    """open_clip ViT-B/16 with random weights; biases and norms perturbed so none is a no-op."""
    torch.manual_seed(seed)
    model = open_clip.create_model("ViT-B-16", pretrained=None, force_quick_gelu=True).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
    return model


def relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |ours - theirs| / max |theirs|."""
    return float((ours.float() - theirs.float()).abs().max() / theirs.float().abs().max())


def lnd_block(block, x):
    """open_clip's own block (batch-first) on a sequence-first tensor, as ``blk(x)``."""
    return block(x.permute(1, 0, 2)).permute(1, 0, 2)


def embed(visual, img, positions):
    """Patch embedding, class token, positions (the caller's table), ``ln_pre``; NLD."""
    x = visual.conv1(img)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1])
    x = torch.cat([cls, x], dim=1)
    return visual.ln_pre(x + positions.to(x.dtype))


def dino_positions(visual, x, w, h):
    """``interpolate_pos_encoding`` of ResCLIP / SC-CLIP (DINO's +0.1 scale factor)."""
    npatch, table = x.shape[1] - 1, visual.positional_embedding
    n = table.shape[0] - 1
    if npatch == n and w == h:
        return table
    dim, patch = x.shape[-1], visual.patch_size[0]
    w0, h0 = w // patch + 0.1, h // patch + 0.1
    side = int(math.sqrt(n))
    patches = F.interpolate(
        table[1:].reshape(1, side, side, dim).permute(0, 3, 1, 2),
        mode="bicubic",
        scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)),
        align_corners=False,
        recompute_scale_factor=False,
    )
    return torch.cat([table[[0]], patches.permute(0, 2, 3, 1).reshape(-1, dim)], dim=0)


# --------------------------------------------------------------- PAMR (official, transcribed)


def official_pamr(x, mask, num_iter=10, dilations=(8, 16)):
    """``PAMR.forward`` with its ``LocalAffinityAbs``, ``LocalAffinityCopy``, ``LocalStDev``."""
    copy = torch.zeros(8, 1, 3, 3)
    for i, (r, c) in enumerate([(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]):
        copy[i, 0, r, c] = 1
    affinity = torch.zeros(8, 1, 3, 3)
    affinity[:, 0, 1, 1] = 1
    for i, (r, c) in enumerate([(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]):
        affinity[i, 0, r, c] = -1
    std_kernel = torch.zeros(9, 1, 3, 3)
    for i in range(9):
        std_kernel[i, 0, i // 3, i % 3] = 1

    def local(x, kernel):
        b, k, h, w = x.size()
        x = x.view(b * k, 1, h, w)
        out = torch.empty((k * b, len(dilations) * kernel.size(0), h, w))
        for i, d in enumerate(dilations):
            x_pad = F.pad(x, [d] * 4, mode="replicate")
            out[:, kernel.size(0) * i : (i + 1) * kernel.size(0)] = F.conv2d(
                x_pad, kernel, dilation=d
            )
        return out.view(b, k, -1, h, w)

    mask = F.interpolate(mask, size=x.size()[-2:], mode="bilinear", align_corners=True)
    x_std = local(x, std_kernel).std(2, keepdim=True)
    x = -local(x, affinity).abs() / (1e-8 + 0.1 * x_std)
    x = F.softmax(x.mean(1, keepdim=True), 2)
    for _ in range(num_iter):
        mask = (local(mask, copy) * x).sum(2)
    return mask


# --------------------------------------------------------------- ResCLIP (official, transcribed)


def resclip_window(dim1, dim2, std):
    constant = 1 / (std * math.sqrt(2))
    ks = []
    for dim in (dim1, dim2):
        start = -(dim - 1) / 2.0
        ks.append(torch.linspace(start * constant, (start + (dim - 1)) * constant, steps=dim))
    return torch.exp(-(torch.stack(torch.meshgrid(*ks, indexing="ij")) ** 2).sum(0))


def resclip_addition(dim1, dim2, window):
    m = torch.einsum("ij,kl->ijkl", torch.eye(dim1), torch.eye(dim2))
    m = m.permute((0, 3, 1, 2)).contiguous()
    out = F.conv2d(m.view(-1, dim1, dim2).unsqueeze(1), window[None, None], padding="same")
    out = out.squeeze(1).view(dim1 * dim2, dim1 * dim2)
    out = torch.vstack([torch.zeros((1, dim1 * dim2)), out])
    return torch.hstack([torch.zeros((dim1 * dim2 + 1, 1)), out])


def resclip_attn(attn_layer, x, n_patches, std, with_attn=False, custom=False, rcs=None,
                 sfr=None, sfr_weights=None, rcs_weights=None, half=True):  # fmt: skip
    num_heads = attn_layer.num_heads
    num_tokens, bsz, embed_dim = x.size()
    head_dim = embed_dim // num_heads
    scale = head_dim**-0.5
    q, k, v = F.linear(x, attn_layer.in_proj_weight, attn_layer.in_proj_bias).chunk(3, dim=-1)
    q = q.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    v = v.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    if custom:
        window = resclip_window(*[side * 2 - 1 for side in n_patches], std=std)
        omega = resclip_addition(*n_patches, window).unsqueeze(0)
        weights = torch.bmm(k, k.transpose(1, 2)) * scale
        if sfr is not None:
            sfr = sfr / torch.max(sfr)
            sfr = sfr.to(torch.float16) if half else sfr
            tau, lam = sfr_weights
            weights = tau * ((1 - lam) * weights + lam * sfr)
        weights += omega
        weights = F.softmax(weights, dim=-1)
        if rcs is not None:
            tau, lam = rcs_weights
            weights = tau * ((1 - lam) * weights + lam * rcs)
    else:
        weights = F.softmax(torch.bmm(q * scale, k.transpose(1, 2)), dim=-1)
    out = torch.bmm(weights, v).transpose(0, 1).contiguous().view(-1, bsz, embed_dim)
    out = attn_layer.out_proj(out)
    return (out, weights) if with_attn else out


def resclip_check_path(start_coords, end_coords, labels):
    steps = torch.max(torch.abs(end_coords - start_coords), dim=1)[0]
    max_steps = steps.max().item()
    t = torch.linspace(0, 1, steps=max_steps + 1).unsqueeze(1).unsqueeze(0)
    current = (start_coords.unsqueeze(1) * (1 - t) + end_coords.unsqueeze(1) * t).round().long()
    valid_steps = torch.arange(max_steps + 1).unsqueeze(0) <= steps.unsqueeze(1)
    start_values = labels[start_coords[:, 0], start_coords[:, 1]].unsqueeze(1)
    current_values = labels[current[:, :, 0], current[:, :, 1]]
    return ((current_values == start_values) | ~valid_steps).all(dim=1)


def resclip_sfr(labels, n_patches, std):
    h, w = n_patches
    total = h * w
    sfr = torch.zeros((total + 1, total + 1))
    idx = torch.arange(total)
    i, j = torch.meshgrid(idx, idx, indexing="ij")
    i_w, i_h = torch.div(i, w, rounding_mode="floor"), i % w
    j_w, j_h = torch.div(j, w, rounding_mode="floor"), j % w
    sfr[1:, 1:] = (labels[i_w, i_h] == labels[j_w, j_h]).float()
    sfr.diagonal().fill_(1)
    sfr[0, :] = 0
    sfr[:, 0] = 0
    inner = sfr[1:, 1:]
    start = torch.stack((i_w, i_h), dim=-1).view(-1, 2)
    end = torch.stack((j_w, j_h), dim=-1).view(-1, 2)
    valid = resclip_check_path(start, end, labels).view(total, total)
    steps = torch.max(torch.abs(end - start), dim=1)[0]
    decay = torch.exp(-steps.view(total, total) / steps.max().item())
    inner = torch.where(valid, inner, inner * decay)
    size = min(total, int(6 * std + 1))
    size = size if size % 2 == 1 else size + 1
    x = torch.arange(size) - size // 2
    kernel = torch.exp(-(x**2) / (2 * std**2))
    kernel = kernel / kernel.sum()
    blurred = F.relu(F.conv1d(inner.unsqueeze(1), kernel.view(1, 1, -1), padding=size // 2))
    blurred = blurred.squeeze(1)
    sfr[1:, 1:] = blurred / (blurred.sum(dim=1, keepdim=True) + 1e-8)
    return sfr.unsqueeze(0)


def resclip_official(visual, img, query, temp_thd, rcs_weights, sfr_weights, half=True,
                     logit_scale=40, std=5.0):  # fmt: skip
    """ResCLIP's ``VisionTransformer.forward`` (``wo_resi``, ``resclip``, RCS and SFR,
    ``delete_same_entity=True``, ``return_all=True``) for one image ``[1, 3, H, W]``."""
    _, _, w, h = img.shape
    patch = visual.patch_size[0]
    n_patches = (w // patch, h // patch)
    x = visual.conv1(img).flatten(2).permute(0, 2, 1)
    x = torch.cat([visual.class_embedding + torch.zeros(1, 1, x.shape[-1]), x], dim=1)
    x = visual.ln_pre(x + dino_positions(visual, x, w, h)).permute(1, 0, 2)
    attn_map = []
    blocks = list(visual.transformer.resblocks)
    for blk in blocks[:-1]:
        x_i, attn_i = resclip_attn(blk.attn, blk.ln_1(x), n_patches, std, with_attn=True)
        x = x + x_i
        x = x + blk.mlp(blk.ln_2(x))
        attn_map.append(attn_i)
    rcs = torch.stack([attn_map[i] for i in range(5, 9)]).mean(dim=0)
    blk = blocks[-1]
    temp = resclip_attn(blk.attn, blk.ln_1(x), n_patches, std, custom=True, rcs=rcs,
                        rcs_weights=rcs_weights)  # fmt: skip
    feats = (visual.ln_post(temp.permute(1, 0, 2)) @ visual.proj)[:, 1:]
    feats = feats / feats.norm(dim=-1, keepdim=True)
    logits = (feats @ query.T).permute(0, 2, 1).reshape(-1, len(query), *n_patches)
    logits = F.interpolate(logits, size=img.shape[-2:], mode="bilinear", align_corners=False)
    logits = torch.softmax(official_pamr(img, logits)[0] * logit_scale, dim=0)
    pred = logits.argmax(0, keepdim=True)
    pred[logits.max(0, keepdim=True)[0] < temp_thd] = 0
    cells = pred[0].unfold(0, patch, patch).unfold(1, patch, patch)
    labels = torch.mode(cells.reshape(n_patches[0], n_patches[1], -1), dim=-1)[0]
    sfr = resclip_sfr(labels, n_patches, std)
    LABELS.append(len(labels.unique()))  # for the report: SFR sees several labels
    x = resclip_attn(blk.attn, blk.ln_1(x), n_patches, std, custom=True, rcs=rcs, sfr=sfr,
                     sfr_weights=sfr_weights, rcs_weights=rcs_weights, half=half)  # fmt: skip
    return visual.ln_post(x.permute(1, 0, 2)) @ visual.proj


# --------------------------------------------------------------- SC-CLIP (official, transcribed)


def scclip_lof(x, n_neighbors=30, contamination=0.05):
    distances = torch.norm(x[:, None] - x[None, :], dim=2, p=2) ** 2
    knn_d, knn_i = torch.topk(distances, k=n_neighbors + 1, largest=False)
    knn_d, knn_i = knn_d[:, 1:], knn_i[:, 1:]
    reach = torch.max(knn_d, knn_d[:, -1].unsqueeze(1).expand_as(knn_d))
    lrd = n_neighbors / torch.nan_to_num(reach.mean(dim=1), nan=1e-6)
    lof = (lrd[knn_i] / lrd.unsqueeze(1)).mean(dim=1)
    threshold = torch.quantile(lof.to(torch.float32), 1 - contamination)
    return torch.where(lof > threshold)[0]


def scclip_mean_interpolation(feature_map, top_indices):
    _, c, height, width = feature_map.shape
    kernel = torch.ones(c, 1, 3, 3)
    kernel[:, 0, 1, 1] = 0
    mask = torch.ones((height, width))
    indices = torch.tensor(top_indices, dtype=torch.long)
    mask[indices[:, 0], indices[:, 1]] = 0
    mask = mask[None, None]
    neighbour_sum = F.conv2d(F.pad(feature_map * mask, (1, 1, 1, 1)), kernel, groups=c)
    valid = F.conv2d(F.pad(mask, (1, 1, 1, 1)), kernel[:, :1])
    valid_mask = (valid > 0).float()
    safe = valid.clone()
    safe[safe == 0] = 1
    top = torch.zeros((height, width))
    top[indices[:, 0], indices[:, 1]] = 1
    update = top[None, None] * valid_mask
    return feature_map * (1 - update) + neighbour_sum / safe * update


def scclip_attn(attn_layer, x, mid_simi):
    num_heads = attn_layer.num_heads
    _, bsz, embed_dim = x.size()
    head_dim = embed_dim // num_heads
    q, k, v = F.linear(x, attn_layer.in_proj_weight, attn_layer.in_proj_bias).chunk(3, dim=-1)
    k = k.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    v = v.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    mid_simi = (mid_simi - torch.mean(mid_simi)) * 3.0
    mid_simi[mid_simi < 0.0] = float("-inf")
    weights = F.softmax(mid_simi.repeat(num_heads, 1, 1), dim=-1)
    weights += F.softmax(torch.bmm(k, k.transpose(1, 2)) * head_dim**-0.5, dim=-1)
    weights /= 2
    out = torch.bmm(weights, v).transpose(0, 1).contiguous().view(-1, bsz, embed_dim)
    return attn_layer.out_proj(out)


def scclip_aggregate(feats, corrs):
    corrs = corrs / (corrs.sum(dim=-1, keepdim=True) + 1e-6)
    return torch.matmul(corrs, feats.permute(1, 0, 2)).permute(1, 0, 2)


def scclip_official(visual, img, pre=8, post=3, start=3, end=10, res_cls=0.3, beta=0.4):
    """SC-CLIP's ``VisionTransformer.forward(return_all=True)`` for one image."""
    b, _, w, h = img.shape
    width = visual.conv1.out_channels
    x = visual.conv1(img)
    feat_w, feat_h = x.shape[-2], x.shape[-1]
    x = x.reshape(b, width, -1).permute(0, 2, 1)
    x = torch.cat([visual.class_embedding + torch.zeros(b, 1, width), x], dim=1)
    x = visual.ln_pre(x + dino_positions(visual, x, w, h)).permute(1, 0, 2)
    feats_list = []
    blocks = list(visual.transformer.resblocks)
    for idx, blk in enumerate(blocks[:-1], start=1):
        x = lnd_block(blk, x)
        feats_list.append(x)
        if idx == len(blocks) - 1:
            cls_token = x[:1]
            outliers = scclip_lof(x[1:].squeeze(1))
            top = [(torch.div(i, feat_w, rounding_mode="trunc"), i % feat_w) for i in outliers]
            fmap = x[1:].permute(1, 2, 0).reshape(b, width, feat_w, feat_h)
            x = scclip_mean_interpolation(fmap, top).reshape(b, width, -1).permute(2, 0, 1)
    feats = feats_list[pre][1:].clone().permute(1, 2, 0).reshape(b, width, feat_w, feat_h)
    feats = scclip_mean_interpolation(feats, top).reshape(b, width, -1).permute(2, 0, 1)
    feats = feats / feats.norm(dim=2, keepdim=True)
    before = torch.matmul(feats.permute(1, 0, 2), feats.permute(1, 2, 0))
    mid = before.clone()
    before[before < beta] = 0.0
    x = scclip_aggregate(x, before)
    last = blocks[-1]
    x = scclip_attn(last.attn, last.ln_1(x), mid) + res_cls * cls_token
    feats = feats_list[post][1:].clone()
    feats = feats / feats.norm(dim=2, keepdim=True)
    after = torch.matmul(feats.permute(1, 0, 2), feats.permute(1, 2, 0))
    after[after < beta] = 0.0
    x = scclip_aggregate(x, after)
    re_feats = torch.zeros_like(feats_list[0])
    for i in range(start, end):
        re_feats += feats_list[i]
    cls_token = re_feats[:1]
    re_feats = scclip_attn(last.attn, last.ln_1(re_feats[1:]), mid) + res_cls * cls_token
    x += scclip_aggregate(re_feats, after)
    return visual.ln_post(x.permute(1, 0, 2)) @ visual.proj


# --------------------------------------------------------------- CLIPer (official, transcribed)


def cliper_attn(attn_layer, x, attn_mask):
    num_heads = attn_layer.num_heads
    _, bsz, embed_dim = x.size()
    head_dim = embed_dim // num_heads
    _, _, v = F.linear(x, attn_layer.in_proj_weight, attn_layer.in_proj_bias).chunk(3, dim=-1)
    v = v.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    attn_mask /= torch.sum(attn_mask, dim=-2, keepdim=True)  # in place, as the official code
    attn_mask /= torch.sum(attn_mask, dim=-1, keepdim=True)
    attn_mask = (attn_mask + attn_mask.transpose(-2, -1)) / 2
    attn_mask -= attn_mask.mean(-2, keepdim=True)
    attn_mask = torch.clamp(attn_mask, 0)
    attn_mask /= torch.sum(attn_mask, dim=-1, keepdim=True)
    attn_mask = attn_mask.flatten(0, 1)
    weights = torch.repeat_interleave(attn_mask, dim=0, repeats=v.shape[0] // attn_mask.shape[0])
    out = torch.bmm(weights, v).transpose(0, 1).contiguous().view(-1, bsz, embed_dim)
    return attn_layer.out_proj(out), weights


def cliper_official(visual, img, text, logit_scale=100.0, attention_thr=0.2, half=True):
    """CLIPer's ``forward`` (``fused-attn``, ``fuse_feature``, ``select_layer=-1``, no sliding
    window, no refinement): the fused probabilities ``[T, h, w]`` for one image."""
    patch = visual.patch_size[0]
    img_h, img_w = img.shape[2] // patch, img.shape[3] // patch
    table = visual.positional_embedding
    side = int(math.sqrt(table.shape[0] - 1))
    grid = table[1:].permute(1, 0).view(1, -1, side, side)
    grid = F.interpolate(grid, size=(img_h, img_w), mode="bilinear")
    positions = torch.cat([table[:1], grid.view(table.shape[1], -1).permute(1, 0)], 0)
    positions = positions.half() if half else positions
    x = embed(visual, img, positions).permute(1, 0, 2)
    blocks = list(visual.transformer.resblocks)
    layers = len(blocks)
    attn_maps, feats = 0, torch.zeros([layers, *x.shape])
    for i in range(layers - 1):
        ln_x = blocks[i].ln_1(x)
        feats[i] = ln_x
        ln_nld = ln_x.permute(1, 0, 2)
        ln_x, attn_map = blocks[i].attn(ln_nld, ln_nld, ln_nld, need_weights=True,
                                        average_attn_weights=False)  # fmt: skip
        attn_maps += attn_map
        x = x + ln_x.permute(1, 0, 2)
        x = x + blocks[i].mlp(blocks[i].ln_2(x))
    last = blocks[-1]
    feats[-1] = x
    for kth, f in enumerate(feats):
        out, attn = cliper_attn(last.attn, last.ln_1(f), attn_maps)
        feats[kth] = out
    feats = visual.ln_post(feats.squeeze()) @ visual.proj
    texts = torch.cat([text, text.mean(0, True)], dim=0)
    feats = feats / feats.norm(dim=-1, keepdim=True)
    texts = texts / texts.norm(dim=-1, keepdim=True)
    seg = (logit_scale * feats @ texts.t())[:, 1:]
    seg = seg.transpose(-1, -2).reshape(-1, len(texts), img_h, img_w).softmax(-3)[:, : len(text)]
    seg_last = seg[-1]
    seg_last[seg_last < seg_last.amax((-1, -2), keepdim=True) * attention_thr] = 0
    seg_last = seg_last.flatten(-2, -1) @ attn.mean(0)[1:, 1:]
    return seg_last.unflatten(dim=-1, sizes=(img_h, img_w)) + seg.mean(0)


# --------------------------------------------------------------- LeGrad (official, transcribed)


def legrad_official(visual, img, text, layer_index=-2):
    """LeGrad's ``compute_legrad_clip`` on the hooked open_clip forward for one image; returns
    the accumulated relevance ``[T, N]`` before upsampling and the final maps ``[T, H, W]``."""
    from timm.layers import resample_abs_pos_embed

    blocks = list(visual.transformer.resblocks)
    start = layer_index if layer_index >= 0 else len(blocks) + layer_index
    patch = visual.patch_size[0]
    grid = (img.shape[2] // patch, img.shape[3] // patch)
    table = visual.positional_embedding
    if table.shape[0] != grid[0] * grid[1] + 1:  # resampled (not written back, unlike the code)
        table = resample_abs_pos_embed(table.unsqueeze(0), new_size=list(grid),
                                       num_prefix_tokens=1, interpolation="bicubic",
                                       antialias=True)[0]  # fmt: skip
    num_prompts = len(text)
    with torch.enable_grad():
        x = embed(visual, img.repeat(num_prompts, 1, 1, 1), table).permute(1, 0, 2)
        x = x.detach().requires_grad_(True)
        maps, post_mlp = {}, {}
        for layer, blk in enumerate(blocks):
            if layer < start:
                x = lnd_block(blk, x)
                continue
            q_x = blk.ln_1(x)
            length, n, c = q_x.shape
            q, k, v = F.linear(q_x, blk.attn.in_proj_weight, blk.attn.in_proj_bias).chunk(3, -1)
            q = q.contiguous().view(length, n * blk.attn.num_heads, -1).transpose(0, 1)
            k = k.contiguous().view(length, n * blk.attn.num_heads, -1).transpose(0, 1)
            v = v.contiguous().view(length, n * blk.attn.num_heads, -1).transpose(0, 1)
            attn = torch.bmm(q * float(q.shape[-1]) ** -0.5, k.transpose(-1, -2)).softmax(dim=-1)
            maps[layer] = attn
            out = blk.attn.out_proj(torch.bmm(attn, v).transpose(0, 1).reshape(length, n, c))
            x = x + blk.ls_1(out)
            x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
            post_mlp[layer] = x
        accum, accum_tokens = 0, 0
        for layer in range(start, len(blocks)):
            feat = F.normalize(visual.ln_post(post_mlp[layer].mean(dim=0)) @ visual.proj, dim=-1)
            sim = text @ feat.transpose(-1, -2)
            one_hot = torch.sum(F.one_hot(torch.arange(0, num_prompts)).float() * sim)
            (grad,) = torch.autograd.grad(one_hot, [maps[layer]], retain_graph=True)
            grad = grad.reshape(num_prompts, -1, *grad.shape[1:]).clamp(min=0.0)
            relevance = grad.mean(dim=1).mean(dim=1)[:, 1:]
            accum_tokens = accum_tokens + relevance
            expl = relevance.reshape(1, num_prompts, *grid)
            accum = accum + F.interpolate(expl, scale_factor=patch, mode="bilinear")
    low = accum.reshape(1, num_prompts, -1).min(dim=-1, keepdim=True)[0].unsqueeze(-1)
    high = accum.reshape(1, num_prompts, -1).max(dim=-1, keepdim=True)[0].unsqueeze(-1)
    return accum_tokens.detach(), ((accum - low) / (high - low))[0].detach()


# --------------------------------------------------------------- comparisons


Row = tuple[str, str, float]


def per_image(function, images) -> list:
    """``function`` on each image ``[1, 3, H, W]`` (the official code's batch of one)."""
    return [function(images[i : i + 1]) for i in range(len(images))]


def pamr_rows(images, size: int) -> list[Row]:
    """Our PAMR and the official module on random scores."""
    generator = torch.Generator().manual_seed(6)
    scores = torch.randn(1, 4, size // 16, size // 16, generator=generator)
    ours, theirs = our_pamr(images[:1], scores), official_pamr(images[:1], scores)
    return [("PAMR", "scores", relative(ours, theirs))]


def resclip_rows(model, visual, images) -> list[Row]:
    """ResCLIP with texts taken from patch tokens of its first pass: on random weights,
    caption-like texts give every patch the same label and would leave SFR's paths unused."""
    tokens = model.encode_image(images, method="resclip", sfr=False)
    text = F.normalize(torch.cat([tokens[0, [1, 130]], tokens[1, [60, 190]]]), dim=-1)
    options = methods.get("resclip").options()  # ADE20K's config, as the calls below
    ours = model.score(images, methods.TextQuery(text), "resclip", options).similarity
    rows = []
    for half in (True, False):
        LABELS.clear()

        def official(image, half=half):
            tokens = resclip_official(visual, image, text, 0.25, (2.0, 0.3), (2.1, 0.7), half=half)
            return F.normalize(tokens[:, 1:], dim=-1) @ text.T

        theirs = torch.cat(per_image(official, images))
        kinds = ", ".join(str(count) for count in LABELS)
        cast = "official float16 SFR prior" if half else "no float16 cast"
        rows.append(
            ("resclip", f"cosines ({cast}; labels per image {kinds})", relative(ours, theirs))
        )
    return rows


def scclip_rows(model, visual, images, text) -> list[Row]:
    """SC-CLIP's patch cosines (its layer indices are those of a 12-block model)."""
    ours = model.score(images, methods.TextQuery(text), "scclip").similarity
    theirs = per_image(lambda image: F.normalize(scclip_official(visual, image), dim=-1), images)
    return [("scclip", "cosines", relative(ours, torch.cat(theirs) @ text.T))]


def cliper_rows(model, visual, images, text) -> list[Row]:
    """CLIPer's fused probabilities, with and without the code's float16 positional table."""
    ours = model.score(images, methods.TextQuery(text), "cliper").similarity
    rows = []
    for half in (True, False):
        theirs = per_image(lambda i, h=half: cliper_official(visual, i, text, half=h), images)
        theirs = torch.stack([maps.flatten(1).T for maps in theirs])
        label = "official float16 positions" if half else "float32 positions"
        rows.append(("cliper", f"probabilities ({label})", relative(ours, theirs)))
    return rows


def legrad_rows(model, visual, images, text, size: int) -> list[Row]:
    """LeGrad's relevance per token and its min-max maps at the input size."""
    rows = []
    grid = size // 16
    for index in (-2, 0):
        result = model.explain(images, TEXTS, method="legrad", templates=None, start_layer=index)
        official = per_image(lambda i, n=index: legrad_official(visual, i, text, n), images)
        tokens = torch.stack([o[0].T for o in official])
        maps = torch.stack([o[1] for o in official])
        ours = result.similarity.transpose(1, 2).reshape(len(images), len(TEXTS), grid, grid)
        ours = F.interpolate(ours, scale_factor=16, mode="bilinear")
        low, high = ours.amin((2, 3), keepdim=True), ours.amax((2, 3), keepdim=True)
        rows.append(
            ("legrad", f"relevance, layer_index={index}", relative(result.similarity, tokens))
        )
        rows.append(
            ("legrad", f"maps, layer_index={index}", relative((ours - low) / (high - low), maps))
        )
    return rows


def compare(size: int) -> list[Row]:
    """Every comparison at ``size`` x ``size``."""
    clip = random_vit_b16()
    model = clip_surgery.wrap(clip)
    visual = clip.visual
    text = model.encode_text(TEXTS, templates=None)
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        rows = pamr_rows(images, size) + resclip_rows(model, visual, images)
        rows += scclip_rows(model, visual, images, text) + cliper_rows(model, visual, images, text)
    return rows + legrad_rows(model, visual, images, text, size)


def main() -> None:
    """Print one Markdown table of the differences."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 448])
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)  # "no pretrained weights" is intended here
    torch.set_grad_enabled(False)
    print("| method | compared | size | max abs difference / max abs official |")
    print("| --- | --- | --- | --- |")
    for size in args.sizes:
        for method, what, difference in compare(size):
            print(f"| {method} | {what} | {size} | {difference:.1e} |")


if __name__ == "__main__":
    main()
