"""Procedural captioned scenes with exact masks: the training data and benchmark of tiny-synth.

Every scene is a pure function of its seed: one large and up to two small coloured shapes
(sizes set by area, so "the largest shape" is never a near tie; small ones may partly cover the
large one) on a textured background ("stuff"), an exact label map (0 = background, then one
class per shape category) and a caption in varied phrasings. Splits use disjoint seed ranges.
In the default design ("material") each shape is filled with its category's own pattern, so
every part of a shape shows what it is (as fur or wheels do in photographs); in the "outline"
design (the scenes of tiny-synth-siglip) a shape has one of three textures of its own and only
its outline tells its category.

``make_scene(seed, variant=k)`` for ``k > 0`` renders the same scene (background, colours,
textures, positions, sizes, angles, noise, caption wording) with other shape categories (the
large shape as each of the five for k = 0..4): groups of such variants in one training batch
are hard negatives that colour, texture and layout alone cannot tell apart, so a contrastive
model has to see shape (the idea of hard-negative batches as
in Robinson et al., "Contrastive Learning with Hard Negative Samples", ICLR 2021; here the
negatives are rendered, not mined).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

SIZE = 64
SHAPES = ("circle", "square", "triangle", "cross", "ring")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 50, 170),
    "orange": (240, 130, 30),
}
TEXTURES = ("plain", "striped", "dotted")
BACKGROUNDS = ("stripes", "dots", "noise", "gradient", "checks")
SPLITS = {"train": 0, "val": 10_000_000, "test": 20_000_000}
CLASSES = ("background", *SHAPES)
CAPTION_MODES = ("some", "all", "area")  # which shapes a caption names (``_caption``)
# How a shape shows its category: by its outline alone, or also by a material of its own
# (``_material``) that every part of it shows, as fur or wheels show in photographs.
DESIGNS = ("outline", "material")
DESIGN = "material"


@dataclass
class SceneObject:
    """One shape in a scene."""

    shape: str
    colour: str
    texture: str
    size: str  # "small" or "large"
    pixels: int = 0  # visible pixels after occlusion


@dataclass
class Scene:
    """An RGB image ``[S, S, 3]`` uint8, its label map ``[S, S]`` and a caption."""

    image: np.ndarray
    labels: np.ndarray
    caption: str
    objects: list[SceneObject] = field(default_factory=list)
    background: str = ""

    @property
    def main_shape(self) -> str:
        """The shape category with the most visible pixels (the classification target)."""
        return max(self.objects, key=lambda o: o.pixels).shape


def recorded_design(config_path) -> str | None:
    """The scene design the metrics JSON beside a model's config JSON (``NAME.metrics.json``
    beside ``NAME.json``) records: "outline" for runs older than the designs, ``None`` when there
    is no such file."""
    import json
    from pathlib import Path

    path = Path(config_path).with_suffix(".metrics.json")
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("design", "outline")


def bundled_design(model: str) -> str:
    """The scene design a bundled model ("tiny-synth", "tiny-synth-siglip") was trained on."""
    from importlib.resources import files
    from pathlib import Path

    from .loading import BUNDLED

    if model not in BUNDLED:
        raise ValueError(f"{model!r} is not a bundled model; choose one of {', '.join(BUNDLED)}")
    return recorded_design(Path(str(files("clip_surgery").joinpath(f"data/models/{model}.json"))))


def scene_seed(split: str, index: int) -> int:
    """The seed of scene ``index`` of ``split`` (disjoint ranges per split)."""
    return SPLITS[split] + index


def _make_grid() -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    ys, xs = ys + 0.5, xs + 0.5
    ys.flags.writeable = xs.flags.writeable = False
    return ys, xs


_GRID = _make_grid()


def _grid() -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (read-only, computed once)."""
    return _GRID


def _shape_mask(shape: str, cy: float, cx: float, radius: float, angle: float) -> np.ndarray:
    ys, xs = _grid()
    dy, dx = ys - cy, xs - cx
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy  # rotated coordinates
    if shape == "circle":
        return dx**2 + dy**2 <= radius**2
    if shape == "ring":
        distance = np.sqrt(dx**2 + dy**2)
        return (distance <= radius) & (distance >= radius * 0.55)
    if shape == "square":
        side = radius * 0.85
        return (np.abs(u) <= side) & (np.abs(v) <= side)
    if shape == "cross":
        arm = radius * 0.33
        return ((np.abs(u) <= radius) & (np.abs(v) <= arm)) | (
            (np.abs(v) <= radius) & (np.abs(u) <= arm)
        )
    # triangle: inside three half-planes of an equilateral triangle
    inside = np.ones_like(u, dtype=bool)
    for k in range(3):
        theta = angle + k * 2 * np.pi / 3
        inside &= np.cos(theta) * dx + np.sin(theta) * dy <= radius * 0.5
    return inside


def _texture(texture: str, colour: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    ys, xs = _grid()
    base = np.broadcast_to(colour, (SIZE, SIZE, 3)).astype(np.float32)
    if texture == "plain":
        return base.copy()
    if texture == "striped":
        period = rng.uniform(4, 7)
        stripes = (np.sin((xs + ys) * 2 * np.pi / period) > 0)[..., None]
        return np.where(stripes, base, base * 0.45)
    dots = ((np.mod(xs, 5) - 2.5) ** 2 + (np.mod(ys, 5) - 2.5) ** 2 < 2.2)[..., None]
    return np.where(dots, base * 0.4 + 150, base)


MATERIALS = {  # the category's own fill pattern, in image coordinates (no hint of position)
    "circle": "polka dots",
    "square": "small checks",
    "triangle": "diagonal stripes",
    "cross": "grid lines",
    "ring": "waves",
}


def _material(shape: str, colour: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """The fill of a ``shape`` in ``colour``: its category's pattern (``MATERIALS``) at a period
    and phase set by ``draws`` (3 uniform numbers, drawn whatever the category, so variants of a
    scene consume the same random stream)."""
    ys, xs = _grid()
    period = 4.0 + 2.0 * draws[0]
    y, x = ys + draws[1] * 8, xs + draws[2] * 8
    base = np.broadcast_to(colour, (SIZE, SIZE, 3)).astype(np.float32)
    light = float(np.dot(colour, (0.299, 0.587, 0.114))) > 120  # contrast on every colour
    accent = base * 0.35 + (0 if light else 150)
    if shape == "circle":
        pattern = (np.mod(x, period) - period / 2) ** 2 + (np.mod(y, period) - period / 2) ** 2
        on = pattern < (period * 0.3) ** 2
    elif shape == "square":
        cell = period / 2
        on = (np.floor(x / cell) + np.floor(y / cell)) % 2 == 0
    elif shape == "triangle":
        on = np.mod(x + y, period) < period / 2
    elif shape == "cross":
        on = (np.mod(x, period) < 1.2) | (np.mod(y, period) < 1.2)
    else:  # ring
        on = np.mod(y + 1.5 * np.sin(x * 2 * np.pi / period), period) < period / 2
    return np.where(on[..., None], accent, base)


def _background(kind: str, rng: np.random.Generator) -> np.ndarray:
    ys, xs = _grid()
    first = rng.uniform(60, 200, 3)
    second = np.clip(first + rng.uniform(-70, 70, 3), 0, 255)
    if kind == "stripes":
        period, angle = rng.uniform(6, 14), rng.uniform(0, np.pi)
        pattern = np.sin((np.cos(angle) * xs + np.sin(angle) * ys) * 2 * np.pi / period) > 0
    elif kind == "dots":
        step = rng.integers(6, 10)
        pattern = (np.mod(xs, step) - step / 2) ** 2 + (np.mod(ys, step) - step / 2) ** 2 < 4
    elif kind == "noise":
        coarse = rng.random((8, 8))
        pattern = np.kron(coarse, np.ones((SIZE // 8, SIZE // 8))) > 0.5
    elif kind == "checks":
        step = rng.integers(6, 12)
        pattern = (xs // step + ys // step) % 2 == 0
    else:  # gradient
        weight = (xs / SIZE)[..., None] if rng.random() < 0.5 else (ys / SIZE)[..., None]
        return first * (1 - weight) + second * weight
    return np.where(pattern[..., None], first, second)


def _describe(obj: SceneObject, rng: np.random.Generator) -> str:
    words = []
    if rng.random() < 0.5:
        words.append(obj.size)
    if rng.random() < 0.85:
        words.append(obj.colour)
    if obj.texture != "plain" and rng.random() < 0.6:
        words.append(obj.texture)
    words.append(obj.shape)
    article = "an" if words[0][0] in "aeiou" else "a"
    return f"{article} {' '.join(words)}"


def _caption(
    objects: list[SceneObject], background: str, rng: np.random.Generator, mode: str = "some"
) -> str:
    """Names k visible shapes (k uniform in 1..(visible count)): the k largest, largest first
    (``mode="some"``), every one (``"all"``; k is drawn either way), or k drawn without
    replacement with probability proportional to their visible pixels, in the order drawn
    (``"area"``: no word of the caption depends on comparing the shapes' sizes)."""
    ordered = [o for o in sorted(objects, key=lambda o: -o.pixels) if o.pixels > 0]
    count = int(rng.integers(1, len(ordered) + 1))
    if mode == "area":
        weights = np.array([o.pixels for o in ordered], dtype=np.float64)
        picks = rng.choice(len(ordered), size=count, replace=False, p=weights / weights.sum())
        mentioned = [ordered[i] for i in picks]
    else:
        mentioned = ordered if mode == "all" else ordered[:count]
    parts = [_describe(o, rng) for o in mentioned]
    listing = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    form = rng.integers(0, 6)
    if form == 5:  # a prompt template's own wording, as web captions share it with prompts
        from .text import default_templates

        templates = default_templates()
        template = templates[rng.integers(len(templates))]
        bare = listing.split(" ", 1)[1]  # the template brings its own article
        return template.replace("{}", bare)
    text = [
        f"{listing}",
        f"a picture of {listing}",
        f"there is {listing}",
        f"{listing} in the scene",
        f"an image showing {listing}",
    ][form]
    if rng.random() < 0.4:
        text += f" on a {background} background"
    return text


def _variant_shapes(drawn: list[int], seed: int, variant: int) -> list[int]:
    """Other shape categories for the objects of scene ``seed`` (variant > 0).

    The large shape (drawn first) moves ``variant`` categories on, so variants 0-4 show it as
    each of the five shapes; the small shapes get fresh categories.
    """
    rng = np.random.default_rng([seed, variant])
    small = [int(v) for v in rng.integers(len(SHAPES), size=len(drawn) - 1)]
    return [(drawn[0] + variant) % len(SHAPES), *small]


# Area of each shape per squared radius (``_shape_mask``): a shape is drawn at the radius that
# gives it the scene's chosen area, so "large" and "small" mean the same pixel counts for every
# category, and the largest shape of a scene is never a near tie.
AREA_PER_RADIUS2 = {
    "circle": np.pi,
    "ring": np.pi * (1 - 0.55**2),
    "square": (2 * 0.85) ** 2,
    "cross": 2 * (2 * 0.66) - 0.66**2,
    "triangle": 3 * np.sqrt(3) * 0.5**2,
}
LARGE_AREA, SMALL_AREA = (420.0, 800.0), (110.0, 220.0)
MAX_OBJECTS = 3


def _reach(area: float) -> float:
    """The farthest any category of this area reaches from its centre (the triangle's)."""
    return float(np.sqrt(area / min(AREA_PER_RADIUS2.values())))


def _place(areas: list[float], rng: np.random.Generator) -> list[tuple[float, float]]:
    """Centres for shapes of ``areas`` (the first one large): inside the picture, the small ones
    off the large one's body (their equal-area circles at most touch), so occlusion stays
    partial. A shape that finds no place in 40 tries is left out."""
    centres: list[tuple[float, float]] = []
    for area in areas:
        margin = 0.75 * _reach(area)
        for _ in range(40):
            cy, cx = rng.uniform(margin, SIZE - margin, 2)
            apart = all(
                np.hypot(cy - y, cx - x) >= np.sqrt(area / np.pi) + np.sqrt(other / np.pi)
                for (y, x), other in zip(centres, areas, strict=False)
            )
            if apart:
                centres.append((float(cy), float(cx)))
                break
        else:
            centres.append((np.nan, np.nan))
    return centres


def make_scene(
    seed: int, variant: int = 0, captions: str = "some", design: str | None = None
) -> Scene:
    """The scene of ``seed``: deterministic image, labels and caption.

    One large shape and up to two small ones (areas ``LARGE_AREA`` / ``SMALL_AREA`` pixels),
    coloured and textured, on a textured background, with mild noise. ``variant > 0``: the
    same scene with other shape categories (see the module docstring); variant 0 is the scene
    itself. ``captions``: which shapes the caption names (``CAPTION_MODES``, see ``_caption``).
    ``design``: ``DESIGNS``, default ``DESIGN``; with "material" each shape is filled with its
    category's pattern (``_material``) instead of a texture of its own, and captions name no
    texture.
    """
    design = DESIGN if design is None else design
    if captions not in CAPTION_MODES:  # before any rendering
        raise ValueError(
            f"unknown caption mode {captions!r}; choose one of {', '.join(CAPTION_MODES)}"
        )
    if design not in DESIGNS:
        raise ValueError(f"unknown scene design {design!r}; choose one of {', '.join(DESIGNS)}")
    rng = np.random.default_rng(seed)
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    image = _background(background, rng)
    count = int(rng.integers(1, MAX_OBJECTS + 1))
    areas = [rng.uniform(*LARGE_AREA)] + [rng.uniform(*SMALL_AREA) for _ in range(count - 1)]
    centres = _place(areas, rng)
    drawn = []  # the random stream never depends on a shape's category, so swapping is exact
    for index, (area, (cy, cx)) in enumerate(zip(areas, centres, strict=True)):
        shape = int(rng.integers(len(SHAPES)))
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        texture = TEXTURES[rng.integers(len(TEXTURES))]
        angle = rng.uniform(0, np.pi)
        if design == "material":
            texture, fill = "plain", rng.random(3)  # the fill waits for the final category
        else:
            fill = _texture(texture, np.array(COLOURS[colour], np.float32), rng)
        if not np.isnan(cy):
            drawn.append((shape, colour, texture, index == 0, area, cy, cx, angle, fill))
    shapes = [d[0] for d in drawn]
    if variant:
        shapes = _variant_shapes(shapes, seed, variant)
    labels = np.zeros((SIZE, SIZE), np.uint8)
    owner = np.full((SIZE, SIZE), -1)
    objects = []
    for index, (shape, (_, colour, texture, large, area, cy, cx, angle, fill)) in enumerate(
        zip(shapes, drawn, strict=True)
    ):
        name = SHAPES[shape]
        if design == "material":
            fill = _material(name, np.array(COLOURS[colour], np.float32), fill)
        mask = _shape_mask(name, cy, cx, np.sqrt(area / AREA_PER_RADIUS2[name]), angle)
        image = np.where(mask[..., None], fill, image)
        labels[mask] = shape + 1
        owner[mask] = index
        objects.append(SceneObject(name, colour, texture, "large" if large else "small"))
    for index, obj in enumerate(objects):
        obj.pixels = int((owner == index).sum())
    objects = [o for o in objects if o.pixels > 0] or objects
    noise = rng.normal(0, 6, image.shape)
    picture = np.clip(image + noise, 0, 255).astype(np.uint8)
    caption = _caption(objects, background, rng, captions)
    return Scene(picture, labels, caption, objects, background)


def scenes(split: str, count: int, start: int = 0, design: str | None = None) -> list[Scene]:
    """``count`` scenes of ``split`` from index ``start`` (``design``: see ``make_scene``)."""
    return [make_scene(scene_seed(split, start + i), design=design) for i in range(count)]


def export_voc(root, split: str = "test", count: int = 200, design: str | None = None) -> list[str]:
    """Write ``count`` scenes of ``split`` in the VOC layout of the evaluation harness
    (dataset ``synthetic``: lossless PNG images, label PNGs, ``val.txt``); returns the ids."""
    from pathlib import Path

    from PIL import Image

    base = Path(root) / "VOCdevkit/VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    keys = []
    for index in range(count):
        scene = make_scene(scene_seed(split, index), design=design)
        key = f"{split}_{index:05d}"
        Image.fromarray(scene.image).save(base / "JPEGImages" / f"{key}.png")
        Image.fromarray(scene.labels, mode="L").save(base / "SegmentationClass" / f"{key}.png")
        keys.append(key)
    (base / "ImageSets/Segmentation/val.txt").write_text("\n".join(keys) + "\n")
    return keys


def zero_shot_accuracy(
    model, split: str = "test", count: int = 1000, design: str | None = None
) -> float:
    """Share of ``split`` scenes whose largest shape is CLIP's top class among SHAPES.

    ``model`` is a SurgeryModel: the default 85-template ensemble per shape name, CLIP's plain
    image embedding (CLS), cosine argmax.
    """
    import torch

    text = model.encode_text(list(SHAPES))
    correct = 0
    for begin in range(0, count, 256):
        chunk = scenes(split, min(256, count - begin), begin, design)
        images = torch.stack([_to_input(model, s.image) for s in chunk])
        cls = model.encode_image(images, surgery=False)[:, 0]
        guesses = (torch.nn.functional.normalize(cls, dim=-1) @ text.T).argmax(dim=-1).tolist()
        correct += sum(SHAPES[g] == s.main_shape for g, s in zip(guesses, chunk, strict=True))
    return correct / count


def _to_input(model, image: np.ndarray):
    from PIL import Image

    return model.preprocess(Image.fromarray(image))


def pointing_game(
    model,
    method: str = "clip_surgery",
    split: str = "test",
    count: int = 200,
    *,
    min_pixels: int = 200,
    batch: int = 50,
    design: str | None = None,
    **options,
) -> dict:
    """The pointing game of ``method`` on ``count`` scenes of ``split``, class set = SHAPES.

    For each shape category present in a scene, its map (``model.explain`` at the native size,
    the maps of ``clip_surgery.features.similarity_map`` at the scene's size) scores a hit when
    its peak pixel (``eval.metrics.peak_indices``, as ``pointing_hits``) lies on that category's
    exact mask. Returns the hit rate over all (scene, shape) pairs, over pairs of at least
    ``min_pixels`` visible pixels (``large``), the expected rate of a uniformly random point
    (``random``), the rate of an oracle map on the same token grid (``oracle``: each token's
    share of the shape's pixels, turned into a map the same way), the share of peaks on the
    background (``background_peak``), the pair counts, and where the peaks land (``peaks``): for
    the scene's largest shape category (the most visible pixels) and for the other categories
    present, the shares of peaks on the shape's own mask, on the background and on another
    shape; and per category, the hits and pairs of at least ``min_pixels`` (``large_by_shape``).
    """
    import torch
    import torch.nn.functional as F

    from .eval.metrics import pointing_hits
    from .features import similarity_map

    landing, largest, sizes, chance, oracle, categories = [], [], [], [], [], []
    for begin in range(0, count, batch):
        chunk = scenes(split, min(batch, count - begin), begin, design)
        images = torch.stack([_to_input(model, s.image) for s in chunk])
        result = model.explain(images, list(SHAPES), method=method, **options)
        maps = similarity_map(result.similarity.float().cpu(), (SIZE, SIZE), result.grid)
        for scene, scene_maps in zip(chunk, maps, strict=True):
            labels = torch.from_numpy(scene.labels.astype(np.int64))
            present = [c for c in torch.unique(labels).tolist() if c > 0]
            heatmaps = scene_maps[[c - 1 for c in present]]
            masks = torch.stack([labels == c for c in present])
            pixels = masks.sum(dim=(1, 2))
            landing += _peak_places(heatmaps, labels, present)  # a hit: the peak on its own mask
            largest += [index == int(pixels.argmax()) for index in range(len(present))]
            sizes += pixels.tolist()
            categories += [SHAPES[c - 1] for c in present]
            shares = F.adaptive_avg_pool2d(masks[None].float(), result.grid)[0]
            best = similarity_map(shares.flatten(1).T[None], (SIZE, SIZE), result.grid)[0]
            oracle += pointing_hits(best, masks).tolist()
            chance += (masks.double().mean(dim=(1, 2))).tolist()
    hits_array, sizes_array = np.array([place == "own" for place in landing]), np.array(sizes)
    large = sizes_array >= min_pixels
    return {
        "method": method,
        "all": float(hits_array.mean()),
        "large": float(hits_array[large].mean()),
        "random": float(np.mean(chance)),
        "random_large": float(np.array(chance)[large].mean()),
        "oracle": float(np.mean(oracle)),
        "oracle_large": float(np.array(oracle)[large].mean()),
        "background_peak": float(np.mean([place == "background" for place in landing])),
        "peaks": _peak_shares(landing, largest),
        "large_by_shape": _hits_by_shape(hits_array[large], np.array(categories)[large]),
        "pairs": len(landing),
        "large_pairs": int(large.sum()),
        "min_pixels": min_pixels,
    }


def _hits_by_shape(hits: np.ndarray, categories: np.ndarray) -> dict[str, dict[str, int]]:
    """Per shape category, its pairs' hit count and pair count."""
    return {
        shape: {
            "hits": int(hits[categories == shape].sum()),
            "pairs": int((categories == shape).sum()),
        }
        for shape in SHAPES
    }


def pointing_figures(
    model,
    methods: tuple[str, ...],
    split: str = "test",
    count: int = 200,
    design: str | None = None,
) -> dict[str, dict]:
    """Per method, the pointing game's figures as the measuring scripts record them.

    ``all``, ``large`` and ``background_peak`` rounded to 4 decimals, ``pairs``, ``peaks`` (its
    shares rounded the same way) and ``large_by_shape``."""
    figures = {}
    for method in methods:
        game = pointing_game(model, method, split, count, design=design)
        peaks = {
            group: {k: v if k == "pairs" else round(v, 4) for k, v in shares.items()}
            for group, shares in game["peaks"].items()
        }
        figures[method] = {k: round(game[k], 4) for k in ("all", "large", "background_peak")}
        figures[method].update(
            pairs=game["pairs"], peaks=peaks, large_by_shape=game["large_by_shape"]
        )
    return figures


PEAK_PLACES = ("own", "background", "other_shape")  # where a map's peak can land (``peaks``)


def _peak_places(heatmaps: torch.Tensor, labels: torch.Tensor, present: list[int]) -> list[str]:
    """Where each map's peak (``eval.metrics.peak_indices``) lies: own mask, background, other.

    ``heatmaps`` ``[K, H, W]`` for the categories ``present`` (K of them), ``labels`` ``[H, W]``.
    """
    from .eval.metrics import peak_indices

    found = labels.flatten()[peak_indices(heatmaps)].tolist()
    return [
        "own" if label == category else "background" if label == 0 else "other_shape"
        for label, category in zip(found, present, strict=True)
    ]


def _peak_shares(places: list[str], largest: list[bool]) -> dict[str, dict[str, float]]:
    """Shares of ``PEAK_PLACES`` (NaN for a group without pairs) and the pair count ``pairs``,
    for the largest category's pairs (``largest``) and for the others' (``others``)."""
    shares = {}
    for group, wanted in (("largest", True), ("others", False)):
        chosen = [place for place, big in zip(places, largest, strict=True) if big == wanted]
        count = len(chosen)
        shares[group] = {p: chosen.count(p) / count if count else float("nan") for p in PEAK_PLACES}
        shares[group]["pairs"] = count
    return shares
