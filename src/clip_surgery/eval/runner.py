"""Evaluation runs: segmentation mIoU, explainability mIoU/mSC, faithfulness (deletion and
insertion areas, pointing game), multi-label mAP, and scoring.

Every result carries the method, model, weights hash, preset and all settings, the number of
images and the wall time, and is written as JSON and as a Markdown table row. An interrupted
segmentation run resumes from its state file when started again with the same settings.

Inside a process group (``torchrun``, see ``clip_surgery.distributed``) every process evaluates
its shard of the images; confusion matrices are summed, explainability pairs and multi-label
scores are gathered back into dataset order, so the metrics equal a single process's; rank 0
alone writes the results, each process its own state file and its own prediction PNGs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .. import distributed, methods
from ..errors import DatasetError, OptionError
from ..images import open_image
from ..outputs import atomic_path, write_text
from ..tasks.segment import ClassQueries, Preset, method_options, segment
from ..text import DEFAULT_TEMPLATES
from .datasets import (
    IGNORE,
    MULTILABEL,
    multilabel_dataset,
    read_index_png,
    segmentation_dataset,
)
from .faithfulness import DEFAULT_STEPS, baselines, deletion_insertion
from .metrics import (
    ConfusionMatrix,
    ExplainabilityMeter,
    mean_average_precision,
    pointing_hits,
)
from .presets import PRESETS, preset_for


def default_preset(method: str) -> str:
    """A method's own preset when it has one, else SCLIP's convention."""
    return method if method in PRESETS else "sclip"


def _progress(items, enabled: bool, description: str):
    enabled = enabled and distributed.is_main()  # one bar, rank 0's
    return tqdm(items, disable=not enabled, file=sys.stderr, unit="img", desc=description)


def _in_order(shards: list[list[tuple]]) -> list:
    """Every process's ``(index, value)`` pairs merged into one list of values, by index."""
    return [value for _, value in sorted(chain.from_iterable(shards), key=lambda pair: pair[0])]


def _wall_seconds(seconds: float) -> float:
    """The run's wall time: the slowest process's."""
    return round(max(distributed.all_gather_objects(seconds)), 2)


def _processes() -> dict:
    """``{"processes": N}`` for a run shared by N > 1 processes, else nothing."""
    count = distributed.world_size()
    return {"processes": count} if count > 1 else {}


def _write_main(results: dict, out: Path | None, stem: str) -> None:
    """Write the results once: from rank 0 (or the only process)."""
    if out and distributed.is_main():
        write_results(results, out, stem)


def _header(model, dataset: str, method: str, options, root, limit) -> dict:
    return {
        "dataset": dataset,
        "root": str(root),
        "split": _split(dataset),
        "limit": limit,
        "method": method,
        "options": asdict(methods.get(method).resolved(options, model.backbone.vision)),
        "model": model.name,
        "weights": model.weights_hash,
    }


def _split(dataset: str) -> str:
    if dataset in MULTILABEL:
        return {"voc2007": "test", "coco2014": "val2014", "nus_wide": "Test"}[dataset]
    spec = segmentation_dataset(dataset)
    return spec.split or spec.images


def _stem(dataset: str, method: str, kind: str, limit: int | None) -> str:
    """Result file stem; a ``--limit`` run never overwrites the full run's files."""
    return f"{dataset}-{method}-{kind}" + (f"-limit{limit}" if limit else "")


def evaluate_segmentation(
    model,
    dataset: str,
    root,
    method: str = "clip_surgery",
    options=None,
    preset: str | None = None,
    limit: int | None = None,
    save_pred: Path | None = None,
    out: Path | None = None,
    progress: bool = True,
    refine: str | None = None,
) -> dict:
    """Dataset-level mIoU of ``method`` on a segmentation dataset (resumable with ``out``).

    ``options``: typed options, or a dict of values over the preset's own (None: the
    preset's); ``refine``: ``"pamr"`` or ``"none"`` instead of the preset's refinement.
    """
    spec = segmentation_dataset(dataset)
    settings = with_refine(preset_for(preset or default_preset(method), dataset), refine)
    options = method_options(method, settings, options)
    samples = _limited(spec, root, limit)
    record = {
        **_header(model, dataset, method, options, root, limit),
        "preset": settings.settings(),
    }
    state = _State(out, record) if out else None
    matrix = ConfusionMatrix(len(spec.classes), state.matrix if state else None)
    done = state.done if state else set()
    started = time.perf_counter()
    queries = ClassQueries.build(model, spec.classes, DEFAULT_TEMPLATES[: settings.templates])
    todo = [s for s in distributed.shard(samples) if s.key not in done]
    for sample in _progress(todo, progress, dataset):
        label = spec.read_label(sample.label)
        prediction, _ = segment(model, open_image(sample.image), queries, method, options, settings)
        if prediction.shape != label.shape:
            raise DatasetError(
                f"{sample.label}: label {label.shape} differs from its image {prediction.shape}"
            )
        matrix.update(prediction, label)
        if save_pred:
            _save_label(prediction, save_pred / f"{sample.key}.png")
        if state:
            state.save(matrix.matrix, sample.key)
    total = ConfusionMatrix(len(spec.classes), distributed.all_reduce_sum(matrix.matrix))
    try:
        scored = total.results()
    except DatasetError:
        if state:
            state.finish()  # every image was seen: a rerun must read them again, not resume
        raise
    results = {
        **record,
        **scored,
        "images": len(samples),
        **_processes(),
        "seconds": _wall_seconds(time.perf_counter() - started + (state.seconds if state else 0)),
        "classes": [names[0] for names in spec.classes],
    }
    kind = settings.name + (f"+{settings.refine}" if settings.refine else "")
    _write_main(results, out, _stem(dataset, method, kind, limit))
    if state:
        distributed.barrier()  # results written: only now may the states go
        state.finish()
    return results


def with_refine(settings: Preset, refine: str | None) -> Preset:
    """The preset with ``refine`` (``"none"``: no refinement; None: the preset's own)."""
    if refine is None:
        return settings
    return dataclasses.replace(settings, refine=None if refine == "none" else refine)


def _limited(spec, root, limit: int | None) -> list:
    """The dataset's samples, the first ``limit`` of them when a limit is given."""
    samples = spec.samples(root)
    return samples[:limit] if limit else samples


def _explained_classes(spec) -> tuple[int, list[str]]:
    """The first explained class id (the background class is not explained) and the texts."""
    first = 1 if spec.background else 0
    return first, [names[0] for names in spec.classes[first:]]


def _label_and_present(spec, sample, first: int) -> tuple[torch.Tensor, list[int]]:
    """A sample's label map and the explained classes present in it."""
    label = torch.from_numpy(spec.read_label(sample.label).astype(np.int64))
    return label, [c for c in torch.unique(label).tolist() if c != IGNORE and c >= first]


def evaluate_explainability(
    model,
    dataset: str,
    root,
    method: str = "clip_surgery",
    options=None,
    size: int | None = None,
    single: bool = False,
    limit: int | None = None,
    out: Path | None = None,
    progress: bool = True,
) -> dict:
    """The paper's explainability protocol: mIoU (grid-searched threshold) and mSC."""
    spec = segmentation_dataset(dataset)
    options = options if options is not None else methods.get(method).options()
    samples = _limited(spec, root, limit)
    first, texts = _explained_classes(spec)
    scored = []  # (image index, its pairs' scores) for this process's images
    started = time.perf_counter()
    for index, sample in _progress(distributed.shard(list(enumerate(samples))), progress, dataset):
        label, present = _label_and_present(spec, sample, first)
        if not present:
            continue
        result = model.explain(
            open_image(sample.image),
            texts,
            method=method,
            size=size,
            single=single,
            **asdict(options),
        )
        maps = result.maps_at(tuple(label.shape), image=0, texts=[c - first for c in present])
        pairs = [
            ExplainabilityMeter.score(heatmap, label == cls, label != IGNORE)
            for heatmap, cls in zip(maps, present, strict=True)
        ]
        scored.append((index, pairs))
    meter = ExplainabilityMeter()
    for pairs in _in_order(distributed.all_gather_objects(scored)):
        for pair in pairs:  # in dataset order, so the float sums equal one process's
            meter.add(pair)
    results = {
        **_header(model, dataset, method, options, root, limit),
        "task": "explainability",
        "size": size or model.native_size,
        "single": single,
        **meter.results(),
        "images": len(samples),
        **_processes(),
        "seconds": _wall_seconds(time.perf_counter() - started),
    }
    _write_main(results, out, _stem(dataset, method, "explainability", limit))
    return results


def evaluate_faithfulness(
    model,
    dataset: str,
    root,
    method: str = "clip_surgery",
    options=None,
    size: int | None = None,
    single: bool = False,
    limit: int | None = None,
    out: Path | None = None,
    progress: bool = True,
    steps: int = DEFAULT_STEPS,
    baseline: str = "rise",
) -> dict:
    """Faithfulness of the maps of each (image, present class): RISE's deletion and insertion
    areas of CLIP's own probability of the class among the dataset's classes (no masks
    needed; ``eval.faithfulness``) and the pointing game on the label masks."""
    spec = segmentation_dataset(dataset)
    options = options if options is not None else methods.get(method).options()
    deletion, insertion = baselines(baseline)
    if steps < 1:
        raise OptionError(f"steps must be >= 1, got {steps}")
    samples = _limited(spec, root, limit)
    first, texts = _explained_classes(spec)
    run = _Faithfulness(model, texts, first, method, options, size, single, steps, baseline)
    scored = []  # (image index, [(deletion, insertion, hit), ...])
    started = time.perf_counter()
    for index, sample in _progress(distributed.shard(list(enumerate(samples))), progress, dataset):
        label, present = _label_and_present(spec, sample, first)
        if present:
            scored.append((index, run.pairs(open_image(sample.image), label, present)))
    pairs = list(chain.from_iterable(_in_order(distributed.all_gather_objects(scored))))
    if not pairs:
        raise DatasetError("nothing could be scored: no image has a labelled class")
    values = np.array(pairs, dtype=np.float64)
    seconds = _wall_seconds(time.perf_counter() - started)
    results = {
        **_header(model, dataset, method, options, root, limit),
        "task": "faithfulness",
        "size": size or model.native_size,
        "single": single,
        "steps": steps,
        "baseline": {"deletion": deletion, "insertion": insertion},
        "deletion_auc": float(values[:, 0].mean()),
        "insertion_auc": float(values[:, 1].mean()),
        "pointing": float(values[:, 2].mean()),
        "pairs": len(pairs),
        "images": len(samples),
        **_processes(),
        "seconds": seconds,
        "seconds_per_image": round(seconds / max(len(samples), 1), 4),
    }
    _write_main(results, out, _stem(dataset, method, "faithfulness", limit))
    return results


@dataclass
class _Faithfulness:
    """What every image of a faithfulness run shares."""

    model: object
    texts: list[str]
    first: int  # the class index of the first text (1 when the background is not explained)
    method: str
    options: object
    size: int | None
    single: bool
    steps: int
    baseline: str

    def __post_init__(self) -> None:
        self.query = self.model.query(self.texts)

    def pairs(self, image, label: torch.Tensor, present: list[int]) -> list[tuple]:
        """(deletion area, insertion area, pointing hit) of each present class."""
        columns = [c - self.first for c in present]
        batch = self.model.as_batch(image, self.size)
        result = self.model.explain(
            batch, self.texts, method=self.method, single=self.single, **asdict(self.options)
        )
        inputs = result.maps_at(tuple(batch.shape[-2:]), image=0, texts=columns)
        at_label = result.maps_at(tuple(label.shape), image=0, texts=columns)
        masks = torch.stack([label == c for c in present])
        hits = pointing_hits(at_label, masks, label != IGNORE).tolist()
        found = []
        for column, heatmap, hit in zip(columns, inputs, hits, strict=True):
            score, pixels = self.probability(column), heatmap.to(batch.device)
            areas = deletion_insertion(score, batch[0], pixels, self.steps, self.baseline)
            found.append((*areas, float(hit)))
        return found

    def probability(self, column: int):
        """CLIP's own probability of text ``column`` among the texts, per image."""

        def score(images: torch.Tensor) -> torch.Tensor:
            cosine = self.model.score(images, self.query, "raw").cosine
            return (self.model.logit_scale * cosine).softmax(dim=-1)[:, column]

        return score


def evaluate_multilabel(
    model,
    dataset: str,
    root,
    method: str = "clip_surgery",
    options=None,
    size: int | None = None,
    limit: int | None = None,
    out: Path | None = None,
    progress: bool = True,
    batch: int = 8,
) -> dict:
    """mAP of zero-shot class scores of any method (see ``tasks.classify.class_scores``)."""
    from ..tasks.classify import class_scores

    data = multilabel_dataset(dataset, root)
    options = options if options is not None else methods.get(method).options()
    count = min(limit, len(data.samples)) if limit else len(data.samples)
    labels = [names[0] for names in data.classes]
    # (first image index, scores) per batch; whole batches are sharded, so every batch and its
    # scores are the same as in one process
    scores = []
    started = time.perf_counter()
    for begin in _progress(distributed.shard(range(0, count, batch)), progress, dataset):
        chunk = [open_image(s.image) for s in data.samples[begin : min(begin + batch, count)]]
        found = class_scores(model, chunk, labels, method=method, options=options, size=size)
        scores.append((begin, found.cpu().numpy()))
    ordered = np.concatenate(_in_order(distributed.all_gather_objects(scores)))
    results = {
        **_header(model, dataset, method, options, root, limit),
        "task": "multilabel",
        "size": size or model.native_size,
        **mean_average_precision(ordered, data.labels[:count]),
        "images": count,
        **_processes(),
        "seconds": _wall_seconds(time.perf_counter() - started),
    }
    _write_main(results, out, _stem(dataset, method, "multilabel", limit))
    return results


def score_predictions(dataset: str, root, predictions: Path, out: Path | None = None) -> dict:
    """mIoU of saved label PNGs, any tool's: ``<prediction dir>/<image id>.png`` (Cityscapes
    also ``<city-less file name>.png``) holding 0-based class indices, the same index space as
    the dataset's labels after its conventions (``SegmentationDataset.read_label``)."""
    spec = segmentation_dataset(dataset)
    samples = spec.samples(root)
    matrix = ConfusionMatrix(len(spec.classes))
    for sample in samples:
        path = _prediction_path(Path(predictions), sample.key)
        prediction = read_index_png(path, "prediction")
        label = spec.read_label(sample.label)
        if prediction.shape != label.shape:
            raise DatasetError(
                f"{path}: shape {prediction.shape} differs from its label {label.shape}"
            )
        _check_prediction_values(path, prediction, spec)
        matrix.update(prediction, label)
    results = {
        "dataset": dataset,
        "root": str(root),
        "predictions": str(predictions),
        "index_space": f"0-based class ids 0..{len(spec.classes) - 1}",
        **matrix.results(),
        "images": len(samples),
        "classes": [names[0] for names in spec.classes],
    }
    if out:
        write_results(results, out, f"{dataset}-score")
    return results


def _prediction_path(folder: Path, key: str) -> Path:
    path = folder / f"{key}.png"
    flat = folder / f"{Path(key).name}.png"  # Cityscapes tools often drop the city folder
    if path.is_file():
        return path
    if flat.is_file():
        return flat
    raise DatasetError(f"missing prediction {path} for {key!r}")


def _check_prediction_values(path: Path, prediction: np.ndarray, spec) -> None:
    count = len(spec.classes)
    top, bottom = int(prediction.max(initial=0)), int(prediction.min(initial=0))
    if bottom >= 0 and top < count:
        return
    hint = ""
    if spec.reduce_zero_label and top == count:
        hint = f" (1-based ids as in {spec.name}'s label files? subtract 1)"
    elif spec.name == "cityscapes" and top <= 33:
        hint = " (labelIds? convert to trainIds 0..18)"
    raise DatasetError(
        f"{path}: class id {top if top >= count else bottom} outside 0..{count - 1}; score "
        f"expects 0-based class ids{hint}"
    )


def is_multilabel(dataset: str) -> bool:
    """True for the multi-label recognition datasets."""
    return dataset in MULTILABEL


def _save_label(prediction: np.ndarray, path: Path) -> None:
    with atomic_path(path) as temporary:
        Image.fromarray(prediction, mode="L").save(temporary, format="PNG")


def write_results(results: dict, out: Path, stem: str) -> tuple[Path, Path]:
    """``<stem>.json`` (everything) and ``<stem>.md`` (a table row with every setting)."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path = out / f"{stem}.json", out / f"{stem}.md"
    _atomic_write(json_path, json.dumps(results, indent=2))
    keys = ("miou", "msc", "threshold", "map", "aacc", "deletion_auc", "insertion_auc", "pointing")
    headline = {k: results[k] for k in keys if k in results}
    row = {
        "method": results.get("method"),
        "dataset": results.get("dataset"),
        **{k: f"{v:.2f}" if isinstance(v, float) else v for k, v in headline.items()},
        "model": results.get("model"),
        "weights": results.get("weights"),
        "preset": results.get("preset", {}).get("name") if "preset" in results else None,
        "settings": json.dumps(
            {
                k: results[k]
                for k in ("preset", "options", "size", "single", "steps", "baseline", "limit")
                if k in results
            }
        ),
        "images": results.get("images"),
        "seconds": results.get("seconds"),
    }
    table = "| " + " | ".join(row) + " |\n| " + " | ".join("---" for _ in row) + " |\n"
    table += "| " + " | ".join(str(v) for v in row.values()) + " |\n"
    _atomic_write(markdown_path, table)
    return json_path, markdown_path


def _atomic_write(path: Path, text: str) -> None:
    write_text(path, text)


class _State:
    """Resumable progress: the confusion matrix and finished image ids, keyed by the settings;
    under torchrun one file per process (``-rank<R>of<N>``): its shard's matrix and images, so
    a rerun with the same number of processes resumes each shard."""

    def __init__(self, out: Path, record: dict):
        self.key = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:12]
        count = distributed.world_size()
        shard = f"-rank{distributed.rank()}of{count}" if count > 1 else ""
        self.path = out / f".state-{self.key}{shard}.npz"
        self.matrix, self.done, self.seconds = None, set(), 0.0
        self.started = time.perf_counter()
        if self.path.is_file():
            saved = np.load(self.path, allow_pickle=False)
            self.matrix = saved["matrix"]
            self.done = set(saved["done"].tolist())
            self.seconds = float(saved["seconds"])

    def save(self, matrix: np.ndarray, key: str) -> None:
        self.done.add(key)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        elapsed = self.seconds + time.perf_counter() - self.started
        with atomic_path(self.path) as temporary:
            np.savez(temporary, matrix=matrix, done=np.array(sorted(self.done)), seconds=elapsed)

    def finish(self) -> None:
        self.path.unlink(missing_ok=True)
