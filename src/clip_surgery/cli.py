"""Command line: ``clip-surgery explain IMAGE_OR_DIR... --text T [T ...]``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

# Only light imports here: --help, `methods`, `backbones` and argument errors never load torch,
# open_clip or matplotlib; each command imports what it needs.
from . import __version__
from .defaults import DEFAULT_METHOD, DEFAULT_MODEL, DISPLAY_MAX_SIDE, MAX_INPUT_SIDE
from .errors import ClipSurgeryError, ImageError, ModelError, OptionError

if TYPE_CHECKING:
    from .model import SurgeryModel


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``clip-surgery`` command."""
    parser = argparse.ArgumentParser(
        prog="clip-surgery", description="Show where in an image CLIP sees each text."
    )
    parser.add_argument("--version", action="version", version=f"clip-surgery {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    explain = commands.add_parser("explain", help="heatmap overlays of texts on images")
    explain.add_argument("images", nargs="+", help="image files or directories of images")
    explain.add_argument("--text", "-t", nargs="+", required=True, help="text queries")
    add_model_options(explain)
    explain.add_argument("--method", default=DEFAULT_METHOD, help="see `clip-surgery methods`")
    explain.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a method option, repeatable (e.g. --option depth=4)",
    )
    explain.add_argument("--size", type=int, help="input side in pixels (the model's own: 224)")
    explain.add_argument(
        "--depth", type=int, help="CLIP Surgery's depth (same as --option depth=N)"
    )
    explain.add_argument(
        "--single",
        action="store_true",
        help="free-form queries: remove the empty-string redundant feature instead of "
        "treating the texts as a class set",
    )
    explain.add_argument("--out", type=Path, default=Path("out"), help="output directory")
    explain.add_argument("--json", action="store_true", help="print per-text scores as JSON")
    explain.add_argument("--batch-size", type=int, default=8, help="images per forward (8)")
    explain.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_eval_parsers(commands)
    add_task_parsers(commands)
    add_demo_parser(commands)
    listing = commands.add_parser("methods", help="list the explanation methods")
    listing.add_argument("--json", action="store_true", help="print the listing as JSON")
    families = commands.add_parser("backbones", help="model families and the methods for each")
    families.add_argument("--json", action="store_true", help="print the matrix as JSON")
    return parser


def add_eval_parsers(commands) -> None:
    """The ``eval`` and ``score`` commands."""
    evaluate = commands.add_parser("eval", help="evaluate a method on a dataset")
    evaluate.add_argument("--dataset", required=True, help="e.g. voc21, coco_stuff, voc2007")
    evaluate.add_argument("--root", required=True, type=Path, help="the dataset root")
    evaluate.add_argument("--method", default=DEFAULT_METHOD)
    evaluate.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    evaluate.add_argument("--preset", help="segmentation preset (default: the method's own)")
    evaluate.add_argument(
        "--task",
        choices=["segmentation", "explainability", "faithfulness", "multilabel"],
        help="default: segmentation, or multilabel for multi-label datasets",
    )
    evaluate.add_argument(
        "--refine", choices=["pamr", "none"], help="segmentation: PAMR post-processing or none"
    )
    evaluate.add_argument(
        "--size", type=int, help="explainability/faithfulness/multilabel input side (native)"
    )
    evaluate.add_argument(
        "--single", action="store_true", help="explainability/faithfulness: free-form mode"
    )
    evaluate.add_argument("--steps", type=int, help="faithfulness: deletion/insertion steps (20)")
    evaluate.add_argument(
        "--baseline",
        choices=["rise", "blur", "mean"],
        help="faithfulness: removed pixels become the mean colour or a blur (rise: mean for "
        "deletion, blur for insertion, as RISE)",
    )
    evaluate.add_argument("--limit", type=int, help="only the first N images")
    evaluate.add_argument("--save-pred", type=Path, help="write label PNGs here")
    evaluate.add_argument("--out", type=Path, default=Path("results"), help="results directory")
    evaluate.add_argument("--no-progress", action="store_true")
    add_model_options(evaluate)
    score = commands.add_parser("score", help="score saved prediction PNGs")
    score.add_argument("--dataset", required=True)
    score.add_argument("--root", required=True, type=Path)
    score.add_argument("--pred", required=True, type=Path, help="directory of <image id>.png")
    score.add_argument("--out", type=Path, help="also write JSON and Markdown here")


def add_task_parsers(commands) -> None:
    """The ``segment``, ``classify`` and ``explain-text`` commands."""
    segment = commands.add_parser("segment", help="SAM masks from text (CLIP Surgery points)")
    segment.add_argument("image", type=Path)
    segment.add_argument(
        "--text",
        "-t",
        nargs="+",
        required=True,
        help='targets; "person+bench" combines texts into one mask',
    )
    segment.add_argument("--sam-checkpoint", required=True, type=Path)
    segment.add_argument("--sam-type", default="vit_b", help="vit_b|vit_l|vit_h|sam2_hiera_*")
    segment.add_argument("--threshold", default="0.8", help="point threshold, or 'otsu'")
    segment.add_argument("--max-points", type=int, help="cap on the number of points")
    segment.add_argument("--box", action="store_true", help="also give SAM a box from the map")
    segment.add_argument("--instances", action="store_true", help="one mask per instance")
    segment.add_argument("--method", default=DEFAULT_METHOD)
    segment.add_argument("--size", type=int, help="CLIP input side (the model's own)")
    segment.add_argument("--out", type=Path, default=Path("out"))
    add_model_options(segment)
    classify = commands.add_parser("classify", help="rank labels for an image (multi-label)")
    classify.add_argument("image", type=Path)
    classify.add_argument("--labels", nargs="+", required=True)
    classify.add_argument("--plain", action="store_true", help="CLIP's own scores, no surgery")
    classify.add_argument("--size", type=int)
    classify.add_argument("--json", action="store_true")
    add_model_options(classify)
    words = commands.add_parser("explain-text", help="which words of a caption match where")
    words.add_argument("image", type=Path)
    words.add_argument("--caption", required=True)
    words.add_argument("--size", type=int)
    words.add_argument("--out", type=Path, default=Path("out"))
    words.add_argument("--json", action="store_true")
    add_model_options(words)


def add_demo_parser(commands) -> None:
    """The ``demo`` command: the web demo (extra ``[demo]``)."""
    demo = commands.add_parser("demo", help="the web demo (pip install 'clip-surgery[demo]')")
    demo.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    demo.add_argument("--port", type=int, default=7860, help="port to bind (7860)")
    demo.add_argument("--concurrency", type=int, default=1, help="requests run at once (1)")
    demo.add_argument("--queue-size", type=int, default=32, help="requests waiting at most (32)")
    demo.add_argument("--max-texts", type=int, default=16, help="texts per request (16)")
    demo.add_argument("--max-upload-mb", type=float, default=10, help="upload size limit (10)")
    add_model_options(demo, model="tiny-synth", pixels="25000000 in the demo")


def run_demo(args: argparse.Namespace) -> int:
    """The ``demo`` command: serve the web demo until interrupted (tiny-synth by default)."""
    from importlib.util import find_spec

    if find_spec("gradio") is None:
        raise ClipSurgeryError("the web demo needs gradio: pip install 'clip-surgery[demo]'")
    from .demo import limits_from_args, serve

    limits_from_args(args)  # bad limits before the model loads
    if args.model is None and args.checkpoint is None:
        args.model = "tiny-synth"  # starts offline
    return serve(args, model_from_args(args))


def _threshold(text: str) -> float | str:
    if text == "otsu":
        return text
    try:
        return float(text)
    except ValueError:
        raise OptionError(f"--threshold takes a number or 'otsu', got {text!r}") from None


def run_segment(args: argparse.Namespace) -> int:
    """The ``segment`` command: a mask PNG and an overlay with the prompts per target."""
    import numpy as np
    from PIL import Image

    from .images import open_image
    from .outputs import slug
    from .tasks.sam import load_predictor, mask_overlay, segment_text
    from .text import check_texts
    from .viz import save_png

    threshold = _threshold(args.threshold)
    image = open_image(args.image, args.max_side or None)
    check_texts([t for target in args.text for t in target.split("+")])
    predictor = load_predictor(args.sam_checkpoint, args.sam_type, args.device)
    model = model_from_args(args)
    predictor.set_image(np.asarray(image))
    for target in args.text:
        result = segment_text(
            model,
            predictor,
            image,
            target,
            method=args.method,
            size=args.size,
            threshold=threshold,
            max_points=args.max_points,
            use_box=args.box,
            instances=args.instances,
            image_set=True,
        )
        stem = f"{args.image.stem}_{slug(target)}"
        mask = Image.fromarray((result.mask * 255).astype(np.uint8), mode="L")
        save_png(mask, args.out / f"{stem}_mask.png")
        save_png(mask_overlay(image, result), args.out / f"{stem}_sam.png")
        print(
            f"{target}: mask of {int(result.mask.sum())} px, score {result.score:.3f}, "
            f"{int(result.labels.sum())} positive / {int((result.labels == 0).sum())} negative "
            f"points -> {args.out / (stem + '_mask.png')}"
        )
    return 0


def run_classify(args: argparse.Namespace) -> int:
    """The ``classify`` command: labels ranked by score."""
    from .images import open_image
    from .tasks.classify import class_scores, ranked
    from .text import check_texts

    image = open_image(args.image, args.max_side or None)
    labels = check_texts(args.labels)
    model = model_from_args(args)
    scores = class_scores(model, image, labels, surgery=not args.plain, size=args.size)[0]
    ranking = ranked(scores, labels)
    if args.json:
        print(json.dumps([{"label": label, "score": round(score, 6)} for label, score in ranking]))
    else:
        for label, score in ranking:
            print(f"{score:8.4f}  {label}")
    return 0


def run_explain_text(args: argparse.Namespace) -> int:
    """The ``explain-text`` command: word importances and a figure of per-word maps."""
    from .images import open_image
    from .tasks.words import explain_words, word_figure
    from .text import check_texts
    from .viz import save_png

    image = open_image(args.image, args.max_side or None)
    check_texts([args.caption])
    model = model_from_args(args)
    result = explain_words(model, image, args.caption, size=args.size)
    path = save_png(word_figure(image, result), args.out / f"{args.image.stem}_words.png")
    if args.json:
        print(
            json.dumps(
                {
                    "caption": args.caption,
                    "cosine": result.cosine,
                    "figure": str(path),
                    "words": [
                        {"word": w, "drop": d, "share": s}
                        for w, d, s in zip(result.words, result.drops, result.shares, strict=True)
                    ],
                }
            )
        )
    else:
        for word, share in zip(result.words, result.shares, strict=True):
            print(f"{share:6.1%}  {word}")
        print(f"figure: {path}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    """The ``eval`` command; the last line printed is the headline metric."""
    from .eval import runner
    from .methods import get as get_method

    if args.limit is not None and args.limit <= 0:
        raise OptionError("--limit must be positive")
    if args.steps is not None and args.steps <= 0:
        raise OptionError("--steps must be positive")
    values = parse_option_pairs(args.option, None)
    options = get_method(args.method).options(**values)
    task = args.task or ("multilabel" if runner.is_multilabel(args.dataset) else "segmentation")
    if runner.is_multilabel(args.dataset) != (task == "multilabel"):
        raise OptionError(f"--task {task} does not apply to dataset {args.dataset}")
    _refuse_flags(args, task)
    if task == "multilabel":  # layout and file errors before the model loads
        runner.multilabel_dataset(args.dataset, args.root)
    else:
        runner.segmentation_dataset(args.dataset).samples(args.root)
    model = model_from_args(args)
    common = dict(
        method=args.method,
        options=options,
        limit=args.limit,
        out=args.out,
        progress=not args.no_progress,
    )
    if task == "segmentation":
        common["options"] = values  # over the preset's own option values
        results = runner.evaluate_segmentation(
            model,
            args.dataset,
            args.root,
            preset=args.preset,
            save_pred=args.save_pred,
            refine=args.refine,
            **common,
        )
        headline = {"aAcc": "aacc", "mIoU": "miou"}
    elif task == "explainability":
        results = runner.evaluate_explainability(
            model, args.dataset, args.root, size=args.size, single=args.single, **common
        )
        headline = {"mSC": "msc", "mIoU": "miou"}
    elif task == "faithfulness":
        results = runner.evaluate_faithfulness(
            model,
            args.dataset,
            args.root,
            size=args.size,
            single=args.single,
            steps=args.steps or runner.DEFAULT_STEPS,
            baseline=args.baseline or "rise",
            **common,
        )
        headline = {"Deletion AUC": "deletion_auc", "Insertion AUC": "insertion_auc"}
        headline["Pointing"] = "pointing"
    else:
        results = runner.evaluate_multilabel(
            model, args.dataset, args.root, size=args.size, **common
        )
        headline = {"mAP": "map"}
    from .distributed import is_main

    if is_main():  # under torchrun: rank 0 alone
        for name, key in headline.items():
            print(f"{name}: {results[key]:.2f}")
    return 0


def _refuse_flags(args: argparse.Namespace, task: str) -> None:
    """OptionError for a flag the task does not use, rather than ignoring it."""
    faithfulness = {"--steps": args.steps, "--baseline": args.baseline}
    segmentation = {"--preset": args.preset, "--save-pred": args.save_pred, "--refine": args.refine}
    unused = {
        "segmentation": {"--size": args.size, "--single": args.single, **faithfulness},
        "explainability": {**segmentation, **faithfulness},
        "faithfulness": segmentation,
        "multilabel": {**segmentation, "--single": args.single, **faithfulness},
    }[task]
    given = [flag for flag, value in unused.items() if value]
    if given:
        hint = " (segmentation sizes come from --preset)" if "--size" in given else ""
        raise OptionError(f"{', '.join(given)} does not apply to --task {task}{hint}")


def run_score(args: argparse.Namespace) -> int:
    """The ``score`` command: the same metric code on any tool's predictions."""
    from .eval import runner

    results = runner.score_predictions(args.dataset, args.root, args.pred, args.out)
    print(f"aAcc: {results['aacc']:.2f}")
    print(f"mIoU: {results['miou']:.2f}")
    return 0


def parse_option_pairs(pairs: Sequence[str], depth: int | None) -> dict[str, str]:
    """``["depth=4", ...]`` (and ``--depth``) as a dict; values stay strings until typed."""
    options: dict[str, str] = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key.strip():
            raise OptionError(f"--option takes KEY=VALUE, got {pair!r}")
        options[key.strip()] = value.strip()
    if depth is not None:
        if "depth" in options and options["depth"] != str(depth):
            raise OptionError(f"--depth {depth} conflicts with --option depth={options['depth']}")
        options["depth"] = str(depth)
    return options


def run_methods(args: argparse.Namespace) -> int:
    """The ``methods`` command: name, one line, backbones, options, citation."""
    from .catalog import read

    listing = read()["methods"]
    if args.json:
        print(json.dumps(listing, indent=2))
        return 0
    for item in listing:
        options = ", ".join(f"{k}={v}" for k, v in item["options"].items()) or "no options"
        print(f"{item['name']:<13} {item['summary']}")
        print(f"{'':<13} {item['kind']}; families: {', '.join(item['families'])}")
        print(f"{'':<13} options: {options}")
        print(f"{'':<13} {item['citation']}")
    return 0


def run_backbones(args: argparse.Namespace) -> int:
    """The ``backbones`` command: each family, what loads it, and which methods apply."""
    from .catalog import read

    catalog = read()
    matrix = catalog["backbones"]
    if args.json:
        print(json.dumps(matrix, indent=2))
        return 0
    names = [item["name"] for item in catalog["methods"]]
    print(f"{'family':<26} " + " ".join(f"{name:<12}" for name in names))
    for row in matrix:
        marks = " ".join(f"{'yes' if n in row['methods'] else '-':<12}" for n in names)
        print(f"{row['family']:<26} {marks}")
    print()
    for row in matrix:
        print(f"{row['family']}: {row['loads']}")
    return 0


def add_model_options(
    parser: argparse.ArgumentParser,
    model: str = DEFAULT_MODEL,
    pixels: str = "89478485, Pillow's bomb guard",
) -> None:
    """The model options every command shares (``model``, ``pixels``: the defaults named)."""
    parser.add_argument(
        "--model",
        help=f"open_clip, OpenAI or hf-hub:ORG/NAME model name (default {model})",
    )
    parser.add_argument("--pretrained", help="pretrained tag for --model (default: openai)")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="local weights file (.pt/.bin/.safetensors) or model folder",
    )
    parser.add_argument("--device", default="cpu", help="torch device (cpu)")
    parser.add_argument(
        "--max-pixels",
        type=int,
        help=f"largest image accepted, in pixels (default {pixels})",
    )
    parser.add_argument(
        "--max-side",
        type=int,
        default=DISPLAY_MAX_SIDE,
        help=f"read images at most this many pixels long, reducing larger ones while decoding "
        f"({DISPLAY_MAX_SIDE}; 0: full size)",
    )
    parser.add_argument(
        "--precision",
        choices=["fp16", "bf16", "fp32"],
        default="fp16",
        help="autocast dtype on CUDA (fp16); the CPU always runs fp32",
    )
    caching = parser.add_mutually_exclusive_group()
    caching.add_argument(
        "--cache-dir", type=Path, help="text-embedding cache folder (default: the user cache)"
    )
    caching.add_argument(
        "--no-cache", action="store_true", help="keep text embeddings in memory only"
    )
    activation = parser.add_mutually_exclusive_group()
    activation.add_argument(
        "--quick-gelu",
        dest="quick_gelu",
        action="store_const",
        const=True,
        help="a --checkpoint alone uses QuickGELU (OpenAI-style training)",
    )
    activation.add_argument(
        "--gelu",
        dest="quick_gelu",
        action="store_const",
        const=False,
        help="a --checkpoint alone uses GELU (most open_clip training)",
    )


def model_from_args(args: argparse.Namespace) -> SurgeryModel:
    """Load the model the shared model options name."""
    from .loading import load

    options = {"device": args.device, "quick_gelu": args.quick_gelu}
    if args.checkpoint is not None:
        if args.pretrained:
            raise OptionError("give either --pretrained or --checkpoint, not both")
        if args.model:
            model = load(args.model, str(args.checkpoint), **options)
        else:
            model = load(str(args.checkpoint), **options)
    else:
        model = load(args.model or DEFAULT_MODEL, args.pretrained, **options)
    model.precision = args.precision
    if args.no_cache:
        model.cache_dir = None
    elif args.cache_dir is not None:
        model.cache_dir = args.cache_dir
    return model


def run_explain(args: argparse.Namespace) -> int:
    """The ``explain`` command: an overlay per (image, text), a grid per image, a report."""
    from .images import list_images, open_image
    from .methods import get as get_method
    from .outputs import REPORT, image_folders, image_record, report, text_files, write_json
    from .text import check_texts
    from .viz import overlay, save_grid_pages, save_png

    if (args.size is not None and args.size <= 0) or args.batch_size <= 0:
        raise ImageError("--size and --batch-size must be positive")
    paths = list_images(args.images)
    for path in paths:  # fail on a bad image before anything is written
        open_image(path, args.max_side or None)
    options = parse_option_pairs(args.option, args.depth)
    parsed = get_method(args.method).options(**options)  # unknown method/option: fail early
    texts = check_texts(args.text)
    model = model_from_args(args)
    model.encode_text(texts)  # validates texts (length) and fills the cache once
    folders, files = image_folders(paths), text_files(texts)
    records, started, free_form = [], time.perf_counter(), args.single
    from tqdm import tqdm

    from .distributed import all_gather_objects, is_main, shard

    batches = shard(range(0, len(paths), args.batch_size))  # whole batches: one process's maps
    mine = sum(len(paths[begin : begin + args.batch_size]) for begin in batches)
    hidden = args.no_progress or not is_main()
    progress = tqdm(total=mine, unit="img", disable=hidden, file=sys.stderr)
    for begin in batches:
        chunk = list(zip(paths, folders, strict=True))[begin : begin + args.batch_size]
        images = [open_image(path, args.max_side or None) for path, _ in chunk]
        result = model.explain(
            images, texts, method=args.method, size=args.size, single=args.single, **options
        )
        free_form = result.free_form
        for index, ((path, name), image) in enumerate(zip(chunk, images, strict=True)):
            folder, image_size = args.out / name, (image.height, image.width)
            overlays = [  # one full-size map at a time: memory bounded by the image, not T
                save_png(overlay(image, result.maps_at(image_size, index, [k])[0]), folder / file)
                for k, file in enumerate(files)
            ]
            probs = result.probs[index]
            grids = save_grid_pages(image, result, index, texts, probs.tolist(), folder)
            cosine = result.cosine[index]
            record = image_record(str(path), folder, texts, cosine, probs, overlays, grids)
            records.append((begin + index, record))  # its place in the whole input list
            progress.update(1)
    progress.close()
    gathered = all_gather_objects((records, free_form))  # under torchrun: rank 0 reports
    if not is_main():
        return 0
    everyone = [pair for shard_records, _ in gathered for pair in shard_records]
    records = [record for _, record in sorted(everyone, key=lambda pair: pair[0])]
    free_form = any(flag for _, flag in gathered)  # a process without images kept --single
    settings = {"size": args.size or model.native_size, "single": args.single}
    settings.update(
        dataclasses.asdict(get_method(args.method).resolved(parsed, model.backbone.vision))
    )
    mode = "free-form" if free_form else "class-set"
    seconds = round(time.perf_counter() - started, 3)
    summary = report(model, args.method, mode, settings, records, seconds)
    write_json(args.out / REPORT, summary)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"wrote overlays for {len(paths)} image(s) x {len(texts)} text(s) ({mode}) to "
            f"{args.out}; report: {args.out / REPORT}"
        )
    return 0


def _prepare(args: argparse.Namespace) -> None:
    """Checks and settings every command shares, before any work: output folders, pixel limit."""
    from .catalog import method_names
    from .outputs import check_output_dir

    size = getattr(args, "size", None)
    if size is not None and not 0 < size <= MAX_INPUT_SIDE:
        raise ImageError(f"--size must be between 1 and {MAX_INPUT_SIDE} pixels, got {size}")
    if getattr(args, "max_side", None) is not None and args.max_side < 0:
        raise ImageError(f"--max-side must be positive (0: full size), got {args.max_side}")
    method = getattr(args, "method", None)
    if method is not None and method not in method_names():
        raise ModelError(f"unknown method {method!r}; known: {', '.join(method_names())}")
    for flag, name in (
        ("--out", "out"),
        ("--save-pred", "save_pred"),
        ("--cache-dir", "cache_dir"),
    ):
        if getattr(args, name, None) is not None:
            check_output_dir(getattr(args, name), flag)
    if getattr(args, "max_pixels", None) is not None:
        from .images import set_max_pixels

        set_max_pixels(args.max_pixels)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run a command, print bad input as one line, return the exit code."""
    args = build_parser().parse_args(argv)
    try:
        commands = {
            "explain": run_explain,
            "methods": run_methods,
            "backbones": run_backbones,
            "eval": run_eval,
            "score": run_score,
            "segment": run_segment,
            "classify": run_classify,
            "explain-text": run_explain_text,
            "demo": run_demo,
        }
        _prepare(args)
        from .distributed import session

        with session(args.command, getattr(args, "device", None)) as device:
            if device is not None:  # under torchrun with a GPU: cuda:<LOCAL_RANK>
                args.device = device
            return commands[args.command](args)
    except ClipSurgeryError as error:
        print(f"clip-surgery: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clip-surgery: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (replaces the closed stream)
        return 0


if __name__ == "__main__":
    sys.exit(main())
