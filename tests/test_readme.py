"""The README's Python example runs as written (on a small random model instead of ViT-B/16)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from conftest import make_vit

import clip_surgery

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_example_runs(monkeypatch):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    code = "\n".join(re.findall(r"```python\n(.*?)```", text, re.S))
    tiny = clip_surgery.wrap(make_vit(41))
    monkeypatch.setattr(clip_surgery, "load", lambda *args, **kwargs: tiny)
    monkeypatch.chdir(ROOT)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    image = namespace["image"]
    assert namespace["result"].maps.shape == (1, 2, 224, 224)  # the methods example's
    assert namespace["maps"].shape == (1, 2, image.height, image.width)
    assert namespace["free"].maps.shape == (1, 1, 224, 224)
    assert namespace["result"].method == "naclip"  # the methods example ran too
    assert namespace["tokens"].shape == (1, 197, 64)


def test_readme_commands_match_ci():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    assert ci in readme
    assert os.access(ROOT / "scripts" / "setup.sh", os.R_OK)
