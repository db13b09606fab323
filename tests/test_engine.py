"""The surgery forward against a straightforward implementation written here from docs/method.md."""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import make_resnet, perturb, random_images, relative_error

import clip_surgery
from clip_surgery.errors import ImageError, ModelError, OptionError

TOLERANCE = 2e-4
SIZES = [(224, 224), (448, 448), (224, 320)]


# ------------------------------------------------------------------ reference (docs/method.md 2-3)


def ref_layer_norm(x, norm):
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def ref_heads_attention(q, k, v, heads):
    """Explicit per-head softmax(q k^T / sqrt(d)) v, one head at a time."""
    head_dim = q.shape[-1] // heads
    outputs = []
    for head in range(heads):
        part = slice(head * head_dim, (head + 1) * head_dim)
        scores = q[..., part] @ k[..., part].transpose(-1, -2) * head_dim**-0.5
        outputs.append(torch.softmax(scores, dim=-1) @ v[..., part])
    return torch.cat(outputs, dim=-1)


def ref_block_attention(block, x, kind):
    width = x.shape[-1]
    weight, bias = block.attn.in_proj_weight, block.attn.in_proj_bias
    q = x @ weight[:width].T + bias[:width]
    k = x @ weight[width : 2 * width].T + bias[width : 2 * width]
    v = x @ weight[2 * width :].T + bias[2 * width :]
    if kind == "vv":
        q, k = v, v
    out = ref_heads_attention(q, k, v, block.attn.num_heads)
    return out @ block.attn.out_proj.weight.T + block.attn.out_proj.bias


def ref_mlp(block, x):
    hidden = x @ block.mlp.c_fc.weight.T + block.mlp.c_fc.bias
    hidden = hidden * torch.sigmoid(1.702 * hidden)  # QuickGELU
    return hidden @ block.mlp.c_proj.weight.T + block.mlp.c_proj.bias


def ref_positions(table, native_side, grid):
    if grid == (native_side, native_side):
        return table
    patches = table[1:].reshape(1, native_side, native_side, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=grid, mode="bilinear", align_corners=False)
    return torch.cat([table[:1], patches.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)])


def reference_vit(model, images, depth):
    visual = model.visual
    patch = visual.conv1.weight.shape[-1]
    x = F.conv2d(images, visual.conv1.weight, stride=patch)
    batch, width, grid_h, grid_w = x.shape
    x = x.reshape(batch, width, grid_h * grid_w).permute(0, 2, 1)
    cls = visual.class_embedding + torch.zeros(batch, 1, width)
    x = torch.cat([cls, x], dim=1)
    side = round((visual.positional_embedding.shape[0] - 1) ** 0.5)
    x = x + ref_positions(visual.positional_embedding, side, (grid_h, grid_w))
    x = ref_layer_norm(x, visual.ln_pre)
    blocks = list(visual.transformer.resblocks)
    split = len(blocks) - depth
    for block in blocks[:split]:
        x = x + ref_block_attention(block, ref_layer_norm(x, block.ln_1), "qk")
        x = x + ref_mlp(block, ref_layer_norm(x, block.ln_2))
    original, surgery = x, x
    for block in blocks[split:]:
        normed = ref_layer_norm(original, block.ln_1)
        surgery = surgery + ref_block_attention(block, normed, "vv")
        original = original + ref_block_attention(block, normed, "qk")
        original = original + ref_mlp(block, ref_layer_norm(original, block.ln_2))
    tokens = torch.cat([original[:, :1], surgery[:, 1:]], dim=1) if depth else original
    return ref_layer_norm(tokens, visual.ln_post) @ visual.proj


def reference_resnet(model, images, surgery):
    visual = model.visual
    x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(images)))))
    batch, channels, grid_h, grid_w = x.shape
    tokens = x.reshape(batch, channels, grid_h * grid_w).permute(0, 2, 1)
    tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
    pool = visual.attnpool
    side = round((pool.positional_embedding.shape[0] - 1) ** 0.5)
    tokens = tokens + ref_positions(pool.positional_embedding, side, (grid_h, grid_w))
    q = tokens @ pool.q_proj.weight.T + pool.q_proj.bias
    k = tokens @ pool.k_proj.weight.T + pool.k_proj.bias
    v = tokens @ pool.v_proj.weight.T + pool.v_proj.bias
    plain = ref_heads_attention(q, k, v, pool.num_heads) @ pool.c_proj.weight.T + pool.c_proj.bias
    if not surgery:
        return plain
    value = ref_heads_attention(v, v, v, pool.num_heads) @ pool.c_proj.weight.T
    value = value + pool.c_proj.bias
    return torch.cat([plain[:, :1], value[:, 1:]], dim=1)


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("depth", [6, 0, 8, 1])
def test_vit_matches_reference(vit_model, size, depth):
    images = random_images(2, *size)
    tokens = clip_surgery.wrap(vit_model).encode_image(images, depth=depth)
    with torch.no_grad():
        expected = reference_vit(vit_model, images, depth)
    grid = (size[0] // 16) * (size[1] // 16)
    assert tokens.shape == (2, 1 + grid, 64)
    assert relative_error(tokens, expected) < TOLERANCE


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("surgery", [True, False])
def test_resnet_matches_reference(resnet_model, size, surgery):
    images = random_images(2, *size)
    tokens = clip_surgery.wrap(resnet_model).encode_image(images, surgery=surgery)
    with torch.no_grad():
        expected = reference_resnet(resnet_model, images, surgery)
    assert tokens.shape == (2, 1 + (size[0] // 32) * (size[1] // 32), 64)
    assert relative_error(tokens, expected) < TOLERANCE


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_plain_and_surgery_cls_equal_open_clip(vit_model, resnet_model, family):
    model = vit_model if family == "vit" else resnet_model
    images = random_images(2, 224, 224)
    with torch.no_grad():
        expected = model.encode_image(images)
    wrapped = clip_surgery.wrap(model)
    assert relative_error(wrapped.encode_image(images, surgery=False)[:, 0], expected) < TOLERANCE
    assert relative_error(wrapped.encode_image(images, surgery=True)[:, 0], expected) < TOLERANCE


def test_surgery_changes_patch_tokens(vit_model):
    images = random_images(1, 224, 224)
    wrapped = clip_surgery.wrap(vit_model)
    plain = wrapped.encode_image(images, surgery=False)
    surgery = wrapped.encode_image(images, surgery=True)
    assert (plain[:, 1:] - surgery[:, 1:]).abs().max() > 1e-2


def test_batch_items_are_independent(vit_model):
    images = random_images(3, 224, 224)
    wrapped = clip_surgery.wrap(vit_model)
    together = wrapped.encode_image(images)
    alone = torch.cat([wrapped.encode_image(images[i : i + 1]) for i in range(3)])
    assert relative_error(together, alone) < 1e-5


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_resolution_order_and_parameters_untouched(vit_model, resnet_model, family):
    model = vit_model if family == "vit" else resnet_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = clip_surgery.wrap(copy.deepcopy(model))
    small, large = random_images(2, 224, 224, seed=1), random_images(2, 448, 448, seed=2)
    wrapped = clip_surgery.wrap(model)
    wrapped.encode_image(large)
    wrapped.encode_image(random_images(1, 224, 320), surgery=False)
    after_large = wrapped.encode_image(small)
    assert torch.equal(after_large, fresh.encode_image(small))
    assert torch.equal(
        wrapped.encode_image(small, surgery=False), fresh.encode_image(small, surgery=False)
    )
    wrapped.encode_text(["a cat"])
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key


def test_training_mode_flags_restored_and_stats_untouched():
    model = make_resnet(3).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clip_surgery.wrap(model).encode_image(random_images(2, 224, 224))
    assert model.training and model.visual.layer1.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_depth_out_of_range(vit_model):
    with pytest.raises(OptionError, match="depth"):
        clip_surgery.wrap(vit_model).encode_image(random_images(1, 224, 224), depth=9)


def test_bad_image_tensors(vit_model):
    wrapped = clip_surgery.wrap(vit_model)
    with pytest.raises(ImageError, match="smaller"):
        wrapped.encode_image(random_images(1, 8, 8))
    with pytest.raises(ImageError, match="B, 3, H, W"):
        wrapped.encode_image(torch.zeros(1, 4, 224, 224))
    with pytest.raises(ImageError, match="floats"):
        wrapped.encode_image(torch.zeros(1, 3, 224, 224, dtype=torch.uint8))


def test_unsupported_tower():
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    model.visual = torch.nn.Linear(3, 3)
    with pytest.raises(ModelError, match="unsupported visual tower"):
        clip_surgery.wrap(model)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ViT-B-16", "RN50"])
def test_real_architectures_match_reference(name):
    model = perturb(open_clip.create_model(name, pretrained=None, force_quick_gelu=True), 7)
    wrapped = clip_surgery.wrap(model)
    for size in [(224, 224), (448, 448)]:
        images = random_images(1, *size, seed=5)
        tokens = wrapped.encode_image(images)
        with torch.no_grad():
            if name == "RN50":
                expected = reference_resnet(model, images, surgery=True)
            else:
                expected = reference_vit(model, images, depth=6)
            plain_cls = model.encode_image(images) if size == (224, 224) else None
        assert relative_error(tokens, expected) < TOLERANCE
        if plain_cls is not None:
            cls = wrapped.encode_image(images, surgery=False)[:, 0]
            assert relative_error(cls, plain_cls) < TOLERANCE
