"""A Hugging Face Space's entry point: the same web demo as ``clip-surgery demo``.

A Space runs ``python app.py`` from the repository and gives the address to bind in
``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT``; elsewhere this serves on 127.0.0.1:7860.
Extra arguments are passed on (``python app.py --model ViT-B/16 --checkpoint ViT-B-16.pt``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "src"


def space_args(environ: Mapping[str, str], extra: Sequence[str]) -> list[str]:
    """The ``clip-surgery`` arguments: ``demo`` on the host and port the environment gives."""
    host = environ.get("GRADIO_SERVER_NAME", "127.0.0.1")
    port = environ.get("GRADIO_SERVER_PORT", "7860")
    return ["demo", "--host", host, "--port", port, *extra]


def main() -> int:
    """Run the demo from this checkout (its ``src/`` first, so no install is needed)."""
    sys.path.insert(0, str(SOURCE))
    from clip_surgery.cli import main as cli

    return cli(space_args(os.environ, sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
