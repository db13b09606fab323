"""The methods and backbones listings, shipped as data so the CLI can print them without torch.

``data/catalog.json`` is generated from the live registry (``python -m clip_surgery.catalog``);
a test fails when the two differ, so the code stays the one definition of every method's
summary, citation, families and option defaults.
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

CATALOG = "data/catalog.json"


def build() -> dict:
    """The listings computed from the registry (imports the methods, hence torch)."""
    from .backbones import FAMILIES
    from .methods import METHODS

    methods = [method.describe() for method in METHODS.values()]
    backbones = [
        {
            "family": family.name,
            "loads": family.loads,
            "methods": [m.name for m in METHODS.values() if m.supports(family)],
        }
        for family in FAMILIES
    ]
    return json.loads(json.dumps({"methods": methods, "backbones": backbones}, default=str))


def read() -> dict:
    """The shipped listings (no torch import)."""
    return json.loads(files("clip_surgery").joinpath(CATALOG).read_text(encoding="utf-8"))


def method_names() -> list[str]:
    """The built-in method names, in listing order (no torch import)."""
    return [item["name"] for item in read()["methods"]]


def write() -> Path:
    """Regenerate ``data/catalog.json`` in the source tree from the registry."""
    path = Path(__file__).parent / CATALOG
    path.write_text(json.dumps(build(), indent=2) + "\n", encoding="utf-8")
    return path


if __name__ == "__main__":
    print(f"wrote {write()}")
