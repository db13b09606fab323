"""The training script of tiny-synth: seeded, resumable, prints progress, writes what it says."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import clip_surgery
from clip_surgery import synth

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "--stem", "conv", "--pool", "avg", "--layers", "1", "--width", "64", "--head-width", "32",
    "--steps", "4", "--batch-size", "10", "--group", "5", "--warmup", "1", "--workers", "0",
    "--eval-count", "10", "--pointing-count", "4", "--log-every", "1",
]  # fmt: skip


def load_trainer():
    """``scripts/train_tiny_synth.py`` as a module."""
    spec = importlib.util.spec_from_file_location("trainer", ROOT / "scripts/train_tiny_synth.py")
    trainer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trainer)
    return trainer


def train(out: Path, *extra: str) -> str:
    """Run the script; its standard output and error."""
    command = [sys.executable, str(ROOT / "scripts/train_tiny_synth.py"), "--out", str(out)]
    done = subprocess.run(
        [*command, *SMALL, *extra], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout + done.stderr


def test_a_run_stopped_and_resumed_gives_the_uninterrupted_runs_weights(tmp_path):
    """Four steps in one go, and a run stopped by ``--max-minutes`` (after one step) or by
    ``--stop-step 2`` then resumed from its ``checkpoint.pt``: bit-identical fp16 weights
    (seeded batches, restored optimizer). Resuming it on another scene design is refused."""
    log = train(tmp_path / "whole")
    assert "step 4/4" in log
    train(tmp_path / "part", "--max-minutes", "0.00001")
    stopped = json.loads((tmp_path / "part/tiny-synth.metrics.json").read_text())
    assert stopped["reached_step"] == 1 and not stopped["finished"]
    command = [sys.executable, str(ROOT / "scripts/train_tiny_synth.py"), "--out"]
    other = [*command, str(tmp_path / "part"), *SMALL, "--design", "outline", "--resume"]
    refused = subprocess.run(
        [*other, str(tmp_path / "part/checkpoint.pt")], capture_output=True, text=True, timeout=300
    )
    assert refused.returncode == 2 and "trained on the material design" in refused.stderr
    train(tmp_path / "part", "--resume", str(tmp_path / "part/checkpoint.pt"))
    train(tmp_path / "steps", "--stop-step", "2")
    stopped = json.loads((tmp_path / "steps/tiny-synth.metrics.json").read_text())
    assert stopped["reached_step"] == 2 and not stopped["finished"]
    train(tmp_path / "steps", "--resume", str(tmp_path / "steps/checkpoint.pt"))
    whole = load_file(tmp_path / "whole/tiny-synth.safetensors")
    for part in ("part", "steps"):
        resumed = load_file(tmp_path / f"{part}/tiny-synth.safetensors")
        assert whole.keys() == resumed.keys()
        assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    metrics = json.loads((tmp_path / "whole/tiny-synth.metrics.json").read_text())
    assert metrics["finished"] and metrics["pool"] == "avg" and metrics["stem"] == "conv"
    assert 0 <= metrics["val_zero_shot"] <= 1 and "val_pointing_clip_surgery" in metrics


def test_the_written_model_loads_as_an_average_pooled_vit_with_its_stem(tmp_path):
    """The config and fp16 weights it writes load through ``clip_surgery.load`` (stem
    installed, average pooling) and give the saved model's image embedding."""
    train(tmp_path / "run", "--steps", "1")
    config = json.loads((tmp_path / "run/tiny-synth.json").read_text())
    assert config["vision_cfg"]["pool_type"] == "avg" and config["vision_cfg"]["layers"] == 1
    (tmp_path / "run/train-test-tiny.json").write_text(json.dumps(config))
    import open_clip

    open_clip.add_model_config(tmp_path / "run/train-test-tiny.json")
    model = clip_surgery.load(
        "train-test-tiny", pretrained=str(tmp_path / "run/tiny-synth.safetensors")
    )
    assert type(model.backbone.vision.head).__name__ == "MeanHead"
    assert len(model.backbone.vision.visual.conv1) == 7  # 3 x (conv, GELU) and the 1 x 1
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = model.clip.encode_image(images)
    encoded = model.encode(images, "raw")
    assert torch.allclose(encoded.pooled, expected, atol=1e-5)


def test_a_stop_step_before_the_runs_start_is_refused(tmp_path):
    """``--stop-step`` at or before the step a run starts from (or past ``--steps``) is an error
    with the valid range, not one more step of training."""
    command = [sys.executable, str(ROOT / "scripts/train_tiny_synth.py"), "--out", str(tmp_path)]
    for stop in ("0", "5"):
        done = subprocess.run(
            [*command, *SMALL, "--stop-step", stop], capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 2 and "--stop-step must be in (0, 4]" in done.stderr
        assert not (tmp_path / "checkpoint.pt").exists()


def test_tower_flags_are_refused_for_a_timm_tower(tmp_path):
    """A timm tower's architecture is fixed by its registration: ``--stem conv`` or a size flag
    with ``--config tiny-synth-siglip`` is an error naming the flags, not silently ignored."""
    out = tmp_path / "run"
    command = [sys.executable, str(ROOT / "scripts/train_tiny_synth.py"), "--out", str(out)]
    flags = ["--config", "tiny-synth-siglip", "--stem", "conv", "--layers", "3"]
    done = subprocess.run([*command, *flags], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "drop --layers, --stem conv" in done.stderr
    assert not out.exists()


def test_the_token_probe_groups_tokens_by_object_not_by_category():
    """``scripts/probe_tokens.py``: a token of a small shape whose category the large shape also
    has is in neither size group (known answer on a hand-made 2 x 2 token scene)."""
    spec = importlib.util.spec_from_file_location("probe", ROOT / "scripts/probe_tokens.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    circle, square = synth.SHAPES.index("circle") + 1, synth.SHAPES.index("square") + 1
    labels = np.zeros((64, 64), np.uint8)
    labels[:32, :32] = circle  # token 0: the large circle
    labels[:32, 32:] = square  # token 1: a small square
    labels[32:, :32] = circle  # token 2: a small circle (category shared with the large shape)
    objects = [
        synth.SceneObject("circle", "red", "plain", "large", 1024),
        synth.SceneObject("square", "red", "plain", "small", 1024),
        synth.SceneObject("circle", "red", "plain", "small", 1024),
    ]
    scene = synth.Scene(np.zeros((64, 64, 3), np.uint8), labels, "", objects)
    share, group = probe._token_labels(scene, 2)
    assert share.argmax(1).tolist() == [circle, square, circle, 0]
    assert group.tolist() == [0, 1, 0, 0]
    scene.objects = objects[:2]  # no small circle: the circle tokens are the large shape's
    assert probe._token_labels(scene, 2)[1].tolist() == [2, 1, 2, 0]


def test_batches_draw_the_chosen_scene_design():
    """``--design``: a training batch holds the scenes (and their variants) of that design."""
    trainer = load_trainer()
    for design in synth.DESIGNS:
        images, _, _ = trainer.Batches(10, 5, 77, design=design)[3]
        expected = [
            synth.make_scene(synth.scene_seed("train", 3 * 2 + k), variant, design=design).image
            for k in range(2)
            for variant in range(5)
        ]
        assert np.array_equal(images.numpy(), np.stack(expected))


def test_small_shape_variants_keep_the_large_shape():
    """``--small-variants 2``: each scene's group ends with variants 5 and 10, which keep the large
    shape (category, colour, texture) and draw only the small shapes' categories afresh; identical
    captions share an id (shared positives of the loss)."""
    trainer = load_trainer()
    batches = trainer.Batches(10, 5, 77, small=2)
    assert batches.variants == [0, 1, 2, 5, 10]
    changed = 0
    for step in range(4):
        images, _, ids = batches[step]
        for k in range(2):
            seed = synth.scene_seed("train", step * 2 + k)
            scenes = [synth.make_scene(seed, v) for v in (0, 1, 2, 5, 10)]
            expected = np.stack([s.image for s in scenes])
            assert np.array_equal(images[5 * k : 5 * k + 5].numpy(), expected)
            first = scenes[0].objects
            for scene in scenes[3:]:
                large = scene.objects[0]
                assert (large.shape, large.colour) == (first[0].shape, first[0].colour)
                changed += [o.shape for o in scene.objects[1:]] != [o.shape for o in first[1:]]
            captions = [s.caption for s in scenes]
            same = ids[5 * k : 5 * k + 5, None] == ids[None, 5 * k : 5 * k + 5]
            assert same.tolist() == [[a == b for b in captions] for a in captions]
    assert changed  # some small shape did change
    for group, small in ((5, -1), (5, 5), (6, 1)):  # group 6 would repeat variant 5
        with pytest.raises(ValueError, match="small-shape variants"):
            trainer.Batches(12 if group == 6 else 10, group, 77, small=small)


@pytest.mark.parametrize(
    "flags",
    [
        ["--small-variants", "5"],
        ["--patch-dropout", "1"],
        ["--image-size", "100"],
        ["--config", "tiny-synth-siglip", "--image-size", "96"],
    ],
)
def test_bad_training_options_are_refused_before_anything_is_written(tmp_path, flags):
    """Out-of-range variants or dropout, an input size the patches do not tile, a size flag for
    a timm tower: exit 2, no output folder."""
    out = tmp_path / "run"
    command = [sys.executable, str(ROOT / "scripts/train_tiny_synth.py"), "--out", str(out)]
    done = subprocess.run([*command, *flags], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "error:" in done.stderr, done.stderr[-500:]
    assert not out.exists()


def test_patch_dropout_drops_tokens_in_training_only():
    """``--patch-dropout 0.5``: a training forward sees half of the 64 patch tokens (plus CLS);
    in eval mode (what is written and evaluated) the tower is the one without dropout."""
    trainer = load_trainer()
    config = json.loads((ROOT / "src/clip_surgery/data/models/tiny-synth.json").read_text())
    config["vision_cfg"]["image_size"] = 64  # stage 1's input (the package's config: 160)
    model = trainer.build_model(config, seed=0).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model.encode_image(images)
    seen = []
    model.visual.ln_pre.register_forward_hook(lambda _, inputs, __: seen.append(inputs[0].shape))

    def refuse(message):
        raise SystemExit(message)

    trainer.drop_patches(model, 0.5, refuse)
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), before)
        model.train()
        model.encode_image(images)
    assert [shape[1] for shape in seen] == [65, 33]
    for share in (0.0, 1.0):
        with pytest.raises(SystemExit, match="patch-dropout"):
            trainer.drop_patches(model, share, refuse)


def test_a_larger_input_trains_on_scenes_resized_as_the_package_preprocesses():
    """``--image-size 96``: the batch's scenes are resized exactly as ``clip_surgery``'s
    preprocess resizes a scene for that model (what it is evaluated on)."""
    trainer = load_trainer()
    from PIL import Image

    from clip_surgery.images import preprocess

    images, _, _ = trainer.Batches(10, 5, 77, image_size=96)[2]
    assert tuple(images.shape) == (10, 96, 96, 3)
    expected = torch.stack(
        [
            preprocess(Image.fromarray(synth.make_scene(synth.scene_seed("train", 4), v).image), 96)
            for v in range(5)
        ]
    )
    assert torch.allclose(trainer.to_tensor(images[:5]), expected, atol=1e-6)


def test_a_larger_input_resumes_a_smaller_runs_weights(tmp_path):
    """A 96 px run resumed from a 64 px run's weights: the 8 x 8 positional table is resized to
    12 x 12 (a table that is a ramp along the columns stays one along the columns, the CLS row
    is kept), the other weights are the saved ones, the written model loads at its native 96 px
    and records its size. Resuming its weights (or its checkpoint) at 64 px is refused."""
    train(tmp_path / "small", "--steps", "1")
    small = load_file(tmp_path / "small/tiny-synth.safetensors")
    trainer = load_trainer()
    config = json.loads((tmp_path / "small/tiny-synth.json").read_text())
    config["vision_cfg"]["image_size"] = 96
    big = trainer.build_model(config, seed=0, stem="conv")
    state = {k: v.float() for k, v in small.items()}
    width = state["visual.positional_embedding"].shape[1]
    columns = torch.arange(8.0).repeat(8)  # row-major 8 x 8 grid: the token's column
    state["visual.positional_embedding"][1:] = columns[:, None] * torch.ones(width)
    refined = trainer.refine_grid(state, big)
    table = refined["visual.positional_embedding"]
    assert table.shape[0] == 145 and torch.equal(table[0], state["visual.positional_embedding"][0])
    grid = table[1:, 0].reshape(12, 12)
    assert torch.allclose(grid, grid[:1].expand(12, -1))  # constant down each column
    assert (grid[0, 1:] >= grid[0, :-1]).all() and grid[0, -1] - grid[0, 0] > 6  # rising along
    assert all(torch.equal(refined[k], state[k]) for k in state if "positional" not in k)
    train(
        tmp_path / "big",
        "--image-size",
        "96",
        "--resume",
        str(tmp_path / "small/tiny-synth.safetensors"),
    )
    written = json.loads((tmp_path / "big/tiny-synth.json").read_text())
    assert written["vision_cfg"]["image_size"] == 96
    recorded = json.loads((tmp_path / "big/tiny-synth.metrics.json").read_text())
    assert (recorded["image_size"], recorded["small_variants"], recorded["patch_dropout"]) == (
        96,
        0,
        0,
    )
    command = [sys.executable, str(ROOT / "scripts/train_tiny_synth.py"), "--out"]
    for resumed, wanted in (("tiny-synth.safetensors", "--image-size"), ("checkpoint.pt", "96")):
        refused = subprocess.run(
            [
                *command,
                str(tmp_path / "again"),
                *SMALL,
                "--resume",
                str(tmp_path / "big" / resumed),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert refused.returncode == 2 and wanted in refused.stderr, refused.stderr[-500:]
    (tmp_path / "big/train-test-96.json").write_text(json.dumps(written))
    import open_clip

    open_clip.add_model_config(tmp_path / "big/train-test-96.json")
    model = clip_surgery.load(
        "train-test-96", pretrained=str(tmp_path / "big/tiny-synth.safetensors")
    )
    assert model.native_size == 96
    assert model.encode(torch.rand(1, 3, 96, 96), "raw").grid == (12, 12)
