"""Train tiny-synth, the small CLIP shipped with clip-surgery, from scratch (CPU or CUDA).

A CLIP: image-text contrastive training only, on procedurally generated captioned scenes
(``clip_surgery.synth``); no mask or class label enters the loss. The recipe:

- the sizes of the package's ``tiny-synth.json`` unless overridden (``--patch-size``,
  ``--width``, ``--layers``, ``--head-width``), at a 64 px input (the scenes' size) unless
  ``--image-size`` says otherwise (the shipped config says 160); the patch embedding and the
  pooling come from the command line, not from that file (the shipped model: ``--stem conv``,
  ``--pool tok`` then ``--pool avg``, see below); the patch embedding a
  patchify convolution or a convolutional stem (``--stem conv``, ``stem.ConvStem``, optionally
  with ``--stem-mixing`` residual convolutions); the image embedding the CLS token or the mean
  of the patch tokens (``--pool``); a finer token grid for the end of training: a larger input
  (``--image-size 160``: scenes resized as the package's preprocess does, 20 x 20 tokens of 8
  px) or resuming 8 px-patch weights into a ``--patch-size 4`` model (converted exactly); either
  way ``refine_grid`` resizes the positional table;
- the positional table starts at MAE's 2-D sine-cosine embedding (``--positions``);
- hard-negative batches: each batch holds groups of ``--group`` renderings of one scene that
  differ only in their shape categories (``synth.make_scene(seed, variant)``; with 5 the large
  shape appears as each of the five), so colour, texture and layout alone cannot solve the
  batch; captions name the k largest shapes (k random), every shape (``--captions all``) or k
  shapes drawn in proportion to their visible pixels (``--captions area``);
- a contrastive loss that tolerates identical captions in a batch: softmax (CLIP) cross-entropy
  against targets spread uniformly over every pair with the same caption, or (``--loss
  sigmoid``) SigLIP's pairwise sigmoid loss (Zhai et al., "Sigmoid Loss for Language Image
  Pre-Training", ICCV 2023) with identical captions as positives;
- scene generation in DataLoader worker processes (``--workers``), the training thread only
  trains; every batch is a pure function of its step, so a run is seeded and reproducible;
- AdamW, linear warm-up then cosine decay, learnable temperature.

Stages: ``--max-minutes`` or ``--stop-step`` stops a run cleanly (full checkpoint
``checkpoint.pt`` and fp16 ``tiny-synth.safetensors``, whose metadata holds the step and the
loss history); ``--resume`` continues from either (from the fp16 file with a restarted
optimizer), on the schedule of ``--steps``.
``--device cuda`` trains on a GPU (bf16 autocast). Writes the fp16 weights, the config, a
metrics JSON (zero-shot accuracy and the pointing game on validation scenes) and the loss
curve.

The shipped tiny-synth: three stages, the commands in the README (section "tiny-synth"): a
CLS-pooled stage with ``--stem conv --layers 3`` at 64 px, then ``--pool avg --image-size 128``
resumed from it with ``--new-schedule``, then ``--image-size 160`` resumed from that (stopped at
step 5000); copy ``tiny-synth.safetensors``, ``tiny-synth.json`` and the loss curve to
``src/clip_surgery/data/models/`` and ``docs/``, then run ``scripts/measure_shipped.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from importlib.resources import files
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import clip_surgery
from clip_surgery import synth
from clip_surgery.images import OPENAI_MEAN, OPENAI_STD, resize_whole

GROUPS_PER_SPLIT = 10_000_000  # train seeds available (synth.SPLITS)


TOWER_FLAGS = ("width", "layers", "patch_size", "head_width", "stem_mixing")


def is_timm_config(config: dict) -> bool:
    """Whether ``config`` names a timm tower (its architecture is fixed by its registration)."""
    return "timm_model_name" in config["vision_cfg"]


def group_variants(group: int, small: int) -> list[int]:
    """The variants of each scene in a batch: 0..group-small-1, then ``small`` of 5, 10, ...
    (they keep the large shape); ``ValueError`` where that would repeat or lack a variant."""
    if not 0 <= small < group or (small and group > 5):
        raise ValueError(f"small-shape variants {small} must be in [0, group {group} <= 5)")
    return [*range(group - small), *(5 * k for k in range(1, small + 1))]


def check_options(args, error) -> None:
    """Refuse option values that would fail (or silently repeat variants) after the run starts."""
    try:
        group_variants(args.group, args.small_variants)
    except ValueError as problem:
        error(f"--small-variants: {problem}")
    if not 0 <= args.patch_dropout < 1:
        error("--patch-dropout takes a share in [0, 1)")
    if args.image_size < 8:
        error("--image-size must be at least 8")


def model_config(args, error) -> dict:
    """The package's config ``--config`` (tiny-synth) with the command line's overrides; ``error``
    (``parser.error``) refuses tower flags for a timm tower, which would be silently ignored."""
    path = Path(args.config)
    if path.suffix != ".json":
        path = Path(str(files("clip_surgery").joinpath(f"data/models/{args.config}.json")))
    config = json.loads(path.read_text())
    if is_timm_config(config):  # tiny-synth-siglip: a timm MAP-head tower
        flags = [f"--{k.replace('_', '-')}" for k in TOWER_FLAGS if getattr(args, k)]
        flags += ["--stem conv"] * (args.stem != "patch") + ["--pool avg"] * (args.pool != "tok")
        flags += ["--image-size"] * (args.image_size != synth.SIZE)
        given = ", ".join(flags)
        if given:
            error(f"{args.config} names a timm tower (its architecture is fixed): drop {given}")
        from clip_surgery.loading import register_bundled_towers

        register_bundled_towers()
        return config
    vision = config["vision_cfg"]
    for key in ("width", "layers", "patch_size", "head_width"):
        value = getattr(args, key)
        if value is not None:
            vision[key] = value
    vision["image_size"] = args.image_size  # explicit: the package's config is stage 3's 160 px
    if args.image_size % vision["patch_size"]:
        error(f"--image-size {args.image_size} is not a multiple of the patch size")
    vision["pool_type"] = args.pool  # explicit: the package's config pools by average
    return config


def build_model(
    config: dict, seed: int, positions: str = "random", stem: str = "patch", mixing: int = 0
) -> torch.nn.Module:
    """A randomly initialised open_clip CLIP of ``config``.

    ``positions="sincos"`` starts the (still learnable) positional table of a square ViT grid at
    the fixed 2-D sine-cosine embedding of MAE (He et al., CVPR 2022), which gives patches their
    neighbourhood from the first step; "random" keeps open_clip's random table.
    """
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**config)
    if stem == "conv":
        from clip_surgery.stem import STEM_CHANNELS, ConvStem

        convs = int(math.log2(config["vision_cfg"]["patch_size"]))  # stride = patch size
        if not 1 <= convs <= len(STEM_CHANNELS):
            raise SystemExit(f"--stem conv takes patch sizes 2 to {2 ** len(STEM_CHANNELS)}")
        channels = STEM_CHANNELS[len(STEM_CHANNELS) - convs :]
        model.visual.conv1 = ConvStem(model.visual.conv1.out_channels, channels, mixing)
    trunk = getattr(model.visual, "trunk", None)
    if trunk is not None:  # a timm tower: its table may also hold CLS and register rows
        table, prefix = trunk.pos_embed[0], 0 if trunk.no_embed_class else trunk.num_prefix_tokens
    else:
        table, prefix = model.visual.positional_embedding, 1
    if positions == "sincos":
        from open_clip.pos_embed import get_2d_sincos_pos_embed

        grid = math.isqrt(table.shape[0] - prefix)
        sincos = get_2d_sincos_pos_embed(table.shape[1], grid)
        table.data[prefix:].copy_(torch.from_numpy(sincos).float())
        table.data[:prefix] = 0  # as MAE's table: no position for CLS (and registers)
    return model


def drop_patches(model: torch.nn.Module, share: float, error) -> None:
    """Train ``model`` dropping a random ``share`` of each image's patch tokens (FLIP: Li et al.,
    "Scaling Language-Image Pre-training via Masking", CVPR 2023; open_clip's ``PatchDropout``,
    an identity in eval mode), so no token can count on the others being there."""
    from open_clip.transformer import PatchDropout

    if not 0 < share < 1 or not hasattr(model.visual, "patch_dropout"):
        error("--patch-dropout takes a share in (0, 1) and an open_clip ViT tower")
    model.visual.patch_dropout = PatchDropout(share).train(model.training)


def to_tensor(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, S, S, 3]`` to CLIP-normalised float ``[B, 3, S, S]``."""
    tensor = images.permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(OPENAI_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD, device=images.device).view(1, 3, 1, 1)
    return (tensor - mean) / std


class Batches(torch.utils.data.Dataset):
    """Training batch ``step``: ``size / group`` train scenes, each in ``group`` variants.

    Scene ``k`` of step ``s`` is train scene ``s * size / group + k``; its variants are
    ``synth.make_scene(seed, v)`` for v in 0..group-1 (variant 0 is the scene itself), the last
    ``small`` of them replaced by 5, 10, ...: variants that keep the large shape and draw the
    small shapes' categories afresh (hard negatives for the small shapes). Returns uint8
    images ``[B, S, S, 3]``, tokens ``[B, L]`` and caption ids ``[B]`` (equal ids: equal
    captions).
    """

    def __init__(
        self,
        size: int,
        group: int,
        context_length: int,
        captions: str = "some",
        design: str | None = None,
        small: int = 0,
        image_size: int = synth.SIZE,
    ):
        if size % group:
            raise ValueError(f"batch size {size} is not a multiple of the group {group}")
        self.variants = group_variants(group, small)
        self.size, self.group, self.context_length = size, group, context_length
        self.captions, self.design, self.image_size = captions, design, image_size
        self.tokenizer = None

    def __len__(self) -> int:
        return GROUPS_PER_SPLIT // (self.size // self.group)

    def __getitem__(self, step: int):
        if self.tokenizer is None:
            self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=self.context_length)
        per_step = self.size // self.group
        scenes = [
            synth.make_scene(
                synth.scene_seed("train", step * per_step + k), variant, self.captions, self.design
            )
            for k in range(per_step)
            for variant in self.variants
        ]
        captions = [s.caption for s in scenes]
        first = {}
        ids = torch.tensor([first.setdefault(c, len(first)) for c in captions])
        images = torch.from_numpy(np.stack([self.resized(s.image) for s in scenes]))
        return images, self.tokenizer(captions), ids

    def resized(self, image: np.ndarray) -> np.ndarray:
        """``image`` at the model's input size, resized as ``clip_surgery``'s preprocess does."""
        if self.image_size == synth.SIZE:
            return image
        return np.asarray(resize_whole(Image.fromarray(image), self.image_size))


def contrastive_loss(image, text, scale, same, kind: str, bias=None) -> torch.Tensor:
    """CLIP's symmetric softmax loss with identical captions as shared positives, or SigLIP's.

    ``same[i, j]``: captions i and j are identical (always true on the diagonal). Softmax: the
    cross-entropy of each row (images to texts) and column (texts to images) against the
    uniform distribution over its positives. Sigmoid: mean over rows of the summed
    ``-log sigmoid(+-(scale * cosine + bias))`` (Zhai et al., ICCV 2023).
    """
    logits = scale * image @ text.T
    if kind == "sigmoid":
        signs = same.float() * 2 - 1
        return -F.logsigmoid(signs * (logits + bias)).sum() / len(logits)
    target = same.float() / same.float().sum(dim=1, keepdim=True)
    rows = -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    columns = -(target * F.log_softmax(logits.T, dim=1)).sum(dim=1).mean()
    return (rows + columns) / 2


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))


def save_loss_curve(losses: list[float], path: Path, title: str) -> None:
    """The training loss (and its moving average) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot(losses, alpha=0.35, label="batch loss")
    window = max(len(losses) // 50, 1)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    axis.plot(np.arange(window - 1, len(losses)), smooth, label=f"mean of {window}")
    axis.set_xlabel("step")
    axis.set_ylabel("contrastive loss")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def evaluate(model, tokenizer, count: int, pointing_count: int, design: str) -> dict:
    """Zero-shot accuracy and the pointing game (raw, clip_surgery) on validation scenes of
    ``design`` (the training scenes')."""
    wrapped = clip_surgery.wrap(model, tokenizer, name="tiny-synth")
    result = {"val_zero_shot": synth.zero_shot_accuracy(wrapped, "val", count, design)}
    for method in ("raw", "clip_surgery"):  # clip_surgery's default depth fits any tower
        game = synth.pointing_game(wrapped, method, "val", pointing_count, design=design)
        result[f"val_pointing_{method}"] = round(game["all"], 4)
        result[f"val_pointing_{method}_large"] = round(game["large"], 4)
        result[f"val_background_peak_{method}"] = round(game["background_peak"], 4)
    return result


def save_weights(
    model, path: Path, step: int, losses: list[float], extra: dict, schedule_start: int = 0
) -> None:
    """fp16 weights; metadata: the step reached, where the schedule began, the loss history
    and ``extra`` (JSON)."""
    state = {k: v.detach().half().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "step": str(step),
        "schedule_start": str(schedule_start),
        "losses": json.dumps([round(v, 4) for v in losses]),
        "extra": json.dumps(extra),
    }
    save_file(state, str(path), metadata=metadata)


def refine_grid(state: dict, model) -> dict:
    """Saved ViT weights for ``model``'s token grid.

    A ``p``-px patch kernel for ``p/2``-px patches: a ``p/2`` kernel summing each 2 x 2 block of
    the ``p`` kernel sees a scene exactly as the old model saw it upsampled twice (nearest). The
    positional table, when ``model``'s grid differs (finer patches or a larger input), is resized
    bilinearly to it (patch-size resizing in the spirit of FlexiViT, Beyer et al., CVPR 2023).
    """
    if "visual.positional_embedding" not in state:  # a timm tower: no grid refinement
        return state
    wanted = model.state_dict()
    state = dict(state)
    kernel = state.get("visual.conv1.weight")
    if kernel is not None and kernel.shape != wanted["visual.conv1.weight"].shape:
        out, channels, size, _ = kernel.shape
        if size != 2 * wanted["visual.conv1.weight"].shape[-1]:
            shape = tuple(wanted["visual.conv1.weight"].shape)
            raise ValueError(f"cannot turn patches {tuple(kernel.shape)} into {shape}")
        state["visual.conv1.weight"] = kernel.reshape(
            out, channels, size // 2, 2, size // 2, 2
        ).sum(dim=(3, 5))
    table = state["visual.positional_embedding"]
    rows = wanted["visual.positional_embedding"].shape[0]
    if table.shape[0] != rows:
        grid, new = math.isqrt(table.shape[0] - 1), math.isqrt(rows - 1)
        if new < grid:  # a coarser grid would throw away what the weights learnt
            raise ValueError(
                f"these weights have a {grid} x {grid} token grid, the run {new} x {new}: pass "
                "the --image-size (and --patch-size) they were trained with"
            )
        patches = table[1:].T.reshape(1, -1, grid, grid)
        patches = F.interpolate(patches, size=(new, new), mode="bilinear", align_corners=False)
        state["visual.positional_embedding"] = torch.cat([table[:1], patches[0].flatten(1).T])
    return state


def restore(
    path: Path, model, optimizer, bias, image_size: int
) -> tuple[int, list[float], int, str | None]:
    """Resume from ``checkpoint.pt`` (everything; trained at ``image_size`` or refused) or fp16
    safetensors (weights; new optimizer; a model with half the patch size or a larger input gets
    converted weights, see ``refine_grid``). Returns the step, the losses, the schedule's start
    and the scene design a ``checkpoint.pt`` was trained on (runs before designs: outline; fp16
    weights: ``None``, they may start any design). A mismatch raises ``ValueError``."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            state = {k: handle.get_tensor(k).float() for k in handle.keys()}  # noqa: SIM118 (safe_open is no dict)
        model.load_state_dict(refine_grid(state, model))
        extra = json.loads(metadata.get("extra", "{}"))
        if bias is not None and "logit_bias" in extra:
            bias.data.fill_(extra["logit_bias"])
        step, losses = int(metadata.get("step", 0)), json.loads(metadata.get("losses", "[]"))
        return step, losses, int(metadata.get("schedule_start", 0)), None
    saved = torch.load(path, map_location="cpu", weights_only=False)
    trained_at = saved.get("args", {}).get("image_size") or synth.SIZE  # before the flag: 64
    if trained_at != image_size:  # a run continues at its own input size
        raise ValueError(f"{path} was trained at {trained_at} px; add --image-size {trained_at}")
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    if bias is not None:
        bias.data.copy_(saved["bias"])
    design = saved.get("args", {}).get("design", "outline")
    return saved["step"], saved["losses"], saved.get("schedule_start", 0), design


def main() -> None:
    """Train (or resume), evaluate, save weights, config, metrics and the loss curve."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/tiny-synth"))
    parser.add_argument(
        "--config",
        default="tiny-synth",
        help="architecture: a config of the package's data/models (tiny-synth, tiny-synth-siglip: "
        "MAP head, no CLS) or an open_clip config JSON file",
    )
    parser.add_argument("--steps", type=int, default=6000, help="length of the schedule")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--group", type=int, default=4, help="variants per scene in a batch")
    parser.add_argument("--loss", choices=("softmax", "sigmoid"), default="softmax")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1, help="scene-generating processes")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--patch-size", type=int, default=None)
    parser.add_argument("--head-width", type=int, default=None)
    parser.add_argument(
        "--positions",
        choices=("sincos", "random"),
        default="sincos",
        help="initial positional table of the ViT (learnable either way)",
    )
    parser.add_argument(
        "--stem",
        choices=("patch", "conv"),
        default="patch",
        help="patch embedding: one patchify convolution, or early convolutions (stem.ConvStem)",
    )
    parser.add_argument(
        "--stem-mixing", type=int, default=0, help="stride-1 3x3 convolutions ending the stem"
    )
    parser.add_argument(
        "--captions",
        choices=synth.CAPTION_MODES,
        default="some",
        help="captions name the k largest shapes (k random), every shape, or k shapes drawn in "
        "proportion to their visible pixels (area)",
    )
    parser.add_argument(
        "--design",
        choices=synth.DESIGNS,
        default=synth.DESIGN,
        help="scenes whose shapes show their category by outline alone, or also by a material "
        "(synth.MATERIALS); validation uses the same design",
    )
    parser.add_argument(
        "--pool",
        choices=("tok", "avg"),
        default="tok",
        help="image embedding: the CLS token, or the mean of the patch tokens (open_clip ViT)",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=synth.SIZE,
        help="the tower's input size (default: the scenes' 64 px, whatever the config says); "
        "scenes are resized to it as clip_surgery's preprocess does: a finer token grid at the "
        "same patch size",
    )
    parser.add_argument(
        "--small-variants",
        type=int,
        default=0,
        help="of each scene's --group variants, this many keep the large shape and change only "
        "the small shapes' categories",
    )
    parser.add_argument(
        "--patch-dropout",
        type=float,
        default=0.0,
        help="share of patch tokens each training image drops (FLIP; open_clip's PatchDropout); "
        "no effect at evaluation, not part of the written config",
    )
    parser.add_argument("--resume", type=Path, default=None, help="checkpoint.pt or .safetensors")
    parser.add_argument(
        "--new-schedule",
        action="store_true",
        help="with --resume: warm-up and cosine run from the resumed step to --steps",
    )
    parser.add_argument("--max-minutes", type=float, default=None, help="stop this stage then")
    parser.add_argument(
        "--stop-step",
        type=int,
        default=None,
        help="stop this stage after this step, counted from the run's start as --steps is "
        "(the schedule still runs to --steps)",
    )
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=0, help="validation every N steps")
    parser.add_argument("--eval-count", type=int, default=1000)
    parser.add_argument("--pointing-count", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    check_options(args, parser.error)
    config = model_config(args, parser.error)
    args.out.mkdir(parents=True, exist_ok=True)
    name = Path(args.config).stem  # tiny-synth, or the config file's name
    (args.out / f"{name}.json").write_text(json.dumps(config, indent=4) + "\n")
    model = build_model(config, args.seed, args.positions, args.stem, args.stem_mixing).to(device)
    if args.patch_dropout:
        drop_patches(model, args.patch_dropout, parser.error)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model.context_length)
    bias = (
        torch.nn.Parameter(torch.tensor(-10.0, device=device)) if args.loss == "sigmoid" else None
    )
    if bias is not None:  # SigLIP's initialisation: t = 10, b = -10
        model.logit_scale.data.fill_(math.log(10))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": other + ([bias] if bias is not None else []), "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    start, losses, schedule_start = 0, [], 0
    if args.resume is not None:
        try:
            resumed = restore(args.resume, model, optimizer, bias, args.image_size)
        except ValueError as error:
            parser.error(str(error))
        start, losses, schedule_start, trained_on = resumed
        if trained_on not in (None, args.design):  # a run continues on its own scenes
            parser.error(
                f"{args.resume} was trained on the {trained_on} design; add --design {trained_on}"
            )
        losses = losses[:start]
        schedule_start = start if args.new_schedule else schedule_start
        print(f"resumed from {args.resume} at step {start}", file=sys.stderr)
    if args.stop_step is not None and not start < args.stop_step <= args.steps:
        parser.error(f"--stop-step must be in ({start}, {args.steps}]: after this run's start")
    data = torch.utils.data.DataLoader(
        Batches(
            args.batch_size,
            args.group,
            model.context_length,
            args.captions,
            args.design,
            args.small_variants,
            args.image_size,  # a timm tower refuses any but the scenes' size
        ),
        batch_size=None,
        sampler=range(start, args.steps),
        num_workers=args.workers,
        prefetch_factor=4 if args.workers else None,
        pin_memory=device.type == "cuda",
    )
    history, started, step = [], time.perf_counter(), start
    stopped_early = False

    def checkpoint(step: int) -> None:
        extra = {"logit_bias": float(bias)} if bias is not None else {}
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "bias": bias.detach().cpu() if bias is not None else None,
                "step": step,
                "losses": losses,
                "schedule_start": schedule_start,
                "args": vars(args) | {"out": str(args.out), "resume": str(args.resume)},
            },
            args.out / "checkpoint.pt",
        )
        save_weights(model, args.out / f"{name}.safetensors", step, losses, extra, schedule_start)

    model.train()
    for step, (images, tokens, ids) in enumerate(data, start=start):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(
                step - schedule_start, args.steps - schedule_start, args.lr, args.warmup
            )
        images = to_tensor(images.to(device, non_blocking=True))
        tokens, ids = tokens.to(device, non_blocking=True), ids.to(device, non_blocking=True)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            image_features, text_features, scale = model(images, tokens)
        same = ids[:, None] == ids[None, :]
        loss = contrastive_loss(
            image_features.float(), text_features.float(), scale.float(), same, args.loss, bias
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        elapsed = time.perf_counter() - started
        if (step + 1) % args.log_every == 0 or step == start:
            rate = (step + 1 - start) / elapsed
            print(
                f"step {step + 1}/{args.steps} loss {np.mean(losses[-50:]):.4f} "
                f"scale {scale.item():.1f} lr {optimizer.param_groups[0]['lr']:.2e} "
                f"{rate:.2f} steps/s {elapsed / 60:.1f} min",
                file=sys.stderr,
                flush=True,
            )
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            model.eval()
            found = evaluate(model, tokenizer, 500, args.pointing_count, args.design)
            history.append({"step": step + 1, **found})
            print(json.dumps(history[-1]), file=sys.stderr, flush=True)
            model.train()
        if (step + 1) % args.checkpoint_every == 0:
            checkpoint(step + 1)
        timed_out = args.max_minutes is not None and elapsed > args.max_minutes * 60
        if timed_out or (args.stop_step is not None and step + 1 >= args.stop_step):
            stopped_early = step + 1 < args.steps
            break
    reached = step + 1 if losses[start:] else start
    seconds = time.perf_counter() - started
    checkpoint(reached)
    model.eval()
    timm = is_timm_config(config)
    metrics = {
        "config": config,
        "steps": args.steps,
        "reached_step": reached,
        "finished": not stopped_early and reached >= args.steps,
        "batch_size": args.batch_size,
        "group": args.group,
        "positions": args.positions,
        "stem": None if timm else args.stem,  # a timm tower: its own
        "stem_mixing": None if timm else args.stem_mixing,
        "pool": None if timm else args.pool,
        "patch_dropout": args.patch_dropout,
        "image_size": config["vision_cfg"].get("image_size"),
        "small_variants": args.small_variants,
        "captions": args.captions,
        "design": args.design,
        "loss": args.loss,
        "lr": args.lr,
        "warmup": args.warmup,
        "weight_decay": args.weight_decay,
        "seed": args.seed,
        "device": str(device)
        + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""),
        "threads": args.threads,
        "workers": args.workers,
        "resumed_from": str(args.resume) if args.resume else None,
        "new_schedule_from": schedule_start,
        "stage_seconds": round(seconds, 1),
        "final_loss": float(np.mean(losses[-50:])),
        "history": history,
        "torch": torch.__version__,
    }
    if metrics["finished"]:
        metrics |= evaluate(model, tokenizer, args.eval_count, args.pointing_count, args.design)
        metrics["eval_count"] = args.eval_count
    (args.out / f"{name}.metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    save_loss_curve(losses, args.out / f"{name}-loss.png", f"{name} training")
    print(json.dumps({k: v for k, v in metrics.items() if k != "history"}, indent=2))


if __name__ == "__main__":
    main()
