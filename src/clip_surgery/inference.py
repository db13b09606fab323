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


PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}
"""Autocast dtypes on CUDA by name; fp32 runs without autocast. CPU always runs in fp32."""


def check_precision(precision: str) -> str:
    """``precision`` if it is a known name; OptionError otherwise."""
    if precision not in PRECISIONS:
        from .errors import OptionError

        raise OptionError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    return precision


def effective_precision(device: torch.device, precision: str) -> str:
    """What actually runs: the CUDA autocast dtype's name, or fp32 (CPU, or fp32 asked)."""
    return precision if device.type == "cuda" else "fp32"


@contextmanager
def inference(
    module: nn.Module, device: torch.device, grad: bool = False, precision: str = "fp16"
) -> Iterator[None]:
    """Eval semantics (flags restored after), no grad unless ``grad``, autocast on CUDA in
    ``precision`` (fp16, bf16; fp32 turns it off)."""
    dtype = PRECISIONS[check_precision(precision)]
    with eval_mode(module), torch.set_grad_enabled(grad):
        if device.type == "cuda" and dtype is not None:
            with torch.autocast("cuda", dtype=dtype):
                yield
        else:
            yield
