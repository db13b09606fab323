"""Loading CLIP models (open_clip names, OpenAI names, local files) and the SurgeryModel wrapper."""

from __future__ import annotations

import difflib
import hashlib
import logging
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image
from torch import nn

from . import engine, methods
from .errors import ImageError, InputFileError, ModelError, WeightsUnavailableError
from .features import similarity_map
from .images import OPENAI_MEAN, OPENAI_STD, Size, open_image
from .images import preprocess as preprocess_image
from .text import check_templates, check_texts, default_templates, prompts_for, tokenize

DEFAULT_TEMPLATES: tuple[str, ...] = default_templates()
DEFAULT_DEPTH = 6
TEXT_BATCH = 256
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

ImageInput = torch.Tensor | Image.Image | str | Path


@dataclass
class Explanation:
    """What ``SurgeryModel.explain`` returns for B images and T texts."""

    texts: list[str]
    maps: torch.Tensor  # [B, T, H, W] in [0, 1]
    similarity: torch.Tensor  # [B, N, T] what the maps are made from (e.g. after feature surgery)
    logits: torch.Tensor  # [B, N, T] dense per-token scores for segmentation (argmax over T)
    grid: tuple[int, int]  # (h, w) patch grid, h * w = N
    cosine: torch.Tensor  # [B, T] cosine of the method's CLS token with each text
    probs: torch.Tensor  # [B, T] softmax(logit_scale * cosine) over the texts
    method: str = "clip_surgery"
    options: object = None  # the method's typed options


class SurgeryModel:
    """An open_clip CLIP model with CLIP Surgery's forward beside its own (never modified)."""

    def __init__(self, clip: nn.Module, tokenizer=None, *, name: str = "custom", source=None):
        engine.check_supported(clip.visual)
        self.clip = clip
        self.tokenizer = tokenizer or SimpleTokenizer(context_length=clip.context_length)
        self.name = name
        self.source = source
        self._text_cache: dict[tuple, torch.Tensor] = {}
        self._weights_hash: str | None = None

    def __repr__(self) -> str:
        return f"SurgeryModel(name={self.name!r}, source={self.source!r})"

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters."""
        return next(self.clip.parameters()).device

    @property
    def is_vit(self) -> bool:
        """True for a ViT visual tower, False for a ModifiedResNet."""
        return not isinstance(self.clip.visual, open_clip.modified_resnet.ModifiedResNet)

    @property
    def logit_scale(self) -> float:
        """CLIP's learned temperature (100 for OpenAI models)."""
        return float(self.clip.logit_scale.detach().exp())

    @property
    def weights_hash(self) -> str:
        """SHA-256 (first 16 hex digits) of the weights file, or of the parameters in memory."""
        if self._weights_hash is None:
            digest = hashlib.sha256()
            if isinstance(self.source, Path) and self.source.is_file():
                with self.source.open("rb") as handle:
                    for chunk in iter(lambda: handle.read(1 << 20), b""):
                        digest.update(chunk)
            else:
                for key, value in sorted(self.clip.state_dict().items()):
                    digest.update(key.encode())
                    digest.update(value.detach().cpu().contiguous().numpy().tobytes())
            self._weights_hash = digest.hexdigest()[:16]
        return self._weights_hash

    # ------------------------------------------------------------ images

    @property
    def native_size(self) -> int:
        """The input side the model was trained at (224 for CLIP ViT-B/16, 64 for tiny-synth)."""
        size = self.clip.visual.image_size
        return int(size if isinstance(size, int) else size[0])

    def preprocess(self, image: Image.Image | str | Path, size: Size | None = None) -> torch.Tensor:
        """Whole image resized to ``size`` (default: the model's native size; bicubic, no crop),
        CLIP-normalised: ``[3, H, W]``."""
        size = self.native_size if size is None else size
        if not isinstance(image, Image.Image):
            image = open_image(image)
        return preprocess_image(image, size, *self.normalization)

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The model's image mean and std (OpenAI's CLIP values unless the model sets its own)."""
        mean = getattr(self.clip.visual, "image_mean", None) or OPENAI_MEAN
        std = getattr(self.clip.visual, "image_std", None) or OPENAI_STD
        return tuple(mean), tuple(std)

    def as_batch(
        self, images: ImageInput | Sequence[ImageInput], size: Size | None = None
    ) -> torch.Tensor:
        """Stack tensors, PIL images or paths into one ``[B, 3, H, W]`` batch on the device."""
        if isinstance(images, torch.Tensor):
            batch = images
        else:
            if isinstance(images, (Image.Image, str, Path)):
                images = [images]
            if not images:
                raise ImageError("no images given")
            tensors = [self._one_image(image, size) for image in images]
            if len({tuple(t.shape) for t in tensors}) > 1:
                raise ImageError("tensors in one batch must share a shape; pass size= instead")
            batch = torch.stack(tensors)
        if batch.dim() == 3:
            batch = batch.unsqueeze(0)
        if batch.dim() != 4 or batch.shape[1] != 3:
            raise ImageError(f"expected images [B, 3, H, W], got shape {tuple(batch.shape)}")
        if not batch.is_floating_point():
            raise ImageError("image tensors must be preprocessed floats (see model.preprocess)")
        return batch.to(self.device)

    def _one_image(self, image: ImageInput, size: Size | None) -> torch.Tensor:
        if isinstance(image, torch.Tensor):
            return image
        return self.preprocess(image, size)

    def encode_image(
        self,
        images: torch.Tensor,
        surgery: bool = True,
        *,
        depth: int | None = None,
        method: str | None = None,
        **options,
    ) -> torch.Tensor:
        """Projected tokens ``[B, 1+N, D]``, CLS first, not normalized.

        ``surgery=True``: CLIP Surgery's dual path (CLS from the original path).
        ``surgery=False``: the plain model; its CLS equals open_clip's ``encode_image``.
        ``method=NAME`` (with that method's options): the tokens that method's maps come from.
        """
        if method is not None:
            chosen = methods.get(method)
            if depth is not None:
                options["depth"] = depth
            return chosen.encode(self, self.as_batch(images), chosen.options(**options))[0].float()
        if options:
            raise methods.OptionError(f"options {sorted(options)} need method=NAME")
        depth = DEFAULT_DEPTH if depth is None else depth
        return self.encode_image_with_grid(images, depth if surgery else 0)[0]

    def encode_image_with_grid(
        self, images: torch.Tensor, depth: int
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """Like ``encode_image`` (``depth`` 0 = plain), also returning the token grid ``(h, w)``."""
        batch = self.as_batch(images)
        with self.inference():
            tokens, grid = engine.encode_tokens(self.clip.visual, batch, depth)
        return tokens.float(), grid

    # ------------------------------------------------------------ text

    def encode_text(
        self, texts: Sequence[str] | str, templates: Sequence[str] | None = DEFAULT_TEMPLATES
    ) -> torch.Tensor:
        """Normalized text embeddings ``[T, D]``; with templates, the normalized prompt mean.

        ``templates=None`` encodes the texts as given. Results are cached per model,
        templates and text.
        """
        return self._embed_texts(check_texts(texts), check_templates(templates))

    def redundant_feature(
        self, templates: Sequence[str] | None = DEFAULT_TEMPLATES
    ) -> torch.Tensor:
        """The embedding ``[1, D]`` of the empty string, CLIP Surgery's redundant feature."""
        return self._embed_texts([""], check_templates(templates))

    def _embed_texts(self, texts: list[str], templates: tuple[str, ...] | None) -> torch.Tensor:
        missing = list(dict.fromkeys(t for t in texts if (templates, t) not in self._text_cache))
        if missing:
            prompts = [prompt for text in missing for prompt in prompts_for(text, templates)]
            tokens = tokenize(self.tokenizer, prompts, self.clip.context_length)
            embedded = torch.cat([self._encode_tokens(chunk) for chunk in tokens.split(TEXT_BATCH)])
            per_text = F.normalize(embedded, dim=-1).view(len(missing), -1, embedded.shape[-1])
            means = F.normalize(per_text.mean(dim=1), dim=-1)
            for text, mean in zip(missing, means, strict=True):
                self._text_cache[(templates, text)] = mean
        return torch.stack([self._text_cache[(templates, t)] for t in texts])

    def _encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        with self.inference():
            return self.clip.encode_text(tokens.to(self.device)).float()

    # ------------------------------------------------------------ explanations

    def explain(
        self,
        images: ImageInput | Sequence[ImageInput],
        texts: Sequence[str] | str,
        *,
        method: str = "clip_surgery",
        size: Size | None = None,
        single: bool = False,
        output_size: Size | None = None,
        templates: Sequence[str] | None = DEFAULT_TEMPLATES,
        **options,
    ) -> Explanation:
        """Where each text is in each image: maps ``[B, T, H, W]`` in [0, 1].

        ``method``: any name in ``clip_surgery.methods`` (default CLIP Surgery), with that
        method's ``options`` (e.g. ``depth=6``). ``single=True`` treats the texts as free-form
        queries (CLIP Surgery removes the empty string's redundant feature); otherwise they are
        a class set. Maps have the preprocessed input's size unless ``output_size`` is given.
        """
        chosen = methods.get(method)
        parsed = chosen.options(**options)
        texts = check_texts(texts)
        batch = self.as_batch(images, size)
        text = self.encode_text(texts, templates)
        redundant = self.redundant_feature(templates) if single else None
        scores = chosen.scores(self, batch, text, parsed, redundant)
        maps = similarity_map(
            scores.similarity, output_size or tuple(batch.shape[-2:]), scores.grid
        )
        probs = (self.logit_scale * scores.cosine).softmax(dim=-1)
        return Explanation(
            texts,
            maps,
            scores.similarity,
            scores.logits,
            scores.grid,
            scores.cosine,
            probs,
            method,
            parsed,
        )

    @contextmanager
    def inference(self, grad: bool = False) -> Iterator[None]:
        """Eval semantics (flags restored after), no grad unless ``grad``, autocast on CUDA."""
        with _eval_mode(self.clip), torch.set_grad_enabled(grad):
            if self.device.type == "cuda":
                with torch.autocast("cuda", dtype=torch.float16):
                    yield
            else:
                yield


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Run a module in eval mode and restore every submodule's training flag afterwards."""
    flags = [(sub, sub.training) for sub in module.modules()]
    if not any(training for _, training in flags):
        yield
        return
    module.eval()
    try:
        yield
    finally:
        for sub, training in flags:
            sub.training = training


# ---------------------------------------------------------------- loading


def wrap(model: nn.Module, tokenizer=None, name: str = "custom") -> SurgeryModel:
    """Wrap an open_clip CLIP model you already have (it is used as is, never modified)."""
    return SurgeryModel(model, tokenizer, name=name)


def load(
    name_or_path: str | Path,
    pretrained: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    quick_gelu: bool | None = None,
) -> SurgeryModel:
    """Load a CLIP model for explanation.

    ``name_or_path``: an open_clip model name (``"ViT-B-16"``) with a ``pretrained`` tag or
    weights file, an OpenAI name (``"ViT-B/16"``, ``"RN50"``; weights tag ``openai``), or a local
    file (OpenAI TorchScript ``.pt``, OpenAI/open_clip state dicts ``.pt``/``.bin``,
    ``.safetensors``) whose architecture is inferred from its tensors. ``quick_gelu=None`` picks
    QuickGELU for OpenAI weights (TorchScript, fp16 or the ``openai`` tag) and for inferred
    architectures, the config's own activation otherwise.
    """
    text = str(name_or_path)
    if text in BUNDLED:
        return _load_bundled(text, device)
    if _looks_like_path(text):
        return _load_file(Path(text), None, device, quick_gelu)
    name = OPENAI_NAMES.get(text, text)
    _check_model_name(name)
    if pretrained is not None and _looks_like_path(str(pretrained)):
        return _load_file(Path(pretrained), name, device, quick_gelu)
    return _load_pretrained(name, pretrained, device, quick_gelu)


BUNDLED = ("tiny-synth",)


def _load_bundled(name: str, device) -> SurgeryModel:
    """A model shipped inside the package (config and fp16 weights in ``data/models``)."""
    folder = Path(str(files("clip_surgery").joinpath("data/models")))
    weights = folder / f"{name}.safetensors"
    if not weights.is_file():
        raise WeightsUnavailableError(
            f"{weights} is missing from this installation; retrain it with "
            "scripts/train_tiny_synth.py"
        )
    if name not in open_clip.list_models():
        open_clip.add_model_config(folder / f"{name}.json")
    return _load_file(weights, name, device, quick_gelu=None)


def _looks_like_path(text: str) -> bool:
    if text in OPENAI_NAMES or text.startswith("hf-hub:"):
        return False
    return Path(text).exists() or text.lower().endswith(CHECKPOINT_SUFFIXES) or "/" in text


def _check_model_name(name: str) -> None:
    if name.startswith("hf-hub:"):
        return
    known = open_clip.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known + list(OPENAI_NAMES), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ModelError(f"unknown model {name!r}{hint} (or pass a weights file path)")


def _load_pretrained(name, tag, device, quick_gelu) -> SurgeryModel:
    if name.startswith("hf-hub:"):
        try:
            with _quiet_logging():
                model = open_clip.create_model(name, device=device)
        except Exception as error:
            raise WeightsUnavailableError(
                f"could not download {name}: no connection or cache; pass a local weights file"
            ) from error
        return SurgeryModel(model.eval(), open_clip.get_tokenizer(name), name=name, source=name)
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
    return SurgeryModel(
        model.eval(), open_clip.get_tokenizer(name), name=f"{name}/{tag}", source=tag
    )


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
    hub = config.get("hf_hub") or ""
    filename = url.rsplit("/", 1)[-1] if url else f"{name}-{tag}.bin"
    where = url or (f"https://huggingface.co/{hub.rstrip('/')}" if hub else "the model's hub page")
    return (
        f"could not download weights for {name} ({tag}), no connection or cache; download "
        f"{filename} from {where} and pass it: --checkpoint {filename} (Python: load('{filename}'))"
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


def _load_file(path: Path, name: str | None, device, quick_gelu) -> SurgeryModel:
    state_dict, fmt = read_state_dict(path)
    state_dict = {k: v for k, v in state_dict.items() if k not in OPENAI_EXTRA_KEYS}
    if any(key.startswith(("vision_model.", "text_model.")) for key in state_dict):
        raise ModelError(f"{path} is a Hugging Face transformers checkpoint, not supported yet")
    openai_style = fmt == "torchscript" or _is_half(state_dict)
    if name is None:
        use_quick = True if quick_gelu is None else quick_gelu
        model = build_from_state_dict(state_dict, quick_gelu=use_quick)
        tokenizer = SimpleTokenizer(context_length=model.context_length)
        label = path.name
    else:
        use_quick = openai_style if quick_gelu is None else quick_gelu
        with _quiet_logging():  # "no pretrained weights loaded": we load them next
            model = open_clip.create_model(name, pretrained=None, force_quick_gelu=use_quick)
        _load_into(model, state_dict, f"{path} does not match {name}")
        tokenizer = open_clip.get_tokenizer(name)
        label = f"{name}/{path.name}"
    return SurgeryModel(model.to(device).eval(), tokenizer, name=label, source=path)


def _is_half(state_dict: dict[str, torch.Tensor]) -> bool:
    weight = state_dict.get("visual.conv1.weight")
    return weight is not None and weight.dtype == torch.float16


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
    if result.missing_keys or result.unexpected_keys:
        missing = ", ".join(result.missing_keys[:3])
        unexpected = ", ".join(result.unexpected_keys[:3])
        raise ModelError(f"{context}: missing [{missing}] unexpected [{unexpected}]")


def _count(state_dict, prefix: str, suffix: str) -> int:
    return len(
        {
            k[len(prefix) :].split(".")[0]
            for k in state_dict
            if k.startswith(prefix) and k.endswith(suffix)
        }
    )


def infer_config(state_dict: dict[str, torch.Tensor]) -> dict:
    """open_clip CLIP kwargs (embed_dim, vision_cfg, text_cfg) inferred from a state dict.

    Attention heads are not stored in weights; like OpenAI and open_clip we assume 64-wide heads.
    """
    try:
        return {
            "embed_dim": state_dict["text_projection"].shape[1],
            "vision_cfg": _infer_vision(state_dict),
            "text_cfg": _infer_text(state_dict),
        }
    except KeyError as error:
        raise ModelError(
            f"cannot infer a CLIP architecture from this checkpoint (no {error}); pass the "
            "open_clip model name too: load('ViT-B-16', pretrained='file.pt')"
        ) from None


def _infer_vision(sd: dict[str, torch.Tensor]) -> CLIPVisionCfg:
    if "visual.proj" in sd:
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
    model = CLIP(**infer_config(state_dict), quick_gelu=quick_gelu)
    _load_into(model, state_dict, "checkpoint does not match its inferred architecture")
    return model.float().eval()
