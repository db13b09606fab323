"""Named inference settings; every result records the preset and all of its values."""

from __future__ import annotations

import dataclasses

from ..errors import DatasetError
from ..tasks.segment import Preset

# The SCLIP-family settings per dataset (docs/protocols.md, "Segmentation settings"):
# (short side, background threshold, logit scale, area threshold).
SCLIP_TABLE = {
    "voc21": (336, 0.1, 65.0, 0.1),
    "context60": (336, 0.1, 50.0, None),
    "coco_object": (336, 0.1, 50.0, None),
    "voc20": (336, 0.0, 40.0, None),
    "context59": (336, 0.0, 40.0, None),
    "ade20k": (336, 0.0, 40.0, None),
    "coco_stuff": (448, 0.0, 40.0, None),
    "cityscapes": (560, 0.0, 40.0, None),
    "synthetic": (128, 0.1, 50.0, None),  # tiny-synth scenes are 64 px; one 128 px window
}
PRESETS = ("sclip", "clip_surgery", "clearclip", "naclip", "gem")


def preset_for(name: str, dataset: str) -> Preset:
    """The preset ``name`` for ``dataset``.

    ``sclip``: the table of docs/protocols.md (SCLIP's configs). ``clip_surgery``: CLIP Surgery's
    whole-image setting, the image resized to 448 x 448 and one forward (thresholds as sclip).
    ``clearclip``: short side 448, windows of 448 with stride 224. ``naclip``: sclip's, without
    windows on VOC. ``gem``: the whole image at 448 x 448 (GEM's evaluation).
    """
    short, prob, scale, area = SCLIP_TABLE.get(dataset, (336, 0.0, 40.0, None))
    base = Preset(
        "sclip", short_side=short, logit_scale=scale, prob_threshold=prob, area_threshold=area
    )
    if name == "sclip":
        return base
    if name == "clip_surgery":
        return dataclasses.replace(base, name=name, short_side=None, square=448, window=None)
    if name == "clearclip":
        return dataclasses.replace(base, name=name, short_side=448, window=448, stride=224)
    if name == "naclip":
        window = None if dataset in ("voc21", "voc20") else base.window
        return dataclasses.replace(base, name=name, window=window)
    if name == "gem":
        return dataclasses.replace(base, name=name, short_side=None, square=448, window=None)
    raise DatasetError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
