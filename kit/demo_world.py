"""The demo world: 64x64 scenes of one or two flat shapes, their captions, and a classifier.

The demo models in ``models/`` are trained on this world by ``tools/train_demo.py``, and
the classifier checks their images and captions (``tests/test_demo_eval.py``). Every scene
is drawn from a seed, so a data set is the same on every machine.

A caption names, in this order: an optional size (``small``/``large``), the color and
kind of each shape, an optional position (``in the top left``), and the background
(``on a blue background`` or ``on a blue gradient``). A two-shape caption names the left
shape first: ``a red circle and a blue square on a white background``.
"""

from __future__ import annotations

import random
import re
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
_SUPERSAMPLE = 4  # shapes are drawn at 4x and reduced with area averaging, for smooth edges

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = ("small", "medium", "large")  # captions leave out "medium"
POSITIONS = ("center", "top left", "top right", "bottom left", "bottom right")  # captions leave out "center"

# Shape width in pixels at IMAGE_SIZE, before jitter.
_DIAMETER = {"small": 22, "medium": 28, "large": 42, "pair": 24}
_CENTER = {
    "center": (32, 32),
    "top left": (18, 18),
    "top right": (46, 18),
    "bottom left": (18, 46),
    "bottom right": (46, 46),
}
# A gradient goes from the background color at the top to this mix with grey at the bottom.
_GRADIENT_GREY = 128
_GRADIENT_MIX = 0.4
# Inner radius / outer radius of the star. A regular star has 0.38, and a fatter one stays readable when small.
_STAR_INNER_RATIO = 0.45

# Number of single-shape scenes kept out of training for evaluation (see held_out_scenes).
HELD_OUT_COUNT = 48
_HELD_OUT_SEED = 2026

# Every word a caption can contain.
VOCABULARY: tuple[str, ...] = (
    "a",
    "and",
    "on",
    "in",
    "the",
    "small",
    "large",
    "top",
    "bottom",
    "left",
    "right",
    "background",
    "gradient",
    *COLORS,
    *SHAPES,
)


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    size: str = "medium"
    position: str = "center"


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]  # left to right for two shapes
    background: str
    gradient: bool = False

    def caption(self, *, say_size: bool = True, say_position: bool = True, say_background: bool = True) -> str:
        """Return the scene's caption. The flags leave out optional phrases, for prompt variety."""
        if len(self.shapes) == 1:
            shape = self.shapes[0]
            words = ["a"]
            if say_size and shape.size != "medium":
                words.append(shape.size)
            words += [shape.color, shape.kind]
            if say_position and shape.position != "center":
                words += ["in", "the", shape.position]
        else:
            words = [" and ".join(f"a {shape.color} {shape.kind}" for shape in self.shapes)]
        if say_background:
            words += ["on", "a", self.background, "gradient" if self.gradient else "background"]
        return " ".join(words)


def sample_scene(rng: random.Random, *, two_shape_fraction: float = 0.3) -> Scene:
    """Draw one scene uniformly over kinds, colors and backgrounds."""
    background = rng.choice(list(COLORS))
    colors = [name for name in COLORS if name != background]
    gradient = rng.random() < 0.5
    if rng.random() < two_shape_fraction:
        shapes = tuple(Shape(rng.choice(SHAPES), rng.choice(colors), "pair", side) for side in ("left", "right"))
        return Scene(shapes, background, gradient)
    size = rng.choice(SIZES)
    position = "center" if size == "large" else rng.choice(POSITIONS)
    return Scene((Shape(rng.choice(SHAPES), rng.choice(colors), size, position),), background, gradient)


def _pick_held_out() -> tuple[Scene, ...]:
    rng = random.Random(_HELD_OUT_SEED)
    picked: dict[Scene, None] = {}
    while len(picked) < HELD_OUT_COUNT:
        picked.setdefault(sample_scene(rng, two_shape_fraction=0.0), None)
    return tuple(picked)


# Whole scenes that training never shows: one shape of a given color, kind, size and
# position on a given plain or gradient background. Every color, kind and background, and
# every color-kind-background triple, still appears in training at other sizes, positions or
# background styles. Holding out whole triples instead teaches the models that a held-out
# kind never occurs with that color and background (one kind in four), and the small models
# trust that prior over what they see.
HELD_OUT_SCENES: tuple[Scene, ...] = _pick_held_out()
_HELD_OUT_SET = frozenset(HELD_OUT_SCENES)


def sample_training_scene(rng: random.Random) -> Scene:
    """Draw a scene that is not one of the held-out scenes."""
    while True:
        scene = sample_scene(rng)
        if scene not in _HELD_OUT_SET:
            return scene


def held_out_scenes(rng: random.Random, count: int) -> list[Scene]:
    """Return ``count`` held-out scenes, cycling through them from a start that ``rng`` picks."""
    start = rng.randrange(len(HELD_OUT_SCENES))
    return [HELD_OUT_SCENES[(start + index) % len(HELD_OUT_SCENES)] for index in range(count)]


# -- drawing -----------------------------------------------------------------------------------


def _jitter_color(rng: random.Random, name: str, spread: int = 8) -> tuple[int, int, int]:
    return tuple(min(255, max(0, value + rng.randint(-spread, spread))) for value in COLORS[name])  # type: ignore[return-value]


def _background(rng: random.Random, scene: Scene, size: int) -> Image.Image:
    top = np.array(_jitter_color(rng, scene.background), dtype=np.float32)
    if not scene.gradient:
        return Image.new("RGB", (size, size), tuple(int(v) for v in top))
    bottom = top * (1 - _GRADIENT_MIX) + _GRADIENT_GREY * _GRADIENT_MIX
    weights = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    rows = top[None, None, :] * (1 - weights) + bottom[None, None, :] * weights
    pixels = np.broadcast_to(rows, (size, size, 3)).round().astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def _outline(kind: str, cx: float, cy: float, diameter: float) -> list[tuple[float, float]] | None:
    """Return the polygon of a shape centered on (cx, cy), or None for a circle."""
    radius = diameter / 2
    if kind == "circle":
        return None
    if kind == "square":
        half = radius * 0.85
        return [(cx - half, cy - half), (cx + half, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if kind == "triangle":
        height = diameter * 0.87
        return [(cx, cy - height / 2), (cx + radius, cy + height / 2), (cx - radius, cy + height / 2)]
    if kind == "star":
        points = []
        for corner in range(10):
            angle = -np.pi / 2 + corner * np.pi / 5
            distance = radius if corner % 2 == 0 else radius * _STAR_INNER_RATIO
            points.append((cx + distance * np.cos(angle), cy + distance * np.sin(angle)))
        # The star's lower points sit only cos(36°) of the radius below its center, so shift it down to center it.
        shift = radius * (1 - np.cos(np.pi / 5)) / 2
        return [(x, y + shift) for x, y in points]
    raise ValueError(f"unknown shape kind {kind!r}; expected one of {', '.join(SHAPES)}")


def render(scene: Scene, rng: random.Random) -> Image.Image:
    """Draw a scene as a 64x64 RGB image. ``rng`` sets a small jitter of each color.

    Shapes sit at fixed places and sizes. With a jitter of a pixel or two (half a latent
    cell), the text-to-image model of tools/train_demo.py learned shapes much more slowly.
    """
    scale = _SUPERSAMPLE
    canvas = _background(rng, scene, IMAGE_SIZE * scale)
    draw = ImageDraw.Draw(canvas)
    for shape in scene.shapes:
        diameter = _DIAMETER[shape.size]
        if shape.size == "pair":
            cx, cy = (18 if shape.position == "left" else 46), 32
        else:
            cx, cy = _CENTER[shape.position]
        color = _jitter_color(rng, shape.color)
        outline = _outline(shape.kind, cx * scale, cy * scale, diameter * scale)
        if outline is None:
            radius = diameter * scale / 2
            draw.ellipse((cx * scale - radius, cy * scale - radius, cx * scale + radius, cy * scale + radius), fill=color)
        else:
            draw.polygon(outline, fill=color)
    return canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def make_dataset(count: int, seed: int) -> tuple[list[Image.Image], list[Scene]]:
    """Draw ``count`` training scenes (none of them held out) and their images from ``seed``."""
    rng = random.Random(seed)
    scenes = [sample_training_scene(rng) for _ in range(count)]
    images = [render(scene, rng) for scene in scenes]
    return images, scenes


# -- captions ----------------------------------------------------------------------------------

_SHAPE_PHRASE = re.compile(r"\b(" + "|".join(COLORS) + r")\s+(" + "|".join(SHAPES) + r")s?\b")
_BACKGROUND_PHRASE = re.compile(r"\bon\s+an?\s+(" + "|".join(COLORS) + r")\b")


@dataclass(frozen=True)
class CaptionFacts:
    """Scene content stated by a caption: shapes as (color, kind), left first, and the background color."""

    shapes: tuple[tuple[str, str], ...]
    background: str | None


def parse_caption(text: str) -> CaptionFacts:
    lowered = text.lower()
    shapes = tuple((match[1], match[2]) for match in _SHAPE_PHRASE.finditer(lowered))
    background = _BACKGROUND_PHRASE.search(lowered)
    return CaptionFacts(shapes, background[1] if background else None)


def scene_facts(scene: Scene) -> CaptionFacts:
    return CaptionFacts(tuple((shape.color, shape.kind) for shape in scene.shapes), scene.background)


# -- classifier --------------------------------------------------------------------------------

# A pixel belongs to a shape when its RGB distance from the background of its row is above this.
_FOREGROUND_DISTANCE = 60.0
# Connected regions smaller than this many pixels are noise, not shapes.
_MIN_SHAPE_PIXELS = 20
# A second region counts as a shape only when it is at least this fraction of the largest one.
_SECOND_SHAPE_FRACTION = 0.15
_BORDER = 3  # pixels at the left and right edges of each row that estimate its background


@dataclass(frozen=True)
class ShapeReading:
    kind: str
    color: str
    pixels: int
    fill: float  # pixels / bounding-box area
    solidity: float  # pixels / convex-hull area
    center: tuple[float, float]  # (x, y) in pixels


@dataclass(frozen=True)
class Reading:
    """Classifier output for one image: background color, gradient, and shapes from left to right."""

    background: str
    gradient: bool
    shapes: tuple[ShapeReading, ...] = field(default_factory=tuple)

    def facts(self) -> CaptionFacts:
        return CaptionFacts(tuple((shape.color, shape.kind) for shape in self.shapes), self.background)


def nearest_color(rgb: np.ndarray) -> str:
    names = list(COLORS)
    palette = np.array([COLORS[name] for name in names], dtype=np.float32)
    return names[int(np.argmin(((palette - rgb) ** 2).sum(axis=1)))]


def _row_backgrounds(pixels: np.ndarray) -> np.ndarray:
    """Estimate the background color of every row from the pixels at its two ends."""
    ends = np.concatenate([pixels[:, :_BORDER], pixels[:, -_BORDER:]], axis=1)
    rows = np.median(ends, axis=1)
    # A median over neighboring rows keeps a shape that touches an edge from bending the estimate.
    padded = np.pad(rows, ((4, 4), (0, 0)), mode="edge")
    windows = np.stack([padded[i : i + len(rows)] for i in range(9)])
    return np.median(windows, axis=0)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """Return the 4-connected regions of a boolean mask as arrays of (row, column) pairs."""
    height, width = mask.shape
    seen = np.zeros_like(mask)
    regions = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        queue = deque([start])
        members = []
        while queue:
            row, column = queue.popleft()
            members.append((row, column))
            for next_row, next_column in ((row - 1, column), (row + 1, column), (row, column - 1), (row, column + 1)):
                if 0 <= next_row < height and 0 <= next_column < width:
                    if mask[next_row, next_column] and not seen[next_row, next_column]:
                        seen[next_row, next_column] = True
                        queue.append((next_row, next_column))
        regions.append(np.array(members))
    return regions


def _hull_area(points: np.ndarray) -> float:
    """Return the area of the convex hull of 2-D points (Andrew's monotone chain)."""
    ordered = sorted(set(map(tuple, points.tolist())))
    if len(ordered) < 3:
        return 0.0

    def cross(o: tuple, a: tuple, b: tuple) -> float:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list[tuple] = []
    for point in ordered:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], point) <= 0:
            lower.pop()
        lower.append(point)
    upper: list[tuple] = []
    for point in reversed(ordered):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], point) <= 0:
            upper.pop()
        upper.append(point)
    hull = np.array(lower[:-1] + upper[:-1], dtype=np.float64)
    x, y = hull[:, 0], hull[:, 1]
    return float(abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) / 2)


def _shape_kind(fill: float, solidity: float) -> str:
    # Clean renders give: square fill ~1.0, circle ~0.79, triangle ~0.5, star ~0.4 with
    # solidity ~0.6 where the convex shapes are near 1.
    if solidity < 0.78:
        return "star"
    if fill > 0.88:
        return "square"
    if fill > 0.64:
        return "circle"
    return "triangle"


def _read_shape(region: np.ndarray, pixels: np.ndarray, distance: np.ndarray) -> ShapeReading:
    rows, columns = region[:, 0], region[:, 1]
    height = rows.max() - rows.min() + 1
    width = columns.max() - columns.min() + 1
    fill = len(region) / float(height * width)
    # Each pixel is a unit square, so the hull goes through pixel corners, not centers.
    corners = np.concatenate([region + offset for offset in ((0, 0), (0, 1), (1, 0), (1, 1))])
    hull = _hull_area(corners)
    solidity = len(region) / hull if hull else 1.0
    # The color comes from the pixels farthest from the background: edges are mixed with it.
    strength = distance[rows, columns]
    core = strength >= np.quantile(strength, 0.5)
    color = nearest_color(np.median(pixels[rows[core], columns[core]], axis=0))
    return ShapeReading(
        kind=_shape_kind(fill, solidity),
        color=color,
        pixels=len(region),
        fill=round(fill, 3),
        solidity=round(solidity, 3),
        center=(float(columns.mean()), float(rows.mean())),
    )


def classify(image: Image.Image) -> Reading:
    """Read the background color and each shape's color and kind from a rendered or drawn scene."""
    pixels = np.asarray(image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX), dtype=np.float32)
    backgrounds = _row_backgrounds(pixels)
    background = nearest_color(np.median(backgrounds, axis=0))
    gradient = float(np.abs(backgrounds[:8].mean(axis=0) - backgrounds[-8:].mean(axis=0)).max()) > 25.0
    distance = np.sqrt(((pixels - backgrounds[:, None, :]) ** 2).sum(axis=2))
    regions = [r for r in _components(distance > _FOREGROUND_DISTANCE) if len(r) >= _MIN_SHAPE_PIXELS]
    regions.sort(key=len, reverse=True)
    if len(regions) > 1 and len(regions[1]) < _SECOND_SHAPE_FRACTION * len(regions[0]):
        regions = regions[:1]
    shapes = [_read_shape(region, pixels, distance) for region in regions[:2]]
    shapes.sort(key=lambda shape: shape.center[0])
    return Reading(background, gradient, tuple(shapes))


def facts_match(expected: CaptionFacts, seen: CaptionFacts) -> bool:
    """Return whether two descriptions agree on the background and the multiset of shapes."""
    return expected.background == seen.background and sorted(expected.shapes) == sorted(seen.shapes)
