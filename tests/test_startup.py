"""Start-up: light commands never import torch, open_clip or matplotlib; the shipped catalog
equals the live registry."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from clip_surgery import catalog

HEAVY = ("torch", "open_clip", "matplotlib", "transformers", "PIL", "numpy", "gradio")


def _imported_after(args: list[str]) -> tuple[int, list[str], str]:
    """Run the CLI in a fresh interpreter; its exit code, the heavy modules loaded, stderr."""
    code = (
        "import sys\n"
        "from clip_surgery.cli import main\n"
        "try:\n"
        f"    code = main({args!r})\n"
        "except SystemExit as exit:\n"
        "    code = exit.code\n"
        f"heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)\n"
        "print('HEAVY=' + ','.join(heavy), file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    line = [x for x in result.stderr.splitlines() if x.startswith("HEAVY=")][-1]
    heavy = [m for m in line.removeprefix("HEAVY=").split(",") if m]
    return result.returncode, heavy, result.stderr


@pytest.mark.parametrize(
    "args,code",
    [
        (["--help"], 0),
        (["methods"], 0),
        (["methods", "--json"], 0),
        (["backbones"], 0),
        (["demo", "--help"], 0),
        (["demo", "--port", "x"], 2),  # argparse's error
        (["explain", "a.png"], 2),  # --text missing: argparse's error
        (["eval", "--dataset", "voc21"], 2),  # --root missing
        (["nonsense"], 2),
        (["explain", "a.png", "--text", "x", "--method", "nope"], 2),  # unknown method
    ],
)
def test_light_commands_import_nothing_heavy(args, code):
    returncode, heavy, stderr = _imported_after(args)
    assert returncode == code, stderr
    assert heavy == [], heavy


def test_unknown_method_is_one_line_before_any_import():
    returncode, heavy, stderr = _imported_after(["explain", "x.png", "-t", "a", "--method", "no"])
    lines = [x for x in stderr.splitlines() if not x.startswith("HEAVY=")]
    assert returncode == 2 and heavy == []
    assert lines == [
        f"clip-surgery: error: unknown method 'no'; known: {', '.join(catalog.method_names())}"
    ]


def test_shipped_catalog_equals_the_registry():
    assert catalog.read() == catalog.build(), (
        "data/catalog.json is stale: run `python -m clip_surgery.catalog`"
    )


def test_methods_listing_prints_the_catalog(capsys):
    from clip_surgery.cli import main

    assert main(["methods", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == catalog.read()["methods"]
