"""``SurgeryModel``: a user's CLIP model with every method beside its own forward, and
``Explanation``, what ``explain`` returns."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from . import engine, methods
from .backbones import adapt
from .cache import TextEmbeddingCache, default_directory, entry_key
from .errors import ImageError, OptionError
from .features import similarity_map
from .images import as_hw, open_image
from .images import preprocess as preprocess_image
from .inference import check_precision, effective_precision
from .methods import DEFAULT_METHOD, Method, Scores, TextQuery
from .text import DEFAULT_TEMPLATES, check_templates, check_texts, encode_tokens, prompts_for
from .typedefs import Grid, Size

TEXT_BATCH = 256
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")

ImageInput = torch.Tensor | Image.Image | str | Path


@dataclass
class Explanation:
    """What ``explain`` returns for B images and T texts."""

    texts: list[str]
    similarity: torch.Tensor  # [B, N, T]: what the maps are made from (after feature surgery)
    token_scores: torch.Tensor  # [B, N, T]: dense per-token scores (segmentation argmax)
    grid: Grid  # (h, w) patch grid, h * w = N
    cosine: torch.Tensor  # [B, T]: cosine of the method's image embedding with each text
    probs: torch.Tensor  # [B, T]: softmax(logit_scale * cosine) over the texts
    method: str = DEFAULT_METHOD
    options: object = None  # the method's typed options
    free_form: bool = False  # texts read as free-form queries (True) or as a class set
    output_size: tuple[int, int] | None = None  # (H, W) of ``maps``
    _maps: torch.Tensor | None = field(default=None, repr=False)

    @property
    def maps(self) -> torch.Tensor:
        """``[B, T, H, W]`` in [0, 1] at ``output_size``; made on first use (``maps_at`` makes
        some maps at any size without holding all of them)."""
        if self._maps is None:
            self._maps = self.maps_at(self.output_size)
        return self._maps

    @property
    def logits(self) -> torch.Tensor:
        """Deprecated name of ``token_scores``."""
        warnings.warn(
            "Explanation.logits is now Explanation.token_scores", DeprecationWarning, stacklevel=2
        )
        return self.token_scores

    def maps_at(
        self, size: Size, image: int | None = None, texts: Sequence[int] | None = None
    ) -> torch.Tensor:
        """The maps at another ``size``: ``[B, T, H, W]``, or ``[T, H, W]`` for one ``image``;
        ``texts`` picks some texts' maps by index."""
        similarity = self.similarity if image is None else self.similarity[image : image + 1]
        if texts is not None:
            similarity = similarity[:, :, list(texts)]
        maps = similarity_map(similarity, size, self.grid)
        return maps if image is None else maps[0]


class SurgeryModel:
    """A CLIP model (open_clip or transformers) with every explanation method beside its own
    forward. The model is only read, never modified."""

    def __init__(
        self,
        module: nn.Module,
        tokenizer=None,
        *,
        name: str = "custom",
        source=None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        normalization = {"mean": mean, "std": std} if mean is not None else {}
        self.backbone = adapt(module, tokenizer, **normalization)
        self.clip = module
        self.name = name
        self.source = source
        self._text_cache: dict[tuple, torch.Tensor] = {}
        self._weights_hash: str | None = None
        self.cache_dir = default_directory()

    def __repr__(self) -> str:
        return f"SurgeryModel(name={self.name!r}, family={self.family!r}, source={self.source!r})"

    @property
    def family(self) -> str:
        """The backbone family (see ``clip_surgery.backbones.FAMILIES``)."""
        return self.backbone.family

    @property
    def tokenizer(self):
        """The text tokenizer as given (or CLIP's BPE)."""
        return self.backbone.text.tokenizer.tokenizer

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters."""
        return self.backbone.device

    @property
    def is_vit(self) -> bool:
        """True when the vision tower is a transformer (has blocks)."""
        return bool(self.backbone.vision.blocks)

    @property
    def logit_scale(self) -> float:
        """CLIP's learned temperature (100 for OpenAI models)."""
        return self.backbone.logit_scale

    @property
    def precision(self) -> str:
        """Autocast dtype on CUDA: ``"fp16"`` (default), ``"bf16"``, or ``"fp32"`` (none)."""
        return self.backbone.precision

    @precision.setter
    def precision(self, value: str) -> None:
        self.backbone.precision = check_precision(value)

    @property
    def cache_dir(self) -> Path | None:
        """Where text embeddings persist across processes (None: memory only). Default:
        ``$CLIP_SURGERY_CACHE`` or the user's cache folder (see ``clip_surgery.cache``)."""
        return None if self._disk_cache is None else self._disk_cache.directory

    @cache_dir.setter
    def cache_dir(self, directory: str | Path | None) -> None:
        self._disk_cache = None if directory is None else TextEmbeddingCache(Path(directory))

    @property
    def weights_hash(self) -> str:
        """SHA-256 (first 16 hex digits) of the weights file(s), or of the parameters in memory.

        A file's hash is remembered in the cache folder by its path, size and modification
        time; a model changed in memory after loading keeps its file's hash (set
        ``cache_dir = None`` for such a model)."""
        if self._weights_hash is None:
            files = _weight_files(self.source)
            if files and self._disk_cache is not None:
                self._weights_hash = self._disk_cache.file_hash(files, lambda: _hash_files(files))
            elif files:
                self._weights_hash = _hash_files(files)
            else:
                digest = hashlib.sha256()
                for key, value in sorted(self.clip.state_dict().items()):
                    digest.update(key.encode())
                    digest.update(value.detach().cpu().float().contiguous().numpy().tobytes())
                self._weights_hash = digest.hexdigest()[:16]
        return self._weights_hash

    def inference(self, grad: bool = False):
        """Eval semantics (flags restored after), no grad unless ``grad``, autocast on CUDA."""
        return self.backbone.inference(grad)

    # ------------------------------------------------------------ images

    @property
    def native_size(self) -> int | tuple[int, int]:
        """The input size the model was trained at (224 for CLIP ViT-B/16, 160 for tiny-synth)."""
        height, width = self.backbone.vision.native_size
        return height if height == width else (height, width)

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The model's image mean and std."""
        return self.backbone.mean, self.backbone.std

    def preprocess(self, image: Image.Image | str | Path, size: Size | None = None) -> torch.Tensor:
        """Whole image resized to ``size`` (default: the model's native size; bicubic, no crop),
        normalised: ``[3, H, W]``."""
        size = self.native_size if size is None else size
        if not isinstance(image, Image.Image):
            image = open_image(image)
        return preprocess_image(image, size, *self.normalization)

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
            tensors = [
                image if isinstance(image, torch.Tensor) else self.preprocess(image, size)
                for image in images
            ]
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

    def encode(self, images, method: str | Method = DEFAULT_METHOD, **options) -> engine.Trace:
        """A forward method's image embedding ``[B, D]``, dense tokens ``[B, N, D]`` and grid."""
        chosen = methods.get(method)
        return chosen.encode(self.backbone, self.as_batch(images), chosen.options(**options))

    def encode_image(
        self,
        images: torch.Tensor,
        surgery: bool = True,
        *,
        depth: int | None = None,
        method: str | None = None,
        **options,
    ) -> torch.Tensor:
        """Projected tokens ``[B, 1+N, D]``, image embedding first, not normalised.

        ``surgery=True``: CLIP Surgery's tokens (the embedding from the original path).
        ``surgery=False``: the plain model's; the first token equals its image embedding.
        ``method=NAME`` (with that method's options): the tokens that method's maps come from.
        """
        if method is None:
            if options:
                raise OptionError(f"options {sorted(options)} need method=NAME")
            if not surgery and depth is not None:
                raise OptionError("depth applies to surgery=True (or method=NAME)")
            method = DEFAULT_METHOD if surgery else "raw"
        if depth is not None:
            options["depth"] = depth
        return self.encode(images, method, **options).tokens

    def encode_image_with_grid(self, images, depth: int) -> tuple[torch.Tensor, Grid]:
        """Deprecated: ``encode(images, method)`` returns tokens and grid."""
        warnings.warn("use SurgeryModel.encode(images, method)", DeprecationWarning, stacklevel=2)
        trace = self.encode(images, DEFAULT_METHOD if depth else "raw", **_depth(depth))
        return trace.tokens, trace.grid

    # ------------------------------------------------------------ text

    def encode_text(
        self, texts: Sequence[str] | str, templates: Sequence[str] | None = DEFAULT_TEMPLATES
    ) -> torch.Tensor:
        """Normalised text embeddings ``[T, D]``; with templates, the normalised prompt mean.

        ``templates=None`` encodes the texts as given. Results are cached per model,
        templates and text.
        """
        return self._embed_texts(check_texts(texts), check_templates(templates))

    def redundant_feature(
        self, templates: Sequence[str] | None = DEFAULT_TEMPLATES
    ) -> torch.Tensor:
        """The embedding ``[1, D]`` of the empty string, CLIP Surgery's redundant feature."""
        return self._embed_texts([""], check_templates(templates))

    def query(
        self,
        texts: Sequence[str] | str,
        templates: Sequence[str] | None = DEFAULT_TEMPLATES,
        free_form: bool = False,
    ) -> TextQuery:
        """The texts' embeddings and, under the same templates, the redundant feature."""
        templates, texts = check_templates(templates), check_texts(texts)
        if free_form:  # the redundant feature is needed: encode it in the same batch
            embeddings = self._embed_texts([*texts, ""], templates)[:-1]
        else:
            embeddings = self._embed_texts(texts, templates)
        return TextQuery(embeddings, free_form, lambda: self._embed_texts([""], templates))

    def _embed_texts(self, texts: list[str], templates: tuple[str, ...] | None) -> torch.Tensor:
        missing = list(dict.fromkeys(t for t in texts if (templates, t) not in self._text_cache))
        if missing:
            text_tower = self.backbone.text
            prompts = [prompt for text in missing for prompt in prompts_for(text, templates)]
            tokens = text_tower.tokenize(prompts)
            tokens = tokens.view(len(missing), -1, tokens.shape[-1])
            keys = {}
            if self._disk_cache is not None:
                keys = {
                    text: self._disk_key(ids) for text, ids in zip(missing, tokens, strict=True)
                }
                self._read_disk(missing, templates, keys)
            todo = [
                i for i, text in enumerate(missing) if (templates, text) not in self._text_cache
            ]
            if todo:
                self._encode_missing([missing[i] for i in todo], tokens[todo], templates, keys)
        return torch.stack([self._text_cache[(templates, t)] for t in texts])

    def _read_disk(self, texts: list[str], templates, keys: dict[str, str]) -> None:
        """Fill the memory cache with the texts the disk cache holds."""
        for text in texts:
            stored = self._disk_cache.get(keys[text])
            if stored is not None:
                self._text_cache[(templates, text)] = torch.from_numpy(stored).to(self.device)

    def _encode_missing(self, texts: list[str], tokens: torch.Tensor, templates, keys) -> None:
        """Encode ``tokens`` ``[T, P, L]`` (P prompts per text); cache each prompt mean."""
        text_tower = self.backbone.text
        with self.inference():
            embedded = encode_tokens(text_tower, tokens.flatten(0, 1), self.device, TEXT_BATCH)
        per_text = F.normalize(embedded, dim=-1).view(len(texts), -1, embedded.shape[-1])
        means = F.normalize(per_text.mean(dim=1), dim=-1)
        for text, mean in zip(texts, means, strict=True):
            self._text_cache[(templates, text)] = mean
        if self._disk_cache is not None:
            entries = zip(texts, means.cpu().numpy(), strict=True)
            self._disk_cache.put((keys[text], vector) for text, vector in entries)

    def _disk_key(self, tokens: torch.Tensor) -> str:
        """The disk-cache key of one text: the weights, the precision, and the token ids of its
        prompts (whatever tokenizer made them, they fix the embedding)."""
        ids = tokens.detach().cpu().to(torch.int64).contiguous().numpy()
        digest = hashlib.sha256(repr(ids.shape).encode() + ids.tobytes()).hexdigest()
        precision = effective_precision(self.device, self.backbone.precision)
        return entry_key(self.weights_hash, precision, digest)

    # ------------------------------------------------------------ explanations

    def score(self, images, query: TextQuery, method: str | Method = DEFAULT_METHOD, options=None):
        """A method's per-patch ``Scores`` of images against an encoded ``query``."""
        chosen = methods.get(method)
        options = chosen.options() if options is None else options
        return chosen.scores(self.backbone, self.as_batch(images), query, options)

    def explain(
        self,
        images: ImageInput | Sequence[ImageInput],
        texts: Sequence[str] | str,
        *,
        method: str = DEFAULT_METHOD,
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
        a class set. One text is always a free-form query (a class set of one has no
        alternatives; ``Explanation.free_form`` says which). Maps have the preprocessed input's
        size unless ``output_size`` is given.
        """
        chosen = methods.get(method)
        parsed = chosen.options(**options)
        texts = check_texts(texts)
        batch = self.as_batch(images, size)
        free_form = single or len(texts) == 1
        query = self.query(texts, templates, free_form=free_form)
        scores: Scores = chosen.scores(self.backbone, batch, query, parsed)
        probs = (self.logit_scale * scores.cosine).softmax(dim=-1)
        return Explanation(
            texts,
            scores.similarity,
            scores.token_scores,
            scores.grid,
            scores.cosine,
            probs,
            chosen.name,
            chosen.resolved(parsed, self.backbone.vision),  # what ran: model-dependent defaults
            free_form,
            as_hw(output_size or tuple(batch.shape[-2:]), limit=None),
        )


def _depth(depth: int) -> dict:
    return {"depth": depth} if depth else {}


def _hash_files(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        with path.open("rb") as handle:
            for chunk in iter(lambda h=handle: h.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def _weight_files(source) -> list[Path]:
    if not isinstance(source, Path):
        return []
    if source.is_file():
        return [source]
    if source.is_dir():
        return sorted(p for p in source.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    return []
