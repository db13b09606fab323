"""Every weights format round-trips; loading errors are clear."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from conftest import EMBED_DIM, TEXT_CFG, make_resnet, make_vit, random_images, relative_error
from open_clip.transformer import QuickGELU
from safetensors.torch import save_file

import clip_surgery
from clip_surgery import InputFileError, ModelError, WeightsUnavailableError
from clip_surgery.models import infer_config, read_state_dict

TEXTS = ["a red cube", "a photo of a dog"]


def outputs(model: torch.nn.Module, images: torch.Tensor):
    """Plain image tokens (via the wrapper) and open_clip text embeddings of TEXTS."""
    wrapped = clip_surgery.wrap(model)
    tokens = open_clip.get_tokenizer("ViT-B-16")(TEXTS)
    with torch.no_grad():
        text = model.encode_text(tokens)
    return wrapped.encode_image(images), text


def assert_same_model(loaded: clip_surgery.SurgeryModel, original: torch.nn.Module, size=224):
    images = random_images(2, size, size, seed=4)
    got_image, got_text = outputs(loaded.clip, images)
    want_image, want_text = outputs(original, images)
    assert relative_error(got_image, want_image) < 1e-5
    assert relative_error(got_text, want_text) < 1e-5
    assert isinstance(loaded.clip.visual, type(original.visual))


@pytest.fixture(scope="module")
def vit():
    return make_vit(21)


@pytest.fixture(scope="module")
def resnet():
    return make_resnet(22)


def test_openai_torchscript_round_trip(tmp_path, vit):
    traced = torch.jit.trace_module(
        vit,
        {
            "encode_image": (random_images(1, 224, 224),),
            "encode_text": (torch.zeros(1, 77, dtype=torch.long),),
        },
        check_trace=False,
    )
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.save(traced, str(path))
    assert read_state_dict(path)[1] == "torchscript"
    loaded = clip_surgery.load(str(path))
    assert_same_model(loaded, vit)
    assert isinstance(loaded.clip.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)


def test_openai_fp16_state_dict_with_extra_keys(tmp_path, vit):
    state = {k: v.half() for k, v in vit.state_dict().items()}
    state.update(
        input_resolution=torch.tensor(224),
        context_length=torch.tensor(77),
        vocab_size=torch.tensor(49408),
    )
    path = tmp_path / "openai-style.pt"
    torch.save(state, path)
    loaded = clip_surgery.load(path)
    rounded = make_vit(21)
    rounded.load_state_dict({k: v.half().float() for k, v in vit.state_dict().items()})
    assert_same_model(loaded, rounded)
    assert next(loaded.clip.parameters()).dtype == torch.float32


@pytest.mark.parametrize("suffix", [".bin", ".pt"])
def test_plain_state_dict(tmp_path, vit, suffix):
    path = tmp_path / f"weights{suffix}"
    torch.save(vit.state_dict(), path)
    with pytest.raises(ModelError, match="cannot tell from .* QuickGELU .* or GELU"):
        clip_surgery.load(str(path))  # the activation is not in a plain state dict
    assert_same_model(clip_surgery.load(str(path), quick_gelu=True), vit)


def test_open_clip_training_checkpoint(tmp_path, vit):
    state = {f"module.{k}": v for k, v in vit.state_dict().items()}
    path = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "name": "run", "state_dict": state}, path)
    assert_same_model(clip_surgery.load(path, quick_gelu=True), vit)


def test_safetensors(tmp_path, resnet):
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in resnet.state_dict().items()}, str(path))
    loaded = clip_surgery.load(path, quick_gelu=True)
    assert_same_model(loaded, resnet)
    assert not loaded.is_vit


def test_resnet_inferred_at_other_size(tmp_path, resnet):
    path = tmp_path / "rn.bin"
    torch.save(resnet.state_dict(), path)
    assert_same_model(clip_surgery.load(path, quick_gelu=True), resnet, size=288)


def test_named_model_with_file(tmp_path, vit):
    config = {
        "embed_dim": EMBED_DIM,
        "quick_gelu": True,
        "vision_cfg": {"layers": 8, "width": 128, "patch_size": 16, "image_size": 224},
        "text_cfg": TEXT_CFG,
    }
    (tmp_path / "tiny-test-vit.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "tiny-test-vit.json")
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    loaded = clip_surgery.load("tiny-test-vit", pretrained=str(path))
    assert loaded.name == "tiny-test-vit/tiny.safetensors"
    assert_same_model(loaded, vit)
    resnet_file = tmp_path / "rn.pt"
    torch.save(make_resnet(1).state_dict(), resnet_file)
    with pytest.raises(ModelError, match="does not match tiny-test-vit"):
        clip_surgery.load("tiny-test-vit", pretrained=str(resnet_file))


def test_inferred_config_fields(vit, resnet):
    vision = infer_config(vit.state_dict())["vision_cfg"]
    assert (vision.layers, vision.width, vision.patch_size, vision.image_size) == (8, 128, 16, 224)
    config = infer_config(resnet.state_dict())
    assert config["vision_cfg"].layers == (1, 1, 1, 1) and config["vision_cfg"].width == 32
    assert config["text_cfg"].layers == 2 and config["embed_dim"] == EMBED_DIM


def test_weights_hash_depends_on_file(tmp_path, vit, resnet):
    torch.save(vit.state_dict(), tmp_path / "a.pt")
    torch.save(resnet.state_dict(), tmp_path / "b.pt")
    first = clip_surgery.load(tmp_path / "a.pt", quick_gelu=True).weights_hash
    assert first == clip_surgery.load(tmp_path / "a.pt", quick_gelu=True).weights_hash
    assert first != clip_surgery.load(tmp_path / "b.pt", quick_gelu=True).weights_hash
    assert len(first) == 16


# ------------------------------------------------------------------ errors


def test_missing_file(tmp_path):
    with pytest.raises(InputFileError, match="checkpoint not found"):
        clip_surgery.load(str(tmp_path / "ViT-B-16.pt"))
    with pytest.raises(InputFileError, match="checkpoint not found"):
        clip_surgery.load("ViT-B-16", pretrained=str(tmp_path / "nothing.bin"))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".bin"])
def test_corrupt_file(tmp_path, suffix):
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(InputFileError, match="cannot read checkpoint"):
        clip_surgery.load(path)


def test_not_a_clip_state_dict(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"layer.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ModelError, match="cannot infer"):
        clip_surgery.load(path)
    torch.save({"vision_model.embeddings.patch_embedding.weight": torch.zeros(2)}, path)
    with pytest.raises(ModelError, match="Hugging Face"):
        clip_surgery.load(path)


def test_unknown_model_and_tag():
    with pytest.raises(ModelError, match="unknown model 'ViT-B-61'.*ViT-B-16"):
        clip_surgery.load("ViT-B-61")
    with pytest.raises(ModelError, match="unknown pretrained tag"):
        clip_surgery.load("ViT-B-16", pretrained="not-a-tag")


@pytest.mark.parametrize("name, filename", [("ViT-B/16", "ViT-B-16.pt"), ("RN50", "RN50.pt")])
def test_offline_without_weights_names_the_file(name, filename):
    with pytest.raises(WeightsUnavailableError, match=f"--checkpoint {filename}"):
        clip_surgery.load(name)


@pytest.mark.parametrize(
    "name, tag, quick",
    [("ViT-B/16", None, True), ("RN50", "openai", True), ("ViT-B-16", "laion2b_s34b_b88k", False)],
)
def test_pretrained_tags_choose_the_activation(monkeypatch, vit, name, tag, quick):
    calls = []

    def fake_create_model(model_name, **kwargs):
        calls.append((model_name, kwargs))
        return vit

    monkeypatch.setattr(open_clip, "create_model", fake_create_model)
    loaded = clip_surgery.load(name, tag)
    model_name, kwargs = calls[0]
    assert model_name == name.replace("/", "-")
    assert kwargs["pretrained"] == (tag or "openai") and kwargs["force_quick_gelu"] is quick
    assert loaded.name == f"{model_name}/{tag or 'openai'}"


@pytest.mark.parametrize("mixing", [0, 2])
def test_a_vit_with_a_conv_stem_loads_from_its_file(tmp_path, mixing):
    """Weights whose ``visual.conv1`` is a ``ConvStem`` (tiny-synth's; with or without residual
    stride-1 convolutions) get that stem on load, and the loaded model gives the saved model's
    image embedding."""
    from conftest import perturb

    from clip_surgery.stem import ConvStem

    config = {
        "embed_dim": EMBED_DIM,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 8},
        "text_cfg": TEXT_CFG,
    }
    (tmp_path / "stem-test-vit.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "stem-test-vit.json")
    torch.manual_seed(0)
    model = open_clip.create_model("stem-test-vit")
    model.visual.conv1 = ConvStem(64, (8, 16, 24), mixing)
    model = perturb(model, 3).eval()
    save_file(model.state_dict(), str(tmp_path / "weights.safetensors"))
    loaded = clip_surgery.load("stem-test-vit", pretrained=str(tmp_path / "weights.safetensors"))
    stem = loaded.backbone.vision.visual.conv1
    assert isinstance(stem, ConvStem) and len(stem) == len(model.visual.conv1)
    images = random_images(2, 64, 64, seed=4)
    with torch.no_grad():
        expected = model.encode_image(images)
    assert relative_error(loaded.encode(images, "raw").pooled, expected) <= 1e-5
    assert loaded.explain(random_images(1, 60, 44), ["a", "b"], depth=2).grid == (7, 5)


def test_an_average_pooled_vit_gives_its_own_embedding_and_maps():
    """open_clip's ``pool_type="avg"`` ViT: the raw embedding is ``encode_image``'s, the raw
    embedding is the mean of the raw dense features, and every applicable method gives [0, 1]
    maps; ``final_ln_after_pool`` (norm after the pool) is refused."""
    from conftest import perturb

    from clip_surgery import backbones, methods

    vision = {"image_size": 64, "layers": 4, "width": 64, "patch_size": 8, "pool_type": "avg"}
    torch.manual_seed(0)
    model = perturb(open_clip.model.CLIP(EMBED_DIM, vision, TEXT_CFG), 2).eval()
    wrapped = clip_surgery.wrap(model)
    images = random_images(2, 64, 64, seed=4)
    with torch.no_grad():
        expected = model.encode_image(images)
    encoded = wrapped.encode(images, "raw")
    assert relative_error(encoded.pooled, expected) <= 1e-5
    assert relative_error(encoded.dense.mean(dim=1), expected) <= 1e-5
    family = backbones.capabilities(wrapped.backbone)
    assert wrapped.family == "open_clip ViT (avg pool)"
    assert family == backbones.family(wrapped.family)  # what the catalog lists for it
    names = [name for name in methods.names() if methods.get(name).supports(family)]
    assert {"chefer", "scclip", "legrad"}.isdisjoint(names) and len(names) == 10
    for method in names:
        options = {"depth": 2} if method in ("clip_surgery", "gem") else {}
        result = wrapped.explain(random_images(1, 60, 44), TEXTS, method=method, **options)
        maps = result.maps
        assert maps.shape[-2:] == (60, 44) and maps.min() >= 0 and maps.max() <= 1, method
    vision["final_ln_after_pool"] = True
    with pytest.raises(ModelError, match="average pooling"):
        clip_surgery.wrap(open_clip.model.CLIP(EMBED_DIM, vision, TEXT_CFG))


def test_a_conv_stem_file_without_its_model_name_is_refused_with_advice():
    """A bare weights file cannot show a convolutional stem (nor average pooling): a clear error
    naming the fix, not a misleading 'incomplete checkpoint'."""
    from importlib.resources import files

    weights = files("clip_surgery").joinpath("data/models/tiny-synth.safetensors")
    with pytest.raises(ModelError, match="convolutional stem.*load\\('tiny-synth'"):
        clip_surgery.load(str(weights))
