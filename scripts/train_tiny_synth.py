"""Train tiny-synth, the small CLIP shipped with clip-surgery, from scratch on CPU.

Contrastive (CLIP) loss with a learnable temperature on procedurally generated captioned scenes
(``clip_surgery.synth``; every batch is new, seeded, so the run is reproducible). Writes the
fp16 safetensors weights, a metrics JSON (zero-shot accuracy on the validation and test
splits) and the loss curve as PNG.

Run: ``.venv/bin/python scripts/train_tiny_synth.py --out build/tiny-synth`` and copy
``tiny-synth.safetensors`` / ``tiny-synth.metrics.json`` to ``src/clip_surgery/data/models/``.
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
from safetensors.torch import save_file
from tqdm import tqdm

import clip_surgery
from clip_surgery import synth
from clip_surgery.images import OPENAI_MEAN, OPENAI_STD

CONFIG = files("clip_surgery").joinpath("data/models/tiny-synth.json")


def build_model(seed: int) -> torch.nn.Module:
    """A randomly initialised tiny-synth (open_clip config from the package)."""
    torch.manual_seed(seed)
    open_clip.add_model_config(Path(str(CONFIG)))
    return open_clip.create_model("tiny-synth", pretrained=None)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[B, S, S, 3]`` to CLIP-normalised ``[B, 3, S, S]``."""
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    return (tensor - mean) / std


def batch(step: int, size: int, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Training batch ``step``: scenes with seeds step*size .. (step+1)*size of the train split."""
    scenes = synth.scenes("train", size, start=step * size)
    images = to_tensor(np.stack([s.image for s in scenes]))
    return images, tokenizer([s.caption for s in scenes])


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))


def save_loss_curve(losses: list[float], path: Path) -> None:
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
    axis.set_title("tiny-synth training")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    """Train, evaluate, save weights, metrics and the loss curve."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/tiny-synth"))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-count", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    model = build_model(args.seed)
    model.train()
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model.context_length)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": other, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    losses, started = [], time.perf_counter()
    progress = tqdm(range(args.steps), file=sys.stderr, unit="step")
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        images, tokens = batch(step, args.batch_size, tokenizer)
        image_features, text_features, scale = model(images, tokens)
        logits = scale * image_features @ text_features.T
        target = torch.arange(len(logits))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        progress.set_postfix(loss=f"{loss.item():.3f}", scale=f"{scale.item():.1f}")
    seconds = time.perf_counter() - started
    model.eval()
    wrapped = clip_surgery.wrap(model, tokenizer, name="tiny-synth")
    metrics = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "threads": args.threads,
        "train_seconds": round(seconds, 1),
        "final_loss": float(np.mean(losses[-50:])),
        "val_zero_shot_accuracy": synth.zero_shot_accuracy(wrapped, "val", args.eval_count),
        "test_zero_shot_accuracy": synth.zero_shot_accuracy(wrapped, "test", args.eval_count),
        "eval_count": args.eval_count,
        "torch": torch.__version__,
    }
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(args.out / "tiny-synth.safetensors"))
    (args.out / "tiny-synth.metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    save_loss_curve(losses, args.out / "tiny-synth-loss.png")
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
