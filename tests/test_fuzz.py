"""200 random, truncated or corrupted files through the loaders and the CLI: each ends in a
one-line error of the project's own types (exit code 2) or a correct result; never a traceback,
a hang, or output left behind by a failed run."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_vit, photo
from PIL import Image
from safetensors.torch import save
from tiny_datasets import make_coco2014, make_nus_wide, make_segmentation

from clip_surgery.cli import main
from clip_surgery.eval.datasets import SEGMENTATION

RNG = np.random.default_rng(2026)


def mutations(valid: bytes, count: int) -> list[bytes]:
    """Truncations, byte flips, random bodies behind the right magic, random and empty files."""
    out = []
    for index in range(count):
        kind = index % 5
        if kind == 0:
            out.append(valid[: int(RNG.integers(0, len(valid)))])
        elif kind == 1:
            data = bytearray(valid)
            for position in RNG.integers(0, min(len(data), 4096), size=int(RNG.integers(1, 9))):
                data[position] ^= int(RNG.integers(1, 256))
            out.append(bytes(data))
        elif kind == 2:
            out.append(valid[:8] + RNG.bytes(int(RNG.integers(0, 2000))))
        elif kind == 3:
            out.append(RNG.bytes(int(RNG.integers(1, 3000))))
        else:
            out.append(valid[: len(valid) // 2] + valid[len(valid) // 2 :][::-1])
    return out


def encoded(picture: Image.Image, fmt: str) -> bytes:
    stream = io.BytesIO()
    picture.save(stream, format=fmt)
    return stream.getvalue()


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> tuple[Path, bytes, bytes]:
    """A small OpenAI-style checkpoint, and its bytes as .pt and .safetensors."""
    state = {**make_vit(9, layers=2).state_dict(), "input_resolution": torch.tensor(224)}
    stream = io.BytesIO()
    torch.save(state, stream)
    path = tmp_path_factory.mktemp("fuzz") / "valid.pt"
    path.write_bytes(stream.getvalue())
    tensors = {k: v.contiguous() for k, v in state.items() if v.dim()}
    return path, stream.getvalue(), save(tensors)


def run(capsys, argv: list[str], out: Path) -> int:
    started = time.monotonic()
    code = main(argv)
    captured = capsys.readouterr()
    assert time.monotonic() - started < 120, argv
    assert code in (0, 2), argv
    if code == 2:
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("clip-surgery: error: "), captured.err
        assert not out.exists() or not any(out.rglob("*.png")), f"{out} has output"
    return code


def test_fuzzed_files(tmp_path, capsys, small_checkpoint):
    checkpoint, pt_bytes, safetensors_bytes = small_checkpoint
    image = tmp_path / "ok.png"
    photo((64, 48), seed=1).save(image)
    cases = 0
    outcomes = {"ok": 0, "error": 0}

    def record(code: int) -> None:
        nonlocal cases
        cases += 1
        outcomes["ok" if code == 0 else "error"] += 1

    # images (50): PNG, JPEG and WebP bytes, mutated, through `explain`
    valid_images = [encoded(photo((64, 48), seed=s), f) for s, f in ((2, "PNG"), (3, "JPEG"))]
    for index, data in enumerate(mutations(valid_images[0], 25) + mutations(valid_images[1], 25)):
        path = tmp_path / f"image{index}.{'png' if index < 25 else 'jpg'}"
        path.write_bytes(data)
        out = tmp_path / f"out-image{index}"
        argv = ["explain", str(path), "-t", "a", "--checkpoint", str(checkpoint), "--out",
                str(out), "--no-progress"]  # fmt: skip
        record(run(capsys, argv, out))

    # checkpoints (40): .pt and .safetensors, mutated, through `explain`
    for index, data in enumerate(mutations(pt_bytes, 20) + mutations(safetensors_bytes, 20)):
        path = tmp_path / f"weights{index}.{'pt' if index < 20 else 'safetensors'}"
        path.write_bytes(data)
        out = tmp_path / f"out-weights{index}"
        argv = ["explain", str(image), "-t", "a", "--checkpoint", str(path), "--out", str(out),
                "--no-progress"]  # fmt: skip
        record(run(capsys, argv, out))

    # label PNGs (40) through `score`
    root = tmp_path / "voc"
    keys = make_segmentation(root, "voc21", count=1)
    spec = SEGMENTATION["voc21"]
    label_path = root / spec.labels / f"{keys[0]}.png"
    valid_label = label_path.read_bytes()
    prediction = tmp_path / "pred"
    prediction.mkdir()
    clean = spec.read_label(label_path)
    Image.fromarray(np.where(clean == 255, 0, clean).astype(np.uint8)).save(prediction / "img0.png")
    for index, data in enumerate(mutations(valid_label, 40)):
        label_path.write_bytes(data)
        out = tmp_path / f"out-label{index}"
        argv = ["score", "--dataset", "voc21", "--root", str(root), "--pred", str(prediction),
                "--out", str(out)]  # fmt: skip
        record(run(capsys, argv, out))

    # class files (35) through `eval --dataset nus_wide`
    nus = tmp_path / "nus"
    make_nus_wide(nus, count=2)
    concepts = "\n".join(["sky", "animal", "water"]).encode()
    for index, data in enumerate(mutations(concepts, 35)):
        (nus / "Concepts81.txt").write_bytes(data)
        out = tmp_path / f"out-classes{index}"
        argv = ["eval", "--dataset", "nus_wide", "--root", str(nus), "--checkpoint",
                str(checkpoint), "--out", str(out), "--no-progress"]  # fmt: skip
        record(run(capsys, argv, out))

    # COCO annotation JSON (35) through `eval --dataset coco2014`
    coco = tmp_path / "coco"
    make_coco2014(coco, count=2)
    annotation = coco / "annotations/instances_val2014.json"
    valid_json = annotation.read_bytes()
    for index, data in enumerate(mutations(valid_json, 35)):
        annotation.write_bytes(data)
        out = tmp_path / f"out-json{index}"
        argv = ["eval", "--dataset", "coco2014", "--root", str(coco), "--checkpoint",
                str(checkpoint), "--out", str(out), "--no-progress"]  # fmt: skip
        record(run(capsys, argv, out))

    assert cases == 200
    assert outcomes["error"] >= 150, outcomes  # most mutations are caught, none crash
    print(json.dumps(outcomes))
