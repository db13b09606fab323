"""Loading models: open_clip and OpenAI names, hub names, local files and folders of every
format, and ``wrap`` for a model object you already have."""

from __future__ import annotations

import difflib
import json
import logging
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .errors import (
    InputFileError,
    ModelError,
    OptionError,
    TokenizerUnavailableError,
    WeightsUnavailableError,
)
from .model import SurgeryModel

if TYPE_CHECKING:  # open_clip is imported where a model is built (it pulls transformers in)
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
OPENAI_NAMES = {
    "RN50": "RN50",
    "RN101": "RN101",
    "RN50x4": "RN50x4",
    "RN50x16": "RN50x16",
    "RN50x64": "RN50x64",
    "ViT-B/32": "ViT-B-32",
    "ViT-B/16": "ViT-B-16",
    "ViT-L/14": "ViT-L-14",
    "ViT-L/14@336px": "ViT-L-14-336",
}
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


def wrap(model: nn.Module, tokenizer=None, name: str = "custom") -> SurgeryModel:
    """Wrap a model you already have: an open_clip CLIP (ViT, ModifiedResNet), SigLIP or EVA
    model, or a ``transformers.CLIPModel`` or ``SiglipModel``. It is used as is, never
    modified. ``tokenizer``: its tokenizer, or any callable from a list of prompts to token ids
    ``[prompts, length]`` (default: CLIP's BPE, for models with CLIP's vocabulary)."""
    return SurgeryModel(model, tokenizer, name=name)


def load(
    name_or_path: str | Path,
    pretrained: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    quick_gelu: bool | None = None,
    tokenizer=None,
) -> SurgeryModel:
    """Load a CLIP model for explanation.

    ``name_or_path``: an open_clip model name (``"ViT-B-16"``) with a ``pretrained`` tag or
    weights file; an OpenAI name (``"ViT-B/16"``, ``"RN50"``; weights tag ``openai``); a hub
    name ``"hf-hub:ORG/NAME"`` (open_clip or transformers, downloaded once); a local file
    (OpenAI TorchScript ``.pt``, OpenAI/open_clip state dicts ``.pt``/``.bin``,
    ``.safetensors``) whose architecture is inferred from its tensors; or a folder
    (``save_pretrained`` output of a transformers CLIPModel, or an open_clip folder with
    ``open_clip_config.json``). ``quick_gelu=None`` picks QuickGELU for OpenAI weights
    (TorchScript, fp16 or the ``openai`` tag) and for inferred architectures, the config's own
    activation otherwise. ``tokenizer``: use this one instead of the model's own (any callable
    from a list of prompts to token ids); SigLIP's tokenizers come from the hub, so offline
    and not cached they must be passed.
    """
    _check_device(device)
    text = str(name_or_path)
    if text in BUNDLED:
        return _load_bundled(text, device)
    if text.startswith(HUB_PREFIX):
        return _load_hub(text[len(HUB_PREFIX) :], device, tokenizer)
    if _looks_like_path(text):
        path = Path(text)
        if path.is_dir():
            return _load_folder(path, device, tokenizer)
        return _load_file(path, None, device, quick_gelu, tokenizer)
    name = OPENAI_NAMES.get(text, text)
    _check_model_name(name)
    if pretrained is not None and _looks_like_path(str(pretrained)):
        return _load_file(Path(pretrained), name, device, quick_gelu, tokenizer)
    return _load_pretrained(name, pretrained, device, quick_gelu, tokenizer)


def _check_device(device) -> None:
    """OptionError for a device string torch does not know or a GPU this machine lacks."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise OptionError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"device {device} requested but no CUDA GPU is available here")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise OptionError(f"device {device}: only {torch.cuda.device_count()} GPU(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise OptionError("device mps requested but MPS is not available here")


BUNDLED = ("tiny-synth", "tiny-synth-siglip")
TINY_TIMM_TOWER = "tiny_synth_siglip_vit"
TINY_REGISTER_TOWER = "tiny_synth_reg_vit"
TINY_MAP_TOWER = "tiny_synth_map_vit"
TINY_REGISTER3_TOWER = "tiny_synth_reg3_vit"


def register_bundled_towers() -> None:
    """Register with timm the bundled models' vision towers: 64 px ViTs with an 8 px grid,
    width 128, 6 blocks of 2 heads; ``tiny_synth_siglip_vit``: patchify embedding, no CLS token,
    SigLIP's MAP pooling head; ``tiny_synth_reg_vit``: a convolutional stem
    (``stem.ConvStem``), a CLS token and 4 register tokens (Darcet et al., "Vision Transformers
    Need Registers", ICLR 2024); ``tiny_synth_map_vit``: the convolutional stem, 3 blocks, no
    CLS token, a MAP pooling head; ``tiny_synth_reg3_vit``: the convolutional stem, 3 blocks, a
    CLS token and 4 registers (both candidate architectures for tiny-synth)."""
    import timm
    from timm.models import register_model

    if TINY_REGISTER3_TOWER in timm.list_models(TINY_REGISTER3_TOWER):
        return

    def tiny_synth_siglip_vit(pretrained: bool = False, **kwargs):
        """tiny-synth-siglip's vision tower."""
        return _tiny_tower(kwargs, class_token=False, global_pool="map")

    def tiny_synth_reg_vit(pretrained: bool = False, **kwargs):
        """A conv-stem ViT with CLS and register tokens."""
        from .stem import ConvStemEmbed

        return _tiny_tower(kwargs, reg_tokens=4, embed_layer=ConvStemEmbed, global_pool="token")

    def tiny_synth_map_vit(pretrained: bool = False, **kwargs):
        """A conv-stem ViT of 3 blocks without CLS, pooled by a MAP head."""
        from .stem import ConvStemEmbed

        settings = dict(class_token=False, global_pool="map", embed_layer=ConvStemEmbed, depth=3)
        return _tiny_tower(kwargs, **settings)

    def tiny_synth_reg3_vit(pretrained: bool = False, **kwargs):
        """A conv-stem ViT of 3 blocks with CLS and register tokens."""
        from .stem import ConvStemEmbed

        settings = dict(reg_tokens=4, embed_layer=ConvStemEmbed, global_pool="token", depth=3)
        return _tiny_tower(kwargs, **settings)

    tiny_synth_siglip_vit.__name__ = TINY_TIMM_TOWER
    tiny_synth_reg_vit.__name__ = TINY_REGISTER_TOWER
    tiny_synth_map_vit.__name__ = TINY_MAP_TOWER
    tiny_synth_reg3_vit.__name__ = TINY_REGISTER3_TOWER
    towers = (tiny_synth_siglip_vit, tiny_synth_reg_vit, tiny_synth_map_vit, tiny_synth_reg3_vit)
    for tower in towers:
        register_model(tower)


def _tiny_tower(kwargs: dict, **settings):
    """A timm ``VisionTransformer`` of the bundled geometry with ``settings``."""
    from timm.models.vision_transformer import VisionTransformer

    geometry = dict(img_size=64, patch_size=8, embed_dim=128, depth=6, num_heads=2)
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm's, unused
        kwargs.pop(key, None)
    tower = VisionTransformer(**{**geometry, **settings, **kwargs})
    tower.pretrained_cfg = tower.default_cfg = {"input_size": (3, 64, 64)}  # what timm sets
    return tower


HUB_PREFIX = "hf-hub:"
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
HF_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "spiece.model", "tokenizer.model")
HF_MODELS = {"clip": "CLIPModel", "siglip": "SiglipModel"}  # config model_type -> class


def _load_bundled(name: str, device) -> SurgeryModel:
    """A model shipped inside the package (config and fp16 weights in ``data/models``)."""
    import open_clip

    folder = Path(str(files("clip_surgery").joinpath("data/models")))
    weights = folder / f"{name}.safetensors"
    if not weights.is_file():
        raise WeightsUnavailableError(
            f"{weights} is missing from this installation; retrain it with "
            "scripts/train_tiny_synth.py"
        )
    if name not in open_clip.list_models():
        open_clip.add_model_config(folder / f"{name}.json")
    config = open_clip.get_model_config(name)  # registered above
    context = config["text_cfg"]["context_length"]
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=context)  # CLIP's BPE, offline
    return _load_file(weights, name, device, quick_gelu=None, tokenizer=tokenizer)


def _looks_like_path(text: str) -> bool:
    if text in OPENAI_NAMES or text.startswith(HUB_PREFIX):
        return False
    return Path(text).exists() or text.lower().endswith(CHECKPOINT_SUFFIXES) or "/" in text


def _check_model_name(name: str) -> None:
    import open_clip

    known = open_clip.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known + list(OPENAI_NAMES), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ModelError(f"unknown model {name!r}{hint} (or pass a weights file path)")


def _load_pretrained(name, tag, device, quick_gelu, tokenizer=None) -> SurgeryModel:
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(name)
    if tag is None:
        if "openai" not in tags:
            raise ModelError(f"pass pretrained=TAG for {name}: one of {', '.join(tags)}")
        tag = "openai"
    if tag not in tags:
        raise ModelError(f"unknown pretrained tag {tag!r} for {name}; known: {', '.join(tags)}")
    config = open_clip.get_pretrained_cfg(name, tag)
    if quick_gelu is None:
        quick_gelu = bool(config.get("quick_gelu", False)) or tag == "openai"
    try:
        with _quiet_logging():
            model = open_clip.create_model(
                name,
                pretrained=tag,
                force_quick_gelu=quick_gelu,
                device=device,
                require_pretrained=True,
            )
    except Exception as error:  # open_clip/huggingface_hub raise many types when offline
        raise WeightsUnavailableError(_offline_message(name, tag, config)) from error
    if tokenizer is None:
        tokenizer = _open_clip_tokenizer(name, name)
    return SurgeryModel(model.eval(), tokenizer, name=f"{name}/{tag}", source=tag)


# ---------------------------------------------------------------- hub names and folders


def _load_hub(repo: str, device, tokenizer=None) -> SurgeryModel:
    """``hf-hub:ORG/NAME``: an open_clip repo (``open_clip_config.json``) or a transformers
    CLIP repo (``config.json``), from the hub or its local cache."""
    import open_clip

    kind = _hub_kind(repo)
    if kind == "open_clip":
        with _quiet_logging():
            model = open_clip.create_model(HUB_PREFIX + repo, device=device)
        if tokenizer is None:
            tokenizer = _open_clip_tokenizer(HUB_PREFIX + repo, repo)
        return SurgeryModel(model.eval(), tokenizer, name=HUB_PREFIX + repo, source=repo)
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.txt", "*.model", *HF_WEIGHTS, "model-*.safetensors"]
    patterns.append("pytorch_model-*.bin")
    with _quiet_logging():
        folder = Path(snapshot_download(repo, allow_patterns=patterns))
    model = _load_transformers(folder, device, tokenizer)
    model.name, model.source = HUB_PREFIX + repo, folder
    return model


def _hub_kind(repo: str) -> str:
    """Which library a hub repo is for, from the config file it holds (cached or downloaded)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    for filename, kind in (("open_clip_config.json", "open_clip"), ("config.json", "transformers")):
        try:
            with _quiet_logging():
                hf_hub_download(repo, filename)
            return kind
        except EntryNotFoundError:
            continue  # the repo exists and lacks this file
        except RepositoryNotFoundError:
            raise ModelError(f"no repository {repo!r} on the Hugging Face hub") from None
        except Exception:  # offline, not cached: try the other file's cache
            continue
    raise WeightsUnavailableError(
        f"could not download hf-hub:{repo}, no connection or cache; on a machine with internet "
        f"run `hf download {repo} --local-dir {repo.split('/')[-1]}` and pass that folder: "
        f"--checkpoint {repo.split('/')[-1]} (Python: load('{repo.split('/')[-1]}'))"
    )


def _load_folder(path: Path, device, tokenizer=None) -> SurgeryModel:
    """A folder: transformers ``save_pretrained`` output, or an open_clip folder."""
    import open_clip

    if (path / "open_clip_config.json").is_file():
        target = f"local-dir:{path}"
        try:
            with _quiet_logging():
                model = open_clip.create_model(target, device=device)
        except Exception as error:
            detail = " ".join(str(error).split())[:160]
            raise ModelError(f"cannot load the open_clip folder {path}: {detail}") from None
        if tokenizer is None:
            tokenizer = _open_clip_tokenizer(target, str(path))
        return SurgeryModel(model.eval(), tokenizer, name=path.name, source=path)
    if (path / "config.json").is_file():
        return _load_transformers(path, device, tokenizer)
    raise ModelError(
        f"{path} is a folder without config.json (transformers save_pretrained) or "
        "open_clip_config.json (open_clip); pass a weights file or such a folder"
    )


def _require_transformers():
    try:
        import transformers
    except ImportError:
        raise ModelError(
            "this is a Hugging Face transformers model; install the extra: "
            "pip install 'clip-surgery[hf]'"
        ) from None
    return transformers


def _load_transformers(path: Path, device, tokenizer=None) -> SurgeryModel:
    """A transformers CLIP or SigLIP folder: config.json, weights, its tokenizer files if any."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InputFileError(f"cannot read {path / 'config.json'}: {error}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in HF_MODELS:
        raise ModelError(
            f"{path} holds a transformers {model_type!r} model; clip-surgery runs CLIP and "
            "SigLIP (model_type 'clip' or 'siglip': CLIPModel, SiglipModel) and open_clip models"
        )
    if not any((path / name).is_file() for name in HF_WEIGHTS) and not any(
        path.glob("*.index.json")
    ):
        raise ModelError(f"{path} has no weights ({' or '.join(HF_WEIGHTS)})")
    transformers = _require_transformers()
    with _quiet_logging():
        major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
        dtype_name = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in 4.56
        model_class = getattr(transformers, HF_MODELS[model_type])
        model = model_class.from_pretrained(path, **{dtype_name: torch.float32})
    if tokenizer is None and any((path / name).is_file() for name in HF_TOKENIZER_FILES):
        tokenizer = _transformers_tokenizer(transformers, path)
    if tokenizer is None and model_type != "clip":
        raise TokenizerUnavailableError(
            f"{path} has no tokenizer files ({', '.join(HF_TOKENIZER_FILES)}) and a "
            f"{model_type!r} model does not use CLIP's BPE: copy its hub repo's tokenizer files "
            "there, or pass a tokenizer: load(..., tokenizer=CALLABLE)"
        )
    mean, std = _hf_normalization(path)
    return SurgeryModel(
        model.to(device).eval(), tokenizer, name=path.name, source=path, mean=mean, std=std
    )


def _transformers_tokenizer(transformers, path: Path):
    """``AutoTokenizer`` of a folder; one-line TokenizerUnavailableError when it cannot load."""
    try:
        with _quiet_logging():
            return transformers.AutoTokenizer.from_pretrained(path)
    except Exception as error:  # a missing backend (sentencepiece) or unreadable files
        detail = " ".join(str(error).split())[:160]
        raise TokenizerUnavailableError(
            f"cannot load the tokenizer in {path} ({type(error).__name__}: {detail}); pass a "
            "tokenizer: load(..., tokenizer=CALLABLE)"
        ) from None


def _open_clip_tokenizer(target: str, label: str):
    """open_clip's tokenizer for ``target`` (a name, hf-hub: or local-dir:); one line saying
    what is missing and how to pass one when it comes from the hub and cannot be had."""
    import open_clip

    try:
        with _quiet_logging():
            return open_clip.get_tokenizer(target)
    except Exception as error:  # huggingface_hub/transformers raise many types when offline
        source = _tokenizer_source(target)
        detail = " ".join(str(error).split())[:120]
        fetch = f"run `hf download {source}` on a machine with internet, or " if source else ""
        raise TokenizerUnavailableError(
            f"the tokenizer of {label} ({source or 'its tokenizer files'}) cannot be loaded: "
            f"{type(error).__name__}: {detail}; {fetch}pass a tokenizer: "
            "load(..., tokenizer=CALLABLE) or wrap(model, tokenizer=CALLABLE), any callable "
            "returning token ids"
        ) from None


def _tokenizer_source(target: str) -> str:
    """The hub repo a tokenizer comes from (``""`` for a local folder)."""
    import open_clip

    if target.startswith(HUB_PREFIX):
        return target[len(HUB_PREFIX) :]
    if target.startswith("local-dir:"):
        return ""
    config = open_clip.get_model_config(target) or {}
    return config.get("text_cfg", {}).get("hf_tokenizer_name", "")


def _named_normalization(name: str):
    """The image mean and std shared by every pretrained tag of open_clip model ``name``."""
    import open_clip

    found = set()
    for tag in open_clip.list_pretrained_tags_by_model(name):
        config = open_clip.get_pretrained_cfg(name, tag)
        if "mean" in config and "std" in config:
            found.add((tuple(config["mean"]), tuple(config["std"])))
    return found.pop() if len(found) == 1 else (None, None)


def _hf_normalization(path: Path):
    """Image mean and std from ``preprocessor_config.json`` when present."""
    try:
        config = json.loads((path / "preprocessor_config.json").read_text(encoding="utf-8"))
        return tuple(config["image_mean"]), tuple(config["image_std"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, None


@contextmanager
def _quiet_logging() -> Iterator[None]:
    """Silence open_clip's and huggingface_hub's log lines; our error says it in one line."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(previous)


def _offline_message(name: str, tag: str, config: dict) -> str:
    url = config.get("url") or ""
    hub = (config.get("hf_hub") or "").rstrip("/")
    if hub and _tokenizer_source(name):  # the hub folder also holds the tokenizer it needs
        return (
            f"could not download weights for {name} ({tag}), no connection or cache; on a "
            f"machine with internet run `hf download {hub} --local-dir {name}` and pass that "
            f"folder: --checkpoint {name} (Python: load('{name}'))"
        )
    filename = url.rsplit("/", 1)[-1] if url else f"{name}-{tag}.bin"
    where = url or (f"https://huggingface.co/{hub.rstrip('/')}" if hub else "the model's hub page")
    if tag == "openai":  # OpenAI's files say their architecture and activation themselves
        how = f"--checkpoint {filename} (Python: load('{filename}'))"
    else:  # the activation is not in the file: name the model too
        how = (
            f"--model {name} --checkpoint {filename} "
            f"(Python: load('{name}', pretrained='{filename}'))"
        )
    return (
        f"could not download weights for {name} ({tag}), no connection or cache; download "
        f"{filename} from {where} and pass it: {how}"
    )


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """Read a checkpoint file into a flat state dict; returns it and the format found."""
    if not path.is_file():
        raise InputFileError(f"checkpoint not found: {path}")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path)), "safetensors"
        if _is_torchscript(path):
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict()), "torchscript"
        return _unwrap(torch.load(str(path), map_location="cpu", weights_only=True)), "state_dict"
    except ModelError:
        raise
    except Exception as error:
        raise InputFileError(
            f"cannot read checkpoint {path}: not a TorchScript archive, PyTorch state dict or "
            f"safetensors file ({type(error).__name__}: {str(error).splitlines()[0][:120]})"
        ) from error


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in archive.namelist())


def _unwrap(checkpoint) -> dict[str, torch.Tensor]:
    if isinstance(checkpoint, dict):
        for key in ("state_dict", "model"):
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise ModelError("checkpoint holds no state dict")
    if all(key.startswith("module.") for key in checkpoint):
        checkpoint = {key[len("module.") :]: value for key, value in checkpoint.items()}
    return checkpoint


def _load_file(path: Path, name: str | None, device, quick_gelu, tokenizer=None) -> SurgeryModel:
    import open_clip

    if name is not None and tokenizer is None:  # a hub tokenizer fails before the weights load
        tokenizer = _open_clip_tokenizer(name, name)
    state_dict, fmt = read_state_dict(path)
    openai_style = fmt == "torchscript" or any(key in state_dict for key in OPENAI_EXTRA_KEYS)
    state_dict = {k: v for k, v in state_dict.items() if k not in OPENAI_EXTRA_KEYS}
    if any(key.startswith(("vision_model.", "text_model.")) for key in state_dict):
        raise ModelError(
            f"{path} holds Hugging Face transformers CLIP weights without their config: pass "
            "the folder written by save_pretrained (config.json and the weights)"
        )
    if name is None:
        infer_config(state_dict)  # not a CLIP checkpoint: say that first
        if quick_gelu is None and not openai_style:
            raise ModelError(
                f"cannot tell from {path.name} whether the model uses QuickGELU (OpenAI) or GELU "
                "(most open_clip models): pass the model name (--model ViT-B-16 --checkpoint "
                "FILE; Python: load('ViT-B-16', pretrained=FILE)) or the activation (--quick-gelu "
                "or --gelu; Python: load(FILE, quick_gelu=True))"
            )
        use_quick = True if quick_gelu is None else quick_gelu
        model = build_from_state_dict(state_dict, quick_gelu=use_quick)
        label, mean, std = path.name, None, None  # tokenizer None: CLIP's BPE
    else:
        use_quick = openai_style if quick_gelu is None else quick_gelu
        config = open_clip.get_model_config(name) or {}
        if "timm_model_name" in config.get("vision_cfg", {}):  # it may name one of our towers
            register_bundled_towers()
        with _quiet_logging():  # "no pretrained weights loaded": we load them next
            model = open_clip.create_model(name, pretrained=None, force_quick_gelu=use_quick)
        _install_stem(model, state_dict)
        _load_into(model, state_dict, f"{path} does not match {name}")
        label = f"{name}/{path.name}"
        mean, std = _named_normalization(name)
    _check_finite(model, path)
    return SurgeryModel(
        model.to(device).eval(), tokenizer, name=label, source=path, mean=mean, std=std
    )


def _install_stem(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Weights with a convolutional stem in place of a ViT's patchify ``conv1`` (tiny-synth's,
    ``stem.ConvStem``): give the freshly built model that stem before they load."""
    if "visual.conv1.0.weight" not in state_dict or not hasattr(model.visual, "conv1"):
        return
    from .stem import ConvStem

    stem_keys = (key for key in state_dict if key.startswith("visual.conv1."))
    layers = sorted({int(key.split(".")[2]) for key in stem_keys})
    plain = [index for index in layers if f"visual.conv1.{index}.weight" in state_dict]
    channels = tuple(state_dict[f"visual.conv1.{index}.weight"].shape[0] for index in plain[:-1])
    mixing = len(layers) - len(plain)  # residual 3 x 3 convolutions (``conv1.<i>.conv``)
    model.visual.conv1 = ConvStem(model.visual.conv1.out_channels, channels, mixing)


def _check_finite(model: nn.Module, path: Path) -> None:
    """ModelError for weights holding NaN or infinity (a corrupt file): they give NaN maps."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ModelError(f"{path}: tensor {name} holds NaN or infinite values (corrupt file?)")


def _load_into(model: nn.Module, state_dict: dict[str, torch.Tensor], context: str) -> None:
    # A traced (TorchScript) model also stores buffers the module keeps out of its state dict.
    persistent = model.state_dict().keys()
    transient = {name for name, _ in model.named_buffers()} - set(persistent)
    state_dict = {k: v for k, v in state_dict.items() if k not in transient}
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:  # shape mismatches
        detail = " ".join(str(error).split())[:200]
        raise ModelError(f"{context}: {detail}") from None
    if result.missing_keys:
        raise ModelError(
            f"{context}: the checkpoint is incomplete (truncated?), {len(result.missing_keys)} "
            f"tensors missing, e.g. {', '.join(result.missing_keys[:3])}"
        )
    if result.unexpected_keys:
        raise ModelError(
            f"{context}: the checkpoint has {len(result.unexpected_keys)} tensors this "
            f"architecture lacks, e.g. {', '.join(result.unexpected_keys[:3])}"
        )


def _count(state_dict, prefix: str, suffix: str) -> int:
    """Blocks below ``prefix``: the highest index + 1, so a gap shows up as missing tensors."""
    indices = [
        int(k[len(prefix) :].split(".")[0])
        for k in state_dict
        if k.startswith(prefix) and k[len(prefix) :].split(".")[0].isdigit()
    ]
    return max(indices) + 1 if indices else 0


def infer_config(state_dict: dict[str, torch.Tensor]) -> dict:
    """open_clip CLIP kwargs (embed_dim, vision_cfg, text_cfg) inferred from a state dict.

    Attention heads are not stored in weights; like OpenAI and open_clip we assume 64-wide heads.
    """
    tower = _tower_kind(state_dict)
    try:
        return {
            "embed_dim": state_dict["text_projection"].shape[1],
            "vision_cfg": _infer_vision(state_dict, tower),
            "text_cfg": _infer_text(state_dict),
        }
    except (KeyError, ValueError, IndexError) as error:
        what = error.args[0] if isinstance(error, KeyError) else error
        raise ModelError(
            f"cannot infer a CLIP architecture from this {tower} checkpoint: no {what!r} "
            "(incomplete, or not a CLIP checkpoint); pass the open_clip model name too: "
            "load('ViT-B-16', pretrained='file.pt')"
        ) from None


def _tower_kind(sd: dict[str, torch.Tensor]) -> str:
    if any(key.startswith("visual.transformer.resblocks.") for key in sd):
        return "ViT"
    if any(key.startswith("visual.layer1.") for key in sd):
        return "ModifiedResNet"
    raise ModelError(
        "cannot infer a CLIP architecture from this checkpoint: it has neither ViT blocks "
        "(visual.transformer.resblocks.*) nor ResNet layers (visual.layer1.*); pass the "
        "open_clip model name too: load('ViT-B-16', pretrained='file.pt')"
    )


def _infer_vision(sd: dict[str, torch.Tensor], tower: str) -> CLIPVisionCfg:
    from open_clip.model import CLIPVisionCfg

    if tower == "ViT":
        sd["visual.proj"]  # noqa: B018 - a ViT checkpoint without its projection is incomplete
        if "visual.conv1.0.weight" in sd:  # neither the stem nor the pooling shows in the shapes
            raise ModelError(
                "a ViT checkpoint with a convolutional stem (as tiny-synth's): its architecture "
                "cannot be inferred from the file; pass its open_clip model name too: "
                "load('tiny-synth', pretrained='file.safetensors')"
            )
        width, _, patch, _ = sd["visual.conv1.weight"].shape
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        prefix = "visual.transformer.resblocks."
        return CLIPVisionCfg(
            layers=_count(sd, prefix, ".attn.in_proj_weight"),
            width=width,
            patch_size=patch,
            image_size=patch * grid,
            mlp_ratio=sd[prefix + "0.mlp.c_fc.weight"].shape[0] / width,
            ls_init_value=1e-5 if prefix + "0.ls_1.gamma" in sd else None,
            no_ln_pre="visual.ln_pre.weight" not in sd,
        )
    side = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
    layers = tuple(_count(sd, f"visual.layer{i}.", ".conv1.weight") for i in (1, 2, 3, 4))
    return CLIPVisionCfg(
        layers=layers, width=sd["visual.layer1.0.conv1.weight"].shape[0], image_size=side * 32
    )


def _infer_text(sd: dict[str, torch.Tensor]) -> CLIPTextCfg:
    from open_clip.model import CLIPTextCfg

    width = sd["ln_final.weight"].shape[0]
    return CLIPTextCfg(
        context_length=sd["positional_embedding"].shape[0],
        vocab_size=sd["token_embedding.weight"].shape[0],
        width=width,
        heads=max(width // 64, 1),
        layers=_count(sd, "transformer.resblocks.", ".attn.in_proj_weight"),
        mlp_ratio=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
    )


def build_from_state_dict(state_dict: dict[str, torch.Tensor], quick_gelu: bool = True) -> CLIP:
    """Build an open_clip CLIP of the inferred architecture and load the weights in fp32."""
    from open_clip.model import CLIP

    model = CLIP(**infer_config(state_dict), quick_gelu=quick_gelu)
    _load_into(model, state_dict, "checkpoint does not match its inferred architecture")
    return model.float().eval()
