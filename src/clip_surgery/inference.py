"""The inference context: eval semantics without touching the user's flags, grad off, autocast."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
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


@contextmanager
def inference(module: nn.Module, device: torch.device, grad: bool = False) -> Iterator[None]:
    """Eval semantics (flags restored after), no grad unless ``grad``, fp16 autocast on CUDA."""
    with eval_mode(module), torch.set_grad_enabled(grad):
        if device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.float16):
                yield
        else:
            yield
