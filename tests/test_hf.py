"""Hugging Face transformers CLIP: every method equals the same weights in open_clip; loading
from objects, save_pretrained folders and the hub cache; clear errors."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers  # noqa: E402  (the dev extra installs it; a missing one must fail)
from conftest import random_images, relative_error
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from open_clip.tokenizer import SimpleTokenizer

import clip_surgery
from clip_surgery import ModelError, WeightsUnavailableError, methods

TOLERANCE = 1e-5
TEXTS = ["a cat", "a dog", "a tree"]
WIDTH, LAYERS, EMBED = 128, 8, 64


def make_hf(seed: int = 0):
    """A random test-sized CLIPModel (64-wide heads, QuickGELU), every bias and norm perturbed."""
    torch.manual_seed(seed)
    config = transformers.CLIPConfig(
        text_config=dict(
            hidden_size=WIDTH,
            intermediate_size=2 * WIDTH,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            vocab_size=49408,
        ),
        vision_config=dict(
            hidden_size=WIDTH,
            intermediate_size=2 * WIDTH,
            num_hidden_layers=LAYERS,
            num_attention_heads=2,
            image_size=224,
            patch_size=16,
        ),
        projection_dim=EMBED,
    )
    model = transformers.CLIPModel(config).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # weights at the scale of a trained CLIP, not HF's 0.02 init
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "embedding" not in name:
                fan_in = param[0].numel()
                param.normal_(0, fan_in**-0.5, generator=generator)
            if name.endswith("bias") or "norm" in name or "layrnorm" in name:
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
            if "embedding" in name and "patch" not in name:  # texts must not collapse together
                param.normal_(0, 0.5, generator=generator)
        model.logit_scale.fill_(3.0)
    return model


def to_open_clip(hf) -> CLIP:
    """The same weights in an open_clip CLIP, converted here key by key."""
    vision = CLIPVisionCfg(
        layers=LAYERS, width=WIDTH, head_width=64, mlp_ratio=2, patch_size=16, image_size=224
    )
    text = CLIPTextCfg(
        context_length=77, vocab_size=49408, width=WIDTH, heads=2, layers=2, mlp_ratio=2
    )
    model = CLIP(EMBED, vision, text, quick_gelu=True)
    sd = hf.state_dict()
    out = {"logit_scale": sd["logit_scale"]}

    def block(prefix_out, prefix_in):
        q, k, v = (sd[f"{prefix_in}.self_attn.{n}_proj.weight"] for n in "qkv")
        out[f"{prefix_out}.attn.in_proj_weight"] = torch.cat([q, k, v])
        out[f"{prefix_out}.attn.in_proj_bias"] = torch.cat(
            [sd[f"{prefix_in}.self_attn.{n}_proj.bias"] for n in "qkv"]
        )
        pairs = {
            "attn.out_proj": "self_attn.out_proj",
            "ln_1": "layer_norm1",
            "ln_2": "layer_norm2",
            "mlp.c_fc": "mlp.fc1",
            "mlp.c_proj": "mlp.fc2",
        }
        for ours, theirs in pairs.items():
            for kind in ("weight", "bias"):
                out[f"{prefix_out}.{ours}.{kind}"] = sd[f"{prefix_in}.{theirs}.{kind}"]

    v = "vision_model"
    out["visual.conv1.weight"] = sd[f"{v}.embeddings.patch_embedding.weight"]
    out["visual.class_embedding"] = sd[f"{v}.embeddings.class_embedding"]
    out["visual.positional_embedding"] = sd[f"{v}.embeddings.position_embedding.weight"]
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for kind in ("weight", "bias"):
            out[f"visual.{ours}.{kind}"] = sd[f"{v}.{theirs}.{kind}"]
    out["visual.proj"] = sd["visual_projection.weight"].T
    for i in range(LAYERS):
        block(f"visual.transformer.resblocks.{i}", f"{v}.encoder.layers.{i}")
    t = "text_model"
    out["token_embedding.weight"] = sd[f"{t}.embeddings.token_embedding.weight"]
    out["positional_embedding"] = sd[f"{t}.embeddings.position_embedding.weight"]
    for kind in ("weight", "bias"):
        out[f"ln_final.{kind}"] = sd[f"{t}.final_layer_norm.{kind}"]
    out["text_projection"] = sd["text_projection.weight"].T
    for i in range(2):
        block(f"transformer.resblocks.{i}", f"{t}.encoder.layers.{i}")
    missing, unexpected = model.load_state_dict(out, strict=False)
    assert not unexpected and set(missing) <= {"attn_mask"}, (missing, unexpected)
    return model.eval()


@pytest.fixture(scope="module")
def hf_model():
    return make_hf(3)


@pytest.fixture(scope="module")
def pair(hf_model):
    return clip_surgery.wrap(hf_model), clip_surgery.wrap(to_open_clip(hf_model))


@pytest.mark.parametrize("size", [(224, 224), (224, 288)])
@pytest.mark.parametrize("name", methods.names())
def test_every_method_equals_open_clip(pair, name, size):
    hf, reference = pair
    assert hf.family == "transformers CLIP" and reference.family == "open_clip ViT"
    images = random_images(2, *size, seed=11)
    ours = hf.explain(images, TEXTS, method=name, templates=None)
    theirs = reference.explain(images, TEXTS, method=name, templates=None)
    assert ours.grid == theirs.grid == (size[0] // 16, size[1] // 16)
    for field in ("similarity", "maps", "cosine"):
        tolerance = TOLERANCE * (map_gain(theirs.similarity) if field == "maps" else 1)
        assert relative_error(getattr(ours, field), getattr(theirs, field)) <= tolerance, field


def map_gain(similarity: torch.Tensor) -> float:
    """How much min-max maps magnify the similarity's rounding: max |s| over the smallest
    per-map range (nearly flat maps, e.g. SC-CLIP's on random weights, magnify it most)."""
    spread = (similarity.amax(dim=1) - similarity.amin(dim=1)).min()
    return max(1.0, float(similarity.abs().max() / spread))


def test_plain_embeddings_equal_transformers(hf_model, pair):
    hf, _ = pair
    images = random_images(2, 224, 224, seed=12)
    with torch.no_grad():
        expected = hf_model.get_image_features(pixel_values=images)
        expected = getattr(expected, "pooler_output", expected)
    assert relative_error(hf.encode_image(images, surgery=False)[:, 0], expected) <= TOLERANCE
    tokens = SimpleTokenizer()(TEXTS)
    with torch.no_grad():
        text = hf_model.get_text_features(input_ids=tokens)
        text = F.normalize(getattr(text, "pooler_output", text), dim=-1)
    assert relative_error(hf.encode_text(TEXTS, templates=None), text) <= TOLERANCE


def test_model_untouched_and_flags_kept(hf_model, pair):
    hf, _ = pair
    before = {k: v.clone() for k, v in hf_model.state_dict().items()}
    flags = [p.requires_grad for p in hf_model.parameters()]
    hf.explain(random_images(1, 320, 224), ["x"], method="chefer", templates=None)
    hf.explain(random_images(1, 224, 224), ["x", "y"], templates=None)
    for key, value in hf_model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert flags == [p.requires_grad for p in hf_model.parameters()]
    assert all(p.grad is None for p in hf_model.parameters())


def write_tokenizer(folder) -> None:
    """CLIP's BPE vocabulary written as transformers tokenizer files."""
    simple = SimpleTokenizer()
    names = {simple.sot_token_id: "<|startoftext|>", simple.eot_token_id: "<|endoftext|>"}
    vocab = {names.get(index, token): index for token, index in simple.encoder.items()}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    ranked = sorted(simple.bpe_ranks.items(), key=lambda item: item[1])
    merges = "#version: 0.2\n" + "\n".join(f"{a} {b}" for (a, b), _ in ranked) + "\n"
    (folder / "merges.txt").write_text(merges, encoding="utf-8")
    tokenizer = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    tokenizer.save_pretrained(folder)


def test_save_pretrained_folder_equals_the_object(tmp_path, hf_model, pair):
    hf, _ = pair
    plain = tmp_path / "plain"
    hf_model.save_pretrained(plain)
    with_tokenizer = tmp_path / "with-tokenizer"
    hf_model.save_pretrained(with_tokenizer)
    write_tokenizer(with_tokenizer)
    images = random_images(1, 224, 288, seed=13)
    expected = hf.explain(images, TEXTS, single=True)
    for folder in (plain, with_tokenizer):
        loaded = clip_surgery.load(str(folder))
        assert loaded.family == "transformers CLIP"
        result = loaded.explain(images, TEXTS, single=True)
        assert relative_error(result.maps, expected.maps) <= TOLERANCE
        assert relative_error(result.cosine, expected.cosine) <= TOLERANCE
    loaded = clip_surgery.load(str(with_tokenizer))
    assert type(loaded.tokenizer).__module__.startswith("transformers.")
    prompts = ["a photo of a cat.", "there is the dog in the scene."]
    ids, expected_ids = loaded.backbone.text.tokenize(prompts), SimpleTokenizer()(prompts)
    content = expected_ids != 0  # padding differs (end token / 0); causal pooling ignores it
    assert ids.shape == expected_ids.shape and torch.equal(ids[content], expected_ids[content])


def fake_hub_cache(cache, repo: str, model) -> None:
    """The hub cache layout a download leaves (refs/main -> snapshots/<commit>/files)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = cache / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    model.save_pretrained(base / "snapshots" / commit)


def test_hub_name_loads_from_the_cache_offline(tmp_path, monkeypatch, hf_model, pair):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    fake_hub_cache(tmp_path, "testorg/tiny-clip", hf_model)
    loaded = clip_surgery.load("hf-hub:testorg/tiny-clip")
    assert loaded.name == "hf-hub:testorg/tiny-clip"
    images = random_images(1, 224, 224, seed=14)
    expected = pair[0].explain(images, TEXTS, method="gem", templates=None)
    result = loaded.explain(images, TEXTS, method="gem", templates=None)
    assert relative_error(result.similarity, expected.similarity) <= TOLERANCE


def test_hub_name_offline_without_cache_is_one_line(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsUnavailableError) as caught:
        clip_surgery.load("hf-hub:openai/clip-vit-base-patch16")
    message = str(caught.value)
    assert "\n" not in message and "hf download openai/clip-vit-base-patch16" in message
    assert "load('clip-vit-base-patch16')" in message


def test_not_clip_and_incomplete_folders(tmp_path):
    bert = transformers.BertModel(
        transformers.BertConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
        )
    )
    bert.save_pretrained(tmp_path / "bert")
    with pytest.raises(ModelError, match="transformers 'bert' model; clip-surgery runs CLIP"):
        clip_surgery.load(str(tmp_path / "bert"))
    with pytest.raises(ModelError, match="unsupported transformers model BertModel"):
        clip_surgery.wrap(bert)
    bare = tmp_path / "bare"
    bare.mkdir()
    make_hf(0).config.to_json_file(bare / "config.json")
    with pytest.raises(ModelError, match="has no weights"):
        clip_surgery.load(str(bare))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="without config.json"):
        clip_surgery.load(str(empty))


def test_missing_transformers_names_the_extra(tmp_path, monkeypatch, hf_model):
    hf_model.save_pretrained(tmp_path)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ModelError, match=r"pip install 'clip-surgery\[hf\]'"):
        clip_surgery.load(str(tmp_path))
