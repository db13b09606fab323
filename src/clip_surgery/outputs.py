"""Where explanations are written, unique by construction, and the report that lists them.

Used by the command line and the demo, so both name files and describe results the same way.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError

GRID = "grid.png"
REPORT = "explain.json"
NAMING = (
    "one folder per input image, <NNN>-<image stem>/ (NNN: its position in the input list, "
    "from 001), holding grid.png (all texts; with more than 23 texts, pages grid-1.png, "
    "grid-2.png, ...) and <KK>-<text>.png per text (KK: the text's position, from 01); the "
    "report is explain.json"
)


def grid_names(texts: int, per_page: int) -> list[str]:
    """``grid.png`` for one page of texts; ``grid-1.png``, ``grid-2.png``, ... for several."""
    pages = max(1, -(-texts // per_page))
    return [GRID] if pages == 1 else [f"grid-{page}.png" for page in range(1, pages + 1)]


def slug(text: str) -> str:
    """A file-name-safe form of a text (letters, digits and dashes; at most 60 characters)."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:60] or "text"


def image_folders(paths: Sequence[Path]) -> list[str]:
    """One folder name per input image: its position, then its stem; unique by construction."""
    width = max(3, len(str(len(paths))))
    return [f"{index:0{width}d}-{slug(Path(p).stem)}" for index, p in enumerate(paths, start=1)]


def text_files(texts: Sequence[str]) -> list[str]:
    """One overlay file name per text: its position, then the text; never ``grid.png``."""
    width = max(2, len(str(len(texts))))
    return [f"{index:0{width}d}-{slug(text)}.png" for index, text in enumerate(texts, start=1)]


def check_output_dir(path: Path, flag: str = "--out") -> None:
    """OutputError, before any work, when ``path`` cannot become a folder we can write to."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {path} is a file, not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{flag} {path}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise OutputError(f"{flag} {path}: cannot write in {existing} ({error.strerror})") from None


def image_record(
    image: str, folder: Path, texts: Sequence[str], cosine, probs, files: Sequence[Path], grid
) -> dict:
    """The report entry of one image: every (text, score, file), in the order given."""
    return {
        "image": image,
        "folder": str(folder),
        "grid": str(grid[0]),
        "grid_pages": [str(page) for page in grid],
        "texts": [
            {
                "index": index,
                "text": text,
                "cosine": round(float(cosine[index]), 6),
                "probability": round(float(probs[index]), 6),
                "overlay": str(path),
            }
            for index, (text, path) in enumerate(zip(texts, files, strict=True))
        ],
    }


def report(model, method: str, mode: str, settings: dict, records: list[dict], seconds) -> dict:
    """The whole run: model, weights, method, mode, every setting, the naming rule, images."""
    return {
        "model": model.name,
        "family": model.family,
        "weights": model.weights_hash,
        "method": method,
        "mode": mode,
        "scores": {
            "cosine": "cosine of the method's image embedding with the text",
            "probability": "softmax over the texts of logit_scale x cosine",
        },
        "settings": settings,
        "naming": NAMING,
        "seconds": seconds,
        "images": records,
    }


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed to ``path`` (with the umask's
    permissions) when the block succeeds, removed when it fails. Nothing is half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent
    )
    os.close(handle)
    try:
        yield Path(temporary)
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> Path:
    """Write a text file atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: Path, data) -> Path:
    """Write JSON atomically."""
    return write_text(path, json.dumps(data, indent=2) + "\n")


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current
