"""SigLIP, SigLIP 2 and EVA-CLIP: open_clip timm towers and transformers SiglipModel give the
libraries' own embeddings, every applicable method gives maps, the MAP head's dense path has a
known answer, EVA's rotary table follows the input size, and tokenizer errors are one line."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import random_images, relative_error
from open_clip.model import CustomTextCLIP

import clip_surgery
from clip_surgery import (
    ModelError,
    TextError,
    TokenizerUnavailableError,
    WeightsUnavailableError,
    backbones,
    cli,
    engine,
    methods,
)
from clip_surgery.loading import register_bundled_towers

TOLERANCE = 1e-5
TEXTS = ["a cat", "a red dog on the grass"]
NON_SQUARE = (160, 272)
OPEN_CLIP = {
    "ViT-B-16-SigLIP": "open_clip SigLIP",
    "ViT-B-16-SigLIP2": "open_clip SigLIP",
    "EVA02-B-16": "open_clip EVA",
}


def hashing_tokenizer(context: int, vocabulary: int, pad: int = 1):
    """A stand-in tokenizer (the real ones come from the hub): one id per word, then padding."""

    def tokenize(prompts: list[str]) -> torch.Tensor:
        ids = torch.full((len(prompts), context), pad, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            words = [sum(map(ord, word)) * 7919 % (vocabulary - 3) + 3 for word in prompt.split()]
            words = words[: context - 1]
            ids[row, : len(words)] = torch.tensor(words, dtype=torch.long)
        return ids

    return tokenize


def perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Randomise every bias, norm and layer-scale parameter and the MAP latent."""
    generator = torch.Generator().manual_seed(seed)
    names = ("bias", "norm", "ln_", "gamma", "latent", "probe")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(part in name for part in names):
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
    return model.eval()


def open_clip_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return perturb(open_clip.create_model(name, pretrained=None), 1)


def tokenizer_of(model) -> object:
    return hashing_tokenizer(model.context_length, model.text.vocab_size)


@pytest.fixture(scope="module", params=list(OPEN_CLIP))
def open_clip_pair(request):
    model = open_clip_model(request.param)
    return request.param, model, clip_surgery.wrap(model, tokenizer=tokenizer_of(model))


def make_hf_siglip(seed: int = 0) -> transformers.SiglipModel:
    """A test-sized SiglipModel, weights at a trained model's scale."""
    torch.manual_seed(seed)
    config = transformers.SiglipConfig(
        text_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            vocab_size=1000,
            max_position_embeddings=16,
            projection_size=128,
            pad_token_id=1,
            bos_token_id=None,
            eos_token_id=1,
        ),
        vision_config=dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=8,
            num_attention_heads=2,
            image_size=224,
            patch_size=16,
        ),
    )
    model = transformers.SiglipModel(config).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "embedding" not in name:
                param.normal_(0, param[0].numel() ** -0.5, generator=generator)
            if name.endswith("bias") or "norm" in name or "probe" in name:
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
            if "embedding" in name and "patch" not in name:
                param.normal_(0, 0.5, generator=generator)
    return model


@pytest.fixture(scope="module")
def hf_siglip():
    model = make_hf_siglip(3)
    return model, clip_surgery.wrap(model, tokenizer=hashing_tokenizer(16, 1000))


def applicable(wrapped) -> list[str]:
    family = backbones.capabilities(wrapped.backbone)
    return [name for name in methods.names() if methods.get(name).supports(family)]


def assert_maps(result, size) -> None:
    assert result.maps.shape == (1, len(TEXTS), *size)
    assert torch.isfinite(result.maps).all() and torch.isfinite(result.similarity).all()
    assert result.maps.min() >= 0 and result.maps.max() <= 1


# ---------------------------------------------------------------- open_clip SigLIP and EVA


def test_plain_embeddings_equal_open_clip(open_clip_pair):
    name, model, wrapped = open_clip_pair
    assert wrapped.family == OPEN_CLIP[name]
    images = random_images(2, 224, 224, seed=1)
    with torch.no_grad():
        image = model.encode_image(images)
        text = F.normalize(model.encode_text(tokenizer_of(model)(TEXTS)), dim=-1)
    assert relative_error(wrapped.encode(images, "raw").pooled, image) <= TOLERANCE
    assert relative_error(wrapped.encode_text(TEXTS, templates=None), text) <= TOLERANCE


def test_every_applicable_method_gives_maps(open_clip_pair):
    name, model, wrapped = open_clip_pair
    before = {key: value.clone() for key, value in model.state_dict().items()}
    names = applicable(wrapped)
    cls_only = {"chefer", "scclip", "legrad"}  # read a CLS token: not on MAP-head towers
    plain_positions = {"resclip", "scclip"}  # compute q/k themselves: not with rotary ones
    expected = set(methods.names()) - (cls_only if "SigLIP" in name else plain_positions)
    assert set(names) == expected
    for method in names:
        for size in ((224, 224), NON_SQUARE):
            images = random_images(1, *size, seed=2)
            result = wrapped.explain(images, TEXTS, method=method, templates=None)
            assert result.grid == (size[0] // 16, size[1] // 16), method
            assert_maps(result, size)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in model.parameters())


def test_chefer_names_the_families_it_supports(open_clip_pair):
    name, _, wrapped = open_clip_pair
    if "SigLIP" not in name:
        pytest.skip("EVA pools from its CLS token: Chefer applies")
    with pytest.raises(ModelError) as caught:
        wrapped.explain(random_images(1, 224, 224), TEXTS, method="chefer", templates=None)
    message = str(caught.value)
    assert "\n" not in message and "this model is open_clip SigLIP" in message
    assert "open_clip ViT, transformers CLIP, open_clip EVA" in message


def test_text_token_features_pool_to_the_embedding(open_clip_pair):
    _, model, wrapped = open_clip_pair
    tower = wrapped.backbone.text
    tokens = tower.tokenize(TEXTS)
    with torch.no_grad():
        features = tower.token_features(tokens)
        embedding = model.encode_text(tokens)
    text = model.text
    index = -1 if text.pool_type == "last" else tokens.argmax(dim=-1)
    pooled = features[:, -1] if text.pool_type == "last" else features[torch.arange(2), index]
    assert relative_error(pooled, embedding) <= TOLERANCE


def test_eva_any_size_equals_timm_with_its_table_for_that_size():
    model = open_clip_model("EVA02-B-16")
    wrapped = clip_surgery.wrap(model)  # CLIP's vocabulary: CLIP's BPE by default
    trunk = model.visual.trunk
    native_rope = trunk.rope.get_embed().clone()
    resized = copy.deepcopy(model.visual)
    resized.set_input_size(NON_SQUARE)  # timm's own pos-embed resampling and rotary table
    assert tuple(resized.trunk.rope.feat_shape) == (10, 17)
    images = random_images(2, *NON_SQUARE, seed=3)
    plan = engine.Plan(positions="bicubic-antialias")  # timm's resampling of the abs positions
    with torch.no_grad():
        expected = resized(images)
        ours = engine.run(wrapped.backbone.vision, images, plan).pooled
    assert relative_error(ours, expected) <= TOLERANCE
    assert torch.equal(trunk.rope.get_embed(), native_rope)  # the user's table is untouched
    assert tuple(trunk.rope.feat_shape) == (14, 14)


def test_map_dense_path_known_answer(open_clip_pair, hf_siglip):
    name, _, wrapped = open_clip_pair
    if "SigLIP" not in name:
        pytest.skip("EVA has a CLS head")
    for tower in (wrapped.backbone.vision, hf_siglip[1].backbone.vision):
        width = tower.embed(random_images(1, 32, 48), "bilinear")[0].shape[-1]
        token = torch.randn(2, 1, width, generator=torch.Generator().manual_seed(4))
        varied = torch.randn(2, 12, width, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            for tokens, equal in ((token.expand(2, 12, width), True), (varied, False)):
                pooled = tower.head.pool(tokens, (3, 4), "bilinear")
                dense = tower.head.dense(tokens, (3, 4), "bilinear", None)
                assert dense.shape == (2, 12, pooled.shape[-1])
                error = relative_error(dense, pooled[:, None].expand_as(dense))
                assert error <= TOLERANCE if equal else error > 1e-3


def test_wrap_without_a_tokenizer_is_one_clear_error():
    model = open_clip_model("ViT-B-16-SigLIP")
    with pytest.raises(ModelError) as caught:
        clip_surgery.wrap(model)
    message = str(caught.value)
    assert "\n" not in message and "32000-token vocabulary" in message
    assert "tokenizer=" in message


def test_loading_siglip_offline_says_what_is_missing(tmp_path):
    with pytest.raises(WeightsUnavailableError) as caught:
        clip_surgery.load("ViT-B-16-SigLIP", pretrained="webli")
    message = str(caught.value)
    assert "\n" not in message and "hf download timm/ViT-B-16-SigLIP --local-dir" in message
    weights = tmp_path / "siglip.safetensors"
    weights.write_bytes(b"not read: the tokenizer is resolved first")
    with pytest.raises(TokenizerUnavailableError) as caught:
        clip_surgery.load("ViT-B-16-SigLIP", pretrained=str(weights))
    message = str(caught.value)
    assert "\n" not in message and "hf download timm/ViT-B-16-SigLIP`" in message
    assert "tokenizer=CALLABLE" in message
    with pytest.raises(clip_surgery.InputFileError, match="cannot read checkpoint"):  # got past it
        clip_surgery.load("ViT-B-16-SigLIP", pretrained=str(weights), tokenizer=str.split)


@pytest.mark.parametrize(
    "embed, trunk, pool, proj, family, prefix",
    [
        (192, "eva02_tiny_patch14_224", "map", "none", "open_clip SigLIP", 1),  # MAP sees the CLS
        (64, "vit_small_patch14_reg4_dinov2", "token", "linear", "open_clip EVA", 5),  # registers
        (64, "tiny_synth_reg_vit", "token", "linear", "open_clip EVA", 5),  # conv stem, registers
        (64, "tiny_synth_map_vit", "map", "linear", "open_clip SigLIP", 0),  # conv stem, MAP head
        (64, "tiny_synth_reg3_vit", "token", "linear", "open_clip EVA", 5),  # 3 blocks, registers
    ],
)
def test_other_timm_towers(embed, trunk, pool, proj, family, prefix):
    register_bundled_towers()
    torch.manual_seed(0)
    size = 64 if trunk.startswith("tiny") else 224
    vision = dict(timm_model_name=trunk, timm_pool=pool, timm_proj=proj, image_size=size)
    text = dict(width=64, heads=1, layers=1, context_length=16, vocab_size=1000)
    model = perturb(CustomTextCLIP(embed, vision, text), 1)
    wrapped = clip_surgery.wrap(model, tokenizer=hashing_tokenizer(16, 1000))
    assert wrapped.family == family and wrapped.backbone.vision.prefix == prefix
    images = random_images(1, *wrapped.backbone.vision.native_size, seed=8)
    with torch.no_grad():
        expected = model.encode_image(images)
    assert relative_error(wrapped.encode(images, "raw").pooled, expected) <= TOLERANCE
    for method in applicable(wrapped):
        options = {"depth": 3} if method in ("clip_surgery", "gem") else {}
        size = (140, 252)
        result = wrapped.explain(random_images(1, *size), TEXTS, method=method, **options)
        assert_maps(result, size)


def test_a_config_naming_a_bundled_tower_loads_in_a_fresh_process(tmp_path):
    """A candidate's config that names one of our timm towers (``tiny_synth_map_vit``) loads with
    its weights through ``clip_surgery.load`` without registering the towers first."""
    from safetensors.torch import save_file

    register_bundled_towers()
    config = json.loads(
        (Path(clip_surgery.__file__).parent / "data/models/tiny-synth-siglip.json").read_text()
    )
    config["vision_cfg"]["timm_model_name"] = "tiny_synth_map_vit"
    path = tmp_path / "tiny-synth-map-test.json"
    path.write_text(json.dumps(config))
    weights = str(tmp_path / "w.safetensors")
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    model = perturb(open_clip.create_model("tiny-synth-map-test"), 1)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "w.safetensors"
    )
    images = random_images(1, 64, 64, seed=3)
    with torch.no_grad():
        expected = model.eval().encode_image(images)
    torch.save(images, tmp_path / "images.pt")
    code = (
        "import sys, torch, open_clip, clip_surgery\n"
        f"open_clip.add_model_config({str(path)!r})\n"
        f"m = clip_surgery.load('tiny-synth-map-test', pretrained={weights!r})\n"
        f"images = torch.load({str(tmp_path / 'images.pt')!r})\n"
        "print(m.family); torch.save(m.encode(images, 'raw').pooled, sys.argv[1])"
    )
    out = tmp_path / "pooled.pt"
    result = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "open_clip SigLIP"
    assert relative_error(torch.load(out), expected) <= TOLERANCE


# ---------------------------------------------------------------- transformers SiglipModel


def test_hf_siglip_plain_embeddings_equal_transformers(hf_siglip):
    model, wrapped = hf_siglip
    assert wrapped.family == "transformers SigLIP"
    assert wrapped.normalization == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    images = random_images(2, 224, 224, seed=5)
    tokens = hashing_tokenizer(16, 1000)(TEXTS)
    with torch.no_grad():
        image = model.get_image_features(pixel_values=images)
        image = getattr(image, "pooler_output", image)
        text = model.get_text_features(input_ids=tokens)
        text = F.normalize(getattr(text, "pooler_output", text), dim=-1)
    assert relative_error(wrapped.encode(images, "raw").pooled, image) <= TOLERANCE
    assert relative_error(wrapped.encode_text(TEXTS, templates=None), text) <= TOLERANCE
    with torch.no_grad():
        features = wrapped.backbone.text.token_features(tokens)
    assert relative_error(F.normalize(features[:, -1], dim=-1), text) <= TOLERANCE


@pytest.mark.parametrize("size", [(224, 224), NON_SQUARE])
def test_hf_siglip_every_applicable_method_gives_maps(hf_siglip, size):
    _, wrapped = hf_siglip
    names = applicable(wrapped)
    assert names == [n for n in methods.names() if n not in ("chefer", "scclip", "legrad")]
    for method in names:
        result = wrapped.explain(random_images(1, *size, seed=6), TEXTS, method=method)
        assert_maps(result, size)


def test_hf_siglip_tokenizers_and_folders(tmp_path, hf_siglip):
    model, wrapped = hf_siglip
    with pytest.raises(ModelError, match="needs its own tokenizer"):
        clip_surgery.wrap(model)
    model.save_pretrained(tmp_path / "siglip")
    with pytest.raises(TokenizerUnavailableError) as caught:
        clip_surgery.load(str(tmp_path / "siglip"))
    assert "\n" not in str(caught.value) and "tokenizer=CALLABLE" in str(caught.value)
    loaded = clip_surgery.load(str(tmp_path / "siglip"), tokenizer=hashing_tokenizer(16, 1000))
    images = random_images(1, 224, 224, seed=7)
    expected = wrapped.explain(images, TEXTS, templates=None)
    result = loaded.explain(images, TEXTS, templates=None)
    assert loaded.family == "transformers SigLIP"
    assert relative_error(result.maps, expected.maps) <= TOLERANCE
    siglip2 = tmp_path / "siglip2"
    siglip2.mkdir()
    (siglip2 / "config.json").write_text('{"model_type": "siglip2"}')
    with pytest.raises(ModelError, match="'siglip2' model; clip-surgery runs CLIP and SigLIP"):
        clip_surgery.load(str(siglip2))


def test_callable_tokenizer_output_is_checked(hf_siglip):
    model, _ = hf_siglip
    cases = [
        (lambda prompts: torch.ones(len(prompts), 17, dtype=torch.long), "context holds 16"),
        (lambda prompts: torch.ones(len(prompts), 16), "integer token ids"),
        (lambda prompts: "ids", "not token ids"),
    ]
    for tokenizer, match in cases:
        wrapped = clip_surgery.wrap(model, tokenizer=tokenizer)
        with pytest.raises(TextError, match=match):
            wrapped.encode_text(TEXTS, templates=None)
    lists = clip_surgery.wrap(model, tokenizer=lambda prompts: [[5, 6, 1]] * len(prompts))
    assert lists.encode_text(TEXTS, templates=None).shape == (2, 128)
    with pytest.raises(TextError, match="cannot count a word's tokens"):
        lists.backbone.text.pieces("cat")


# ---------------------------------------------------------------- the matrix and imports


def test_families_match_what_the_adapters_offer(open_clip_pair, hf_siglip, capsys):
    for wrapped in (open_clip_pair[2], hf_siglip[1]):
        assert backbones.capabilities(wrapped.backbone) == backbones.family(wrapped.family)
    assert cli.main(["backbones"]) == 0
    table = capsys.readouterr().out
    for name in ("open_clip SigLIP", "open_clip EVA", "transformers SigLIP"):
        assert name in table


def test_import_does_not_load_timm_or_transformers():
    code = (
        "import sys, clip_surgery; print([m for m in ('timm', 'transformers') if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_conv_stem_downsamples_like_its_patch_size():
    from clip_surgery.stem import ConvStem, ConvStemEmbed

    stem = ConvStem(48)
    assert stem(torch.zeros(2, 3, 64, 47)).shape == (2, 48, 8, 5) and stem.stride == 8
    with pytest.raises(ValueError, match="stride 8"):
        ConvStemEmbed(img_size=64, patch_size=16, embed_dim=48)
