"""Seeded random CLIP models (every bias and norm perturbed) and checkpoint files for tests."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # set before huggingface_hub is imported
# The text-embedding disk cache of this test session (and its CLI subprocesses): never the
# user's own cache folder.
os.environ.setdefault("CLIP_SURGERY_CACHE", tempfile.mkdtemp(prefix="clip-surgery-tests-"))

import numpy as np
import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from PIL import Image

torch.set_num_threads(min(2, torch.get_num_threads()))

EMBED_DIM = 64
TEXT_CFG = dict(width=128, heads=2, layers=2)  # heads = width // 64, as the loader infers


def perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Randomise every bias, norm parameter and BatchNorm statistic, so none is a no-op."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            is_norm = any(part in name for part in ("ln_", "bn", "downsample.1", "ln_final"))
            if name.endswith("bias") or is_norm:
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.add_(0.1 * torch.randn(buffer.shape, generator=generator))
            elif name.endswith("running_var"):
                buffer.mul_(1 + 0.5 * torch.rand(buffer.shape, generator=generator))
    return model.eval()


def make_vit(seed: int = 0, layers: int = 8, width: int = 128, patch: int = 16) -> CLIP:
    """A small ViT CLIP (2 heads of 64) with seeded random weights."""
    torch.manual_seed(seed)
    vision = CLIPVisionCfg(layers=layers, width=width, patch_size=patch, image_size=224)
    model = CLIP(EMBED_DIM, vision, CLIPTextCfg(**TEXT_CFG), quick_gelu=True)
    return perturb(model, seed + 1)


def make_resnet(seed: int = 0) -> CLIP:
    """A small ModifiedResNet CLIP with seeded random weights."""
    torch.manual_seed(seed)
    vision = CLIPVisionCfg(layers=(1, 1, 1, 1), width=32, image_size=224)
    model = CLIP(EMBED_DIM, vision, CLIPTextCfg(**TEXT_CFG), quick_gelu=True)
    return perturb(model, seed + 1)


@pytest.fixture(scope="session")
def vit_model() -> CLIP:
    return make_vit(0)


@pytest.fixture(scope="session")
def resnet_model() -> CLIP:
    return make_resnet(0)


@pytest.fixture(scope="session")
def vit_checkpoint(tmp_path_factory, vit_model) -> str:
    """An OpenAI-format state dict file of the small ViT."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny-vit.pt"
    openai_keys = {  # OpenAI's state dicts carry these; they mark QuickGELU weights
        "input_resolution": torch.tensor(224),
        "context_length": torch.tensor(77),
        "vocab_size": torch.tensor(49408),
    }
    torch.save({**vit_model.state_dict(), **openai_keys}, path)
    return str(path)


def random_images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Normalised-looking random image batch [B, 3, H, W]."""
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def photo(size=(96, 64), seed: int = 0) -> Image.Image:
    """A random RGB PIL image of ``size`` = (width, height)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e|."""
    return float((actual - expected).abs().max() / expected.abs().max())


def best_text_agreement(
    maps: torch.Tensor, reference: torch.Tensor, margin: float = 0.01
) -> tuple[float, float, float]:
    """Maps ``[B, T, H, W]`` against reference maps: the share of clear pixels (the reference's
    two best texts differ by >= ``margin``), the share of those where the best text is the
    reference's, and that share over all pixels."""
    agree = maps.argmax(dim=1) == reference.argmax(dim=1)
    best_two = reference.topk(2, dim=1).values
    clear = best_two[:, 0] - best_two[:, 1] >= margin
    return (
        float(clear.float().mean()),
        float(agree[clear].float().mean()),
        float(agree.float().mean()),
    )
