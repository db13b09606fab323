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

# ResCLIP's configs (github.com/yvhangyang/ResCLIP, configs/cfg_*.py): short side, windows
# (None: the whole image, ``slide_crop=0``), background threshold, and its method options
# (``temp_thd``, ``attn_rcs_weights`` = (2.0, rcs_mix), ``attn_sfr_weights``); logit scale 40,
# no area threshold, no PAMR (``pamr_steps=0``).
RESCLIP_TABLE = {
    "voc21": (336, None, 0.1, (0.50, 0.3, 2.2, 0.7)),
    "context60": (336, 224, 0.1, (0.30, 0.3, 1.8, 0.7)),
    "coco_object": (336, 224, 0.1, (0.11, 0.4, 1.8, 0.7)),
    "voc20": (336, None, 0.0, (0.10, 0.6, 2.1, 0.6)),
    "context59": (336, 224, 0.0, (0.25, 0.4, 1.8, 0.7)),
    "ade20k": (336, 224, 0.0, (0.25, 0.3, 2.1, 0.7)),
    "coco_stuff": (336, 224, 0.0, (0.11, 0.4, 1.8, 0.7)),
    "cityscapes": (560, 224, 0.0, (0.10, 0.2, 2.1, 0.6)),
}

# SC-CLIP's configs (github.com/SuleBai/SC-CLIP, configs/cfg_*.py): windows 224 / 112 and
# short side 336 (560 Cityscapes) everywhere, logit scale 40, no PAMR, except these
# (logit scale, background threshold, area threshold).
SCCLIP_CHANGES = {
    "voc21": (50.0, 0.15, 0.1),
    "context60": (40.0, 0.15, None),
    "coco_object": (55.0, 0.35, None),
}

# CLIPer's ViT-B/16 configs (github.com/linsun449/cliper.code, scripts/config/vit-b-16):
# short side, and its method options (logit scale, attention threshold); the whole image
# (the README's results without sliding windows).
CLIPER_TABLE = {
    "voc21": (336, 100.0, 0.1),
    "context60": (336, 100.0, 0.2),
    "coco_object": (336, 50.0, 0.2),
    "voc20": (336, 100.0, 0.1),
    "context59": (336, 100.0, 0.2),
    "ade20k": (336, 100.0, 0.2),
    "coco_stuff": (336, 50.0, 0.2),
    "cityscapes": (560, 100.0, 0.35),
}

PRESETS = ("sclip", "clip_surgery", "clearclip", "naclip", "gem", "resclip", "scclip", "cliper")


def preset_for(name: str, dataset: str) -> Preset:
    """The preset ``name`` for ``dataset``.

    ``sclip``: the table of docs/protocols.md (SCLIP's configs). ``clip_surgery``: CLIP Surgery's
    whole-image setting, the image resized to 448 x 448 and one forward (thresholds as sclip).
    ``clearclip``: short side 448, windows of 448 with stride 224. ``naclip``: sclip's, without
    windows on VOC. ``gem``: the whole image at 448 x 448 (GEM's evaluation). ``resclip``,
    ``scclip``, ``cliper``: their repositories' configs (tables above); datasets they do not
    cover (tiny-synth) use sclip's settings and the method's default options.
    """
    short, prob, scale, area = SCLIP_TABLE.get(dataset, (336, 0.0, 40.0, None))
    base = Preset(
        "sclip", short_side=short, logit_scale=scale, prob_threshold=prob, area_threshold=area
    )
    if name == "sclip":
        return base
    if name in ("clip_surgery", "gem"):
        return dataclasses.replace(base, name=name, short_side=None, square=448, window=None)
    if name == "clearclip":
        return dataclasses.replace(base, name=name, short_side=448, window=448, stride=224)
    if name == "naclip":
        window = None if dataset in ("voc21", "voc20") else base.window
        return dataclasses.replace(base, name=name, window=window)
    if name in RECENT:
        return RECENT[name](dataclasses.replace(base, name=name), dataset)
    raise DatasetError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")


def _resclip(base: Preset, dataset: str) -> Preset:
    if dataset not in RESCLIP_TABLE:
        return base
    short, window, prob, (threshold, rcs_mix, sfr_weight, sfr_mix) = RESCLIP_TABLE[dataset]
    options = {
        "sfr_threshold": threshold,
        "rcs_weight": 2.0,
        "rcs_mix": rcs_mix,
        "sfr_weight": sfr_weight,
        "sfr_mix": sfr_mix,
    }
    return dataclasses.replace(
        base,
        short_side=short,
        window=window,
        stride=112,
        logit_scale=40.0,
        prob_threshold=prob,
        area_threshold=None,
        options=options,
    )


def _scclip(base: Preset, dataset: str) -> Preset:
    if dataset not in RESCLIP_TABLE:  # the same eight datasets
        return base
    scale, prob, area = SCCLIP_CHANGES.get(dataset, (40.0, 0.0, None))
    short = 560 if dataset == "cityscapes" else 336
    return dataclasses.replace(
        base,
        short_side=short,
        window=224,
        stride=112,
        logit_scale=scale,
        prob_threshold=prob,
        area_threshold=area,
    )


def _cliper(base: Preset, dataset: str) -> Preset:
    if dataset not in CLIPER_TABLE:
        return base
    short, scale, threshold = CLIPER_TABLE[dataset]
    options = {"logit_scale": scale, "attention_thr": threshold}
    return dataclasses.replace(base, short_side=short, window=None, options=options)


RECENT = {"resclip": _resclip, "scclip": _scclip, "cliper": _cliper}
