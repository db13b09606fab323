"""Straightforward implementations written from the papers' equations, for tests only.

Explicit per-head loops and explicit attention matrices; nothing here imports clip_surgery's
engine, so an error there cannot hide in both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def layer_norm(x, norm):
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def mlp(block, x):
    hidden = x @ block.mlp.c_fc.weight.T + block.mlp.c_fc.bias
    hidden = hidden * torch.sigmoid(1.702 * hidden)  # QuickGELU
    return hidden @ block.mlp.c_proj.weight.T + block.mlp.c_proj.bias


def positions(table, native_side, grid, mode="bilinear"):
    if grid == (native_side, native_side):
        return table
    patches = table[1:].reshape(1, native_side, native_side, -1).permute(0, 3, 1, 2)
    if mode == "bilinear":
        patches = F.interpolate(patches, size=grid, mode="bilinear", align_corners=False)
    elif mode == "bicubic-dino":  # as SCLIP/ClearCLIP/NACLIP's interpolate_pos_encoding
        scale = ((grid[0] + 0.1) / native_side, (grid[1] + 0.1) / native_side)
        patches = F.interpolate(patches, scale_factor=scale, mode="bicubic")
    else:  # timm resample_abs_pos_embed, as GEM
        patches = F.interpolate(patches, size=grid, mode="bicubic", antialias=True)
    return torch.cat([table[:1], patches.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)])


def embed(visual, images, mode="bilinear"):
    patch = visual.conv1.weight.shape[-1]
    x = F.conv2d(images, visual.conv1.weight, stride=patch)
    batch, width, grid_h, grid_w = x.shape
    x = x.reshape(batch, width, grid_h * grid_w).permute(0, 2, 1)
    x = torch.cat([visual.class_embedding + torch.zeros(batch, 1, width), x], dim=1)
    side = round((visual.positional_embedding.shape[0] - 1) ** 0.5)
    x = x + positions(visual.positional_embedding, side, (grid_h, grid_w), mode)
    return layer_norm(x, visual.ln_pre), (grid_h, grid_w)


def qkv(block, x):
    width = x.shape[-1]
    weight, bias = block.attn.in_proj_weight, block.attn.in_proj_bias
    return tuple(
        x @ weight[i * width : (i + 1) * width].T + bias[i * width : (i + 1) * width]
        for i in range(3)
    )


def gaussian_prior(grid, std):
    tokens = grid[0] * grid[1]
    prior = torch.zeros(tokens + 1, tokens + 1)
    for a in range(tokens):
        for b in range(tokens):
            distance = (a // grid[1] - b // grid[1]) ** 2 + (a % grid[1] - b % grid[1]) ** 2
            prior[a + 1, b + 1] = torch.exp(torch.tensor(-distance / (2 * std**2)))
    return prior


def self_self(q, k, v, normed, scale, iterations=1, temperature=None):
    """GEM's SelfSelfAttention for one head: q, k, v [B, N, d]."""
    if temperature is None:
        temperature = normed.norm(dim=-1).mean(dim=-1).view(-1, 1, 1) * scale
    result = 0
    for x in (v, k, q):
        for _ in range(iterations):
            x = F.normalize(x, dim=-1)
            x = torch.softmax(x @ x.transpose(1, 2) * temperature, dim=-1) @ x
        x = F.normalize(x, dim=-1)
        result = result + torch.softmax(x @ x.transpose(1, 2) * temperature, dim=-1) @ v
    return result / 3


def attention(block, normed, kind, grid=None, std=5.0, iterations=1, temperature=None):
    """out_proj(A v) for one block with an explicit attention matrix A per head."""
    q, k, v = qkv(block, normed)
    heads = block.attn.num_heads
    head_dim = q.shape[-1] // heads
    scale = head_dim**-0.5
    outputs = []
    for head in range(heads):
        part = slice(head * head_dim, (head + 1) * head_dim)
        qh, kh, vh = q[..., part], k[..., part], v[..., part]
        if kind == "self-self":
            outputs.append(self_self(qh, kh, vh, normed, scale, iterations, temperature))
            continue
        if kind == "qk":
            weights = torch.softmax(qh @ kh.transpose(1, 2) * scale, dim=-1)
        elif kind in ("vv", "kk", "qq"):
            source = {"vv": vh, "kk": kh, "qq": qh}[kind]
            weights = torch.softmax(source @ source.transpose(1, 2) * scale, dim=-1)
        elif kind == "identity":
            weights = torch.eye(qh.shape[1]).expand(qh.shape[0], -1, -1)
        elif kind == "csa":
            weights = torch.softmax(qh @ qh.transpose(1, 2) * scale, dim=-1) + torch.softmax(
                kh @ kh.transpose(1, 2) * scale, dim=-1
            )
        elif kind == "neighbourhood":
            logits = kh @ kh.transpose(1, 2) * scale + gaussian_prior(grid, std)
            weights = torch.softmax(logits, dim=-1)
        else:
            raise ValueError(kind)
        outputs.append(weights @ vh)
    out = torch.cat(outputs, dim=-1)
    return out @ block.attn.out_proj.weight.T + block.attn.out_proj.bias


def plain_block(block, x):
    x = x + attention(block, layer_norm(x, block.ln_1), "qk")
    return x + mlp(block, layer_norm(x, block.ln_2))


def project(visual, tokens):
    return layer_norm(tokens, visual.ln_post) @ visual.proj


def vit_replace(model, images, kind, residual, ffn, mode="bilinear", std=5.0):
    """MaskCLIP / SCLIP / ClearCLIP / NACLIP: the last block rewritten."""
    visual = model.visual
    x, grid = embed(visual, images, mode)
    blocks = list(visual.transformer.resblocks)
    for block in blocks[:-1]:
        x = plain_block(block, x)
    last = blocks[-1]
    out = attention(last, layer_norm(x, last.ln_1), kind, grid, std)
    x = x + out if residual else out
    if ffn:
        x = x + mlp(last, layer_norm(x, last.ln_2))
    return project(visual, x)


def vit_dual(model, images, depth, kind, ffn=False, cls="original", mode="bilinear", **extra):
    """CLIP Surgery / GEM: a parallel path over the last ``depth`` blocks."""
    visual = model.visual
    x, grid = embed(visual, images, mode)
    blocks = list(visual.transformer.resblocks)
    for block in blocks[: len(blocks) - depth]:
        x = plain_block(block, x)
    original, new = x, x
    for block in blocks[len(blocks) - depth :]:
        normed = layer_norm(original, block.ln_1)
        new = new + attention(block, normed, kind, grid, **extra)
        if ffn:
            new = new + mlp(block, layer_norm(new, block.ln_2))
        original = plain_block(block, original)
    tokens = torch.cat([original[:, :1], new[:, 1:]], dim=1) if cls == "original" else new
    return project(visual, tokens)


def gradcam_vit(model, images, text):
    """Grad-CAM with the last block's ln_1 output as the target layer."""
    visual = model.visual
    with torch.enable_grad():
        x, _ = embed(visual, images)
        x = x.detach()
        blocks = list(visual.transformer.resblocks)
        for block in blocks[:-1]:
            x = plain_block(block, x)
        last = blocks[-1]
        normed = layer_norm(x, last.ln_1).detach().requires_grad_(True)
        x = x + attention(last, normed, "qk")
        x = x + mlp(last, layer_norm(x, last.ln_2))
        embedding = F.normalize(project(visual, x[:, 0]), dim=-1)
        cams = []
        for index in range(len(text)):
            score = (embedding @ text[index]).sum()
            (gradient,) = torch.autograd.grad(score, normed, retain_graph=True)
            weights = gradient[:, 1:].mean(dim=1)  # [B, C]
            cam = torch.relu(torch.einsum("bnc,bc->bn", normed[:, 1:], weights))
            cams.append(cam.detach())
    return torch.stack(cams, dim=-1)


def chefer_vit(model, images, text, logit_scale, start):
    """Chefer et al.'s relevancy from explicitly recorded attention probabilities."""
    visual = model.visual
    with torch.enable_grad():
        x, _ = embed(visual, images)
        x = x.detach().requires_grad_(True)
        blocks = list(visual.transformer.resblocks)
        recorded = []
        for index, block in enumerate(blocks):
            if index < start:
                x = plain_block(block, x)
                continue
            normed = layer_norm(x, block.ln_1)
            q, k, v = qkv(block, normed)
            heads = block.attn.num_heads
            head_dim = q.shape[-1] // heads
            probs = []
            outs = []
            for head in range(heads):
                part = slice(head * head_dim, (head + 1) * head_dim)
                weights = torch.softmax(
                    q[..., part] @ k[..., part].transpose(1, 2) * head_dim**-0.5, dim=-1
                )
                probs.append(weights)
                outs.append(weights @ v[..., part])
            recorded.append(probs)
            out = torch.cat(outs, dim=-1) @ block.attn.out_proj.weight.T + block.attn.out_proj.bias
            x = x + out
            x = x + mlp(block, layer_norm(x, block.ln_2))
        embedding = F.normalize(project(visual, x[:, 0]), dim=-1)
        maps = []
        for index in range(len(text)):
            score = (logit_scale * embedding @ text[index]).sum()
            flat = [p for block_probs in recorded for p in block_probs]
            grads = torch.autograd.grad(score, flat, retain_graph=True)
            tokens = x.shape[1]
            relevance = torch.eye(tokens).expand(x.shape[0], tokens, tokens)
            position = 0
            for block_probs in recorded:
                cams = []
                for probs in block_probs:
                    cams.append((grads[position] * probs.detach()).clamp(min=0))
                    position += 1
                cam = torch.stack(cams).mean(dim=0)
                relevance = relevance + cam @ relevance
            maps.append(relevance[:, 0, 1:])
    return torch.stack(maps, dim=-1)
