"""torchrun: two gloo processes on the CPU give what one process gives, and resume per shard."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_vit
from tiny_datasets import make_voc2007

import clip_surgery
from clip_surgery import distributed, synth
from clip_surgery.cli import main
from clip_surgery.errors import DistributedError
from clip_surgery.eval import runner

MODEL = ["--model", "tiny-synth", "--no-progress"]
IMAGES = "VOCdevkit/VOC2012/JPEGImages"


def torchrun(*argv: str, processes: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=N -m clip_surgery ARGV`` (gloo on the CPU)."""
    launcher = Path(sys.executable).with_name("torchrun")
    command = (
        [str(launcher)] if launcher.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    )
    package = str(Path(clip_surgery.__file__).parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([package, os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    launch = [f"--nproc_per_node={processes}", "--standalone", "-m", "clip_surgery"]
    return subprocess.run(
        [*command, *launch, *argv], env=env, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    """Six synthetic scenes in the VOC layout (dataset ``synthetic``)."""
    root = tmp_path_factory.mktemp("synthetic")
    synth.export_voc(root, count=6)
    return root


def read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image)


def test_segmentation_equals_one_process_and_resumes_per_shard(tmp_path, capsys, scenes):
    one, two, root = tmp_path / "one", tmp_path / "two", tmp_path / "data"
    shutil.copytree(scenes, root)  # one of its images is broken for a while below
    common = ["eval", "--dataset", "synthetic", "--root", str(root), *MODEL]
    assert main([*common, "--out", str(one / "out"), "--save-pred", str(one / "pred")]) == 0
    single_line = capsys.readouterr().out.strip().splitlines()[-1]
    argv = [*common, "--out", str(two / "out"), "--save-pred", str(two / "pred")]

    # Interrupted: rank 1 (images 1, 3, 5) fails on its third image, after two are saved.
    broken = root / IMAGES / "test_00005.png"
    original = broken.read_bytes()
    broken.write_bytes(b"not a png")
    try:
        failed = torchrun(*argv)
    finally:
        broken.write_bytes(original)
    assert failed.returncode != 0 and "cannot read image" in failed.stderr
    states = sorted(p.name for p in (two / "out").glob(".state-*"))
    assert states and all(name.endswith(("-rank0of2.npz", "-rank1of2.npz")) for name in states)
    rank1 = next((two / "out").glob(".state-*-rank1of2.npz"))
    assert np.load(rank1)["done"].tolist() == ["test_00001", "test_00003"]
    stamps = {key: (two / "pred" / f"{key}.png").stat() for key in ("test_00001", "test_00003")}

    resumed = torchrun(*argv)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.strip().splitlines()[-1] == single_line  # rank 0 alone prints
    assert resumed.stdout.count("mIoU:") == 1
    for key, stamp in stamps.items():  # done before the interruption: not predicted again
        after = (two / "pred" / f"{key}.png").stat()
        assert (after.st_ino, after.st_mtime_ns) == (stamp.st_ino, stamp.st_mtime_ns)
    name = "synthetic-clip_surgery-clip_surgery.json"
    expected = json.loads((one / "out" / name).read_text())
    found = json.loads((two / "out" / name).read_text())
    assert found["processes"] == 2 and found["images"] == expected["images"] == 6
    for key in ("miou", "aacc", "macc", "per_class_iou", "undefined_classes"):
        assert found[key] == expected[key], key
    assert not list((two / "out").glob(".state-*"))  # finished: every rank's state removed
    predictions = sorted(p.name for p in (one / "pred").iterdir())
    assert predictions == sorted(p.name for p in (two / "pred").iterdir())
    for file in predictions:
        assert np.array_equal(read_png(one / "pred" / file), read_png(two / "pred" / file))


def test_explain_folder_equals_one_process(tmp_path, scenes):
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(5):
        shutil.copy(scenes / IMAGES / f"test_{index:05d}.png", folder)
    argv = ["explain", str(folder), "--text", "circle", "square", "--batch-size", "2", *MODEL]
    # torchrun starts its ranks with OMP_NUM_THREADS=1; the single process computes with one
    # thread too, so the outputs may be compared byte for byte (another thread count changes
    # float rounding, and a jet colour at a bin edge with it)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    ran = torchrun(*argv, "--out", str(tmp_path / "two"))
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.count("wrote overlays for 5 image(s)") == 1
    one, two = (json.loads((tmp_path / n / "explain.json").read_text()) for n in ("one", "two"))
    relative = json.dumps(two["images"]).replace(str(tmp_path / "two"), str(tmp_path / "one"))
    assert json.loads(relative) == one["images"]  # same entries, in input order
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.png"))
    assert len(files) == 5 * 3
    assert files == sorted(
        p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*.png")
    )
    for file in files:
        assert (tmp_path / "one" / file).read_bytes() == (tmp_path / "two" / file).read_bytes()


class ThreadWorld:
    """``size`` ranks as threads of this process: ``rank()`` per thread, collectives meet at a
    barrier; enough to check what the runner shards and how it merges."""

    def __init__(self, monkeypatch, size: int):
        self.size, self.local = size, threading.local()
        self.slots: list = [None] * size
        self.meet = threading.Barrier(size, timeout=60)
        monkeypatch.setattr(distributed, "rank", lambda: self.local.rank)
        monkeypatch.setattr(distributed, "world_size", lambda: size)
        monkeypatch.setattr(distributed, "all_gather_objects", self.gather)
        monkeypatch.setattr(distributed, "all_reduce_sum", lambda a: sum(self.gather(a)))
        monkeypatch.setattr(distributed, "barrier", self.meet.wait)

    def gather(self, obj):
        self.slots[self.local.rank] = obj
        self.meet.wait()
        gathered = list(self.slots)
        self.meet.wait()
        return gathered

    def run(self, function) -> list:
        """``function()`` on every rank at once; each rank's return value."""
        results: list = [None] * self.size
        errors: list = []

        def work(rank: int) -> None:
            self.local.rank = rank
            try:
                results[rank] = function()
            except BaseException as error:  # re-raised below, after every thread ends
                errors.append(error)
                self.meet.abort()

        threads = [threading.Thread(target=work, args=(rank,)) for rank in range(self.size)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return results


def test_multilabel_scores_are_gathered_in_dataset_order(tmp_path, monkeypatch):
    make_voc2007(tmp_path, count=7)
    model = clip_surgery.wrap(make_vit(81))

    def evaluate() -> dict:
        return runner.evaluate_multilabel(model, "voc2007", tmp_path, method="raw", batch=2)

    alone = evaluate()
    ranks = ThreadWorld(monkeypatch, 3).run(evaluate)  # batches 0, 2, 4, 6 over 3 ranks: uneven
    for shared in ranks:
        assert shared["per_class_ap"] == alone["per_class_ap"] and shared["map"] == alone["map"]
        assert shared["processes"] == 3


def test_explainability_pairs_are_replayed_in_dataset_order(monkeypatch, scenes):
    model = clip_surgery.load("tiny-synth")

    def evaluate() -> dict:
        return runner.evaluate_explainability(model, "synthetic", scenes, method="raw")

    alone = evaluate()
    assert alone["pairs"] > 0
    for shared in ThreadWorld(monkeypatch, 4).run(evaluate):  # 6 images over 4 ranks
        for key in ("miou", "msc", "threshold", "pairs", "undefined_pairs"):
            assert shared[key] == alone[key], key  # the same float sums, not just close


def test_shards_are_disjoint_and_cover_every_item(monkeypatch):
    shards = ThreadWorld(monkeypatch, 3).run(lambda: distributed.shard(range(10)))
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]


def test_one_process_never_joins_a_group(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(distributed, "init", lambda device: pytest.fail("joined a group"))
    assert main(["methods"]) == 0
    assert distributed.shard([1, 2]) == [1, 2] and distributed.all_gather_objects(5) == [5]
    assert distributed.all_reduce_sum(np.arange(3)).tolist() == [0, 1, 2]
    assert distributed.is_main()


@pytest.mark.parametrize(
    "world, argv, fragment",
    [
        ("2", ["methods"], "methods does not shard its work"),
        ("two", ["eval", "--dataset", "synthetic", "--root", "."], "WORLD_SIZE='two'"),
    ],
)
def test_torchrun_refusals_are_one_line(tmp_path, monkeypatch, capsys, world, argv, fragment):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", world)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0]
    with pytest.raises(DistributedError), distributed.session("backbones", None):
        pass
