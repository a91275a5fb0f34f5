"""The toy world: 64 x 64 RGB scenes of one or two objects, with exact labels, masks and captions.

Why 64 px: the VAE below has a downsampling factor of 4, so latents are 16 x 16 (the size of
CLIP ViT-L/14's patch grid, and big enough for cross-attention maps to show *where* a word lands),
while a 25-step generation still takes well under a second on a laptop CPU.

An object is a shape (a region of the unit square) filled by a pattern (a colour field), placed at a
position with a size. Shapes and patterns are plain functions of object-local coordinates (u, v) in
[-1, 1], so the personal concepts in `concepts.py` reuse the same machinery with shapes, hues and
patterns that the toy language has no words for.

Scenes are drawn at 2x and box-filtered down (anti-aliased edges, as real photos have); a pixel
belongs to an object's mask when the object covers at least half of it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

SIZE = 64          # image side in pixels
_SS = 2            # supersampling factor

Field = np.ndarray  # (H, W) float coordinates or (H, W, 3) colours in [0, 1]

# --------------------------------------------------------------------------------------------------
# Vocabulary of the world: each attribute's values, in a fixed order (class indices for the judge).

COLOURS = {
    "red": (0.86, 0.16, 0.16), "green": (0.16, 0.66, 0.24), "blue": (0.16, 0.31, 0.86),
    "yellow": (0.95, 0.83, 0.16), "purple": (0.55, 0.24, 0.71), "orange": (0.96, 0.55, 0.12),
    "white": (0.96, 0.96, 0.96), "black": (0.1, 0.1, 0.1),
}
SIZES = {"small": 7.0, "large": 13.0}  # object radius in pixels
POSITIONS = {"left": (18, 32), "right": (46, 32), "top": (32, 18), "bottom": (32, 46), "center": (32, 32)}
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                    "bottom": "at the bottom", "center": "in the center"}


def _polygon(points: list[tuple[float, float]]) -> Callable[[Field, Field], Field]:
    """Inside test of a closed polygon (even-odd rule), vectorised over a coordinate grid."""
    pts = np.asarray(points, dtype=np.float32)

    def inside(u: Field, v: Field) -> Field:
        result = np.zeros(u.shape, dtype=bool)
        for (x0, y0), (x1, y1) in zip(pts, np.roll(pts, -1, axis=0)):
            crosses = (y0 > v) != (y1 > v)
            x_at = x0 + (v - y0) * (x1 - x0) / (y1 - y0 + 1e-12)
            result ^= crosses & (u < x_at)
        return result

    return inside


def _star_points(tips: int, inner: float) -> list[tuple[float, float]]:
    angles = -np.pi / 2 + np.arange(2 * tips) * np.pi / tips
    radii = np.where(np.arange(2 * tips) % 2 == 0, 1.0, inner)
    return list(zip(radii * np.cos(angles), radii * np.sin(angles)))


def _heart(u: Field, v: Field) -> Field:
    x, y = u * 1.15, -v * 1.15 + 0.2  # the implicit heart curve, scaled to fill the unit square
    return (x**2 + y**2 - 1) ** 3 - x**2 * y**3 <= 0


SHAPES: dict[str, Callable[[Field, Field], Field]] = {
    "circle": lambda u, v: u**2 + v**2 <= 1.0,
    "square": lambda u, v: np.maximum(abs(u), abs(v)) <= 0.82,
    "triangle": _polygon([(0.0, -0.95), (0.95, 0.75), (-0.95, 0.75)]),
    "star": _polygon(_star_points(5, 0.45)),
    "heart": _heart,
}


def _shade(rgb, amount: float) -> np.ndarray:
    """Lighter (amount > 0) or darker (< 0) version of a colour, for the second tone of a pattern."""
    rgb = np.asarray(rgb, dtype=np.float32)
    return rgb + (1 - rgb) * amount if amount > 0 else rgb * (1 + amount)


def _second_tone(rgb) -> np.ndarray:
    return _shade(rgb, -0.75) if np.mean(rgb) > 0.5 else _shade(rgb, 0.75)


def _two_tone(region: Callable[[Field, Field], Field]) -> Callable[[Field, Field, tuple], Field]:
    def fill(u, v, rgb):
        first, second = np.asarray(rgb, dtype=np.float32), _second_tone(rgb)
        return np.where(region(u, v)[..., None], second, first)
    return fill


PATTERNS: dict[str, Callable[[Field, Field, tuple], Field]] = {
    "solid": lambda u, v, rgb: np.broadcast_to(np.asarray(rgb, dtype=np.float32), u.shape + (3,)),
    "striped": _two_tone(lambda u, v: np.floor((u + v) * 2.2) % 2 == 1),
    "dotted": _two_tone(lambda u, v: ((u * 2.5 + 10) % 1 - 0.5) ** 2 + ((v * 2.5 + 10) % 1 - 0.5) ** 2 < 0.09),
    "checkered": _two_tone(lambda u, v: (np.floor(u * 2.2 + 10) + np.floor(v * 2.2 + 10)) % 2 == 1),
}


def _smooth_noise(rng: np.random.Generator, cells: int, size: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a random grid, bilinearly upsampled (textures, not pixel noise)."""
    grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
    t = np.linspace(0, cells, size, dtype=np.float32)
    i = np.minimum(t.astype(int), cells - 1)
    f = t - i
    rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None] + rows[:, i + 1] * f[None]


def _plain(rgb) -> Callable[[np.random.Generator, Field, Field], Field]:
    return lambda rng, x, y: np.broadcast_to(np.asarray(rgb, dtype=np.float32), x.shape + (3,))


def _grass(rng, x, y):
    n = _smooth_noise(rng, 8, x.shape[0])[..., None]
    return np.asarray((0.30, 0.52, 0.20), np.float32) * (0.8 + 0.4 * n)


def _water(rng, x, y):
    phase = rng.uniform(0, 2 * np.pi)
    waves = 0.5 + 0.5 * np.sin(y / x.shape[0] * 2 * np.pi * 5 + np.sin(x / x.shape[0] * 2 * np.pi * 2 + phase))
    return np.asarray((0.35, 0.62, 0.80), np.float32) * (0.85 + 0.25 * waves[..., None])


def _wood(rng, x, y):
    n = _smooth_noise(rng, 4, x.shape[0])
    grain = 0.5 + 0.5 * np.sin(x / x.shape[0] * 2 * np.pi * 6 + 4 * n)
    return np.asarray((0.62, 0.42, 0.24), np.float32) * (0.8 + 0.3 * grain[..., None])


BACKGROUNDS: dict[str, Callable[[np.random.Generator, Field, Field], Field]] = {
    "gray": _plain((0.5, 0.5, 0.5)),
    "beige": _plain((0.87, 0.80, 0.66)),
    "navy": _plain((0.10, 0.14, 0.35)),
    "mint": _plain((0.70, 0.90, 0.80)),
    "grass": _grass,
    "water": _water,
    "wood": _wood,
}
# object colours that would vanish on a background are not drawn on it
LOW_CONTRAST = {"beige": {"white", "yellow"}, "navy": {"black", "blue"}, "mint": {"white"},
                "grass": {"green"}, "water": {"blue"}, "wood": {"orange"}}

ATTRIBUTES = {
    "shape": tuple(SHAPES), "colour": tuple(COLOURS), "pattern": tuple(PATTERNS),
    "size": tuple(SIZES), "position": tuple(POSITIONS), "background": tuple(BACKGROUNDS),
}

# --------------------------------------------------------------------------------------------------
# Scenes.


@dataclass(frozen=True)
class ToyObject:
    """One object. `shape`/`pattern` name an entry of SHAPES/PATTERNS, unless the painter is custom."""

    shape: str
    colour: str
    pattern: str = "solid"
    size: str = "large"
    position: str = "center"
    rotation: float = 0.0               # degrees
    offset: tuple[float, float] = (0.0, 0.0)  # pixels, added to the position's centre
    scale: float = 1.0                  # multiplies the size's radius


@dataclass(frozen=True)
class SceneSpec:
    """Everything that decides a scene's pixels: its objects, background and texture seed."""

    objects: tuple[ToyObject, ...]
    background: str = "gray"
    texture_seed: int = 0

    def labels(self) -> dict[str, str]:
        """Attribute labels of a single-object scene (what the judge predicts)."""
        if len(self.objects) != 1:
            raise ValueError("labels() is defined for single-object scenes")
        obj = self.objects[0]
        return {"shape": obj.shape, "colour": obj.colour, "pattern": obj.pattern, "size": obj.size,
                "position": obj.position, "background": self.background}


@dataclass
class Scene:
    """A rendered scene. image: (64, 64, 3) uint8; masks: (objects, 64, 64) bool."""

    spec: SceneSpec
    image: np.ndarray
    masks: np.ndarray
    caption: str = ""


def _grid(size: int) -> tuple[Field, Field]:
    coords = (np.arange(size * _SS, dtype=np.float32) + 0.5) / _SS
    return np.meshgrid(coords, coords)  # x (column), y (row), in pixel units


_X, _Y = _grid(SIZE)


def object_coverage_and_colour(obj: ToyObject, shape_fn=None, fill_fn=None) -> tuple[Field, Field]:
    """Supersampled inside-mask (H*2, W*2) and colour field (H*2, W*2, 3) of one object."""
    cx, cy = POSITIONS[obj.position]
    cx, cy = cx + obj.offset[0], cy + obj.offset[1]
    radius = SIZES[obj.size] * obj.scale
    angle = np.deg2rad(obj.rotation)
    dx, dy = (_X - cx) / radius, (_Y - cy) / radius
    u = np.cos(angle) * dx + np.sin(angle) * dy
    v = -np.sin(angle) * dx + np.cos(angle) * dy
    shape_fn = shape_fn or SHAPES[obj.shape]
    fill_fn = fill_fn or PATTERNS[obj.pattern]
    rgb = COLOURS.get(obj.colour, obj.colour)
    return shape_fn(u, v), fill_fn(u, v, rgb)


def _downsample(field_: np.ndarray) -> np.ndarray:
    h, w = field_.shape[0] // _SS, field_.shape[1] // _SS
    return field_.reshape(h, _SS, w, _SS, *field_.shape[2:]).mean(axis=(1, 3))


def render(spec: SceneSpec, painters: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pixels and masks of a scene: image (64, 64, 3) uint8, masks (objects, 64, 64) bool.

    `painters` maps an object index to `(shape_fn, fill_fn)` for objects outside the vocabulary.
    Later objects are drawn over earlier ones; each mask is what stays visible of its object.
    """
    painters = painters or {}
    rng = np.random.default_rng(spec.texture_seed)
    canvas = np.array(BACKGROUNDS[spec.background](rng, _X, _Y), dtype=np.float32)
    visible = []
    for index, obj in enumerate(spec.objects):
        inside, colour = object_coverage_and_colour(obj, *painters.get(index, (None, None)))
        canvas = np.where(inside[..., None], colour, canvas)
        visible = [m & ~inside for m in visible] + [inside]
    image = np.clip(_downsample(canvas) * 255 + 0.5, 0, 255).astype(np.uint8)
    if not visible:
        return image, np.zeros((0, SIZE, SIZE), bool)
    coverage = np.stack([_downsample(m.astype(np.float32)) for m in visible])
    # a pixel half-covered by each of two objects goes to the one on top: masks never overlap
    top = len(visible) - 1 - np.argmax(coverage[::-1], axis=0)
    masks = (coverage >= 0.5) & (np.arange(len(visible))[:, None, None] == top)
    return image, masks


# --------------------------------------------------------------------------------------------------
# Random scenes and their captions.

PREFIXES = ("a photo of", "a picture of", "an image of", "a rendering of", "")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe_object(obj: ToyObject, rng: np.random.Generator | None = None, drop: float = 0.0) -> str:
    """'a large red striped star on the left'; with `drop` > 0, each attribute is left out at random
    with that probability (the shape is always said). A solid pattern is said as 'solid' or not at all."""
    def keep() -> bool:
        return rng is None or rng.random() >= drop

    words = []
    if keep():
        words.append(obj.size)
    if keep():
        words.append(obj.colour)
    if obj.pattern != "solid":
        if keep():
            words.append(obj.pattern)
    elif rng is not None and rng.random() < 0.15:  # "solid" is said now and then, never in full captions
        words.append(obj.pattern)
    words.append(obj.shape)
    phrase = " ".join(words)
    if keep():
        phrase += " " + POSITION_PHRASES[obj.position]
    return f"{_article(phrase)} {phrase}"


def described(identity: dict[str, str]) -> str:
    """An object's identity in the toy language, the way a caption says it in full: 'green dotted
    circle' ('solid' goes unsaid). `identity` holds its colour, pattern and shape."""
    pattern = [] if identity["pattern"] == "solid" else [identity["pattern"]]
    return " ".join([identity["colour"], *pattern, identity["shape"]])


def caption(spec: SceneSpec, rng: np.random.Generator | None = None, drop: float = 0.0) -> str:
    """A plain-English caption; with `rng`, a random prefix and randomly dropped attributes."""
    text = " and ".join(describe_object(o, rng, drop) for o in spec.objects)
    if rng is None or rng.random() >= drop:
        text += f", on {_article(spec.background)} {spec.background} background"
    prefix = "a photo of" if rng is None else PREFIXES[rng.integers(len(PREFIXES))]
    if prefix:
        text = f"{prefix} {text}"
    return text


def random_object(rng: np.random.Generator, position: str | None = None, background: str | None = None) -> ToyObject:
    colours = [c for c in COLOURS if c not in LOW_CONTRAST.get(background, ())]
    return ToyObject(
        shape=ATTRIBUTES["shape"][rng.integers(len(SHAPES))],
        colour=colours[rng.integers(len(colours))],
        pattern=ATTRIBUTES["pattern"][rng.integers(len(PATTERNS))],
        size=ATTRIBUTES["size"][rng.integers(len(SIZES))],
        position=position or ATTRIBUTES["position"][rng.integers(len(POSITIONS))],
        offset=tuple(float(o) for o in rng.uniform(-2, 2, size=2)),
        scale=float(rng.uniform(0.9, 1.1)),
    )


def random_spec(rng: np.random.Generator, two_object_probability: float = 0.25) -> SceneSpec:
    """A random scene: one object, or two side by side (left/right or top/bottom)."""
    background = ATTRIBUTES["background"][rng.integers(len(BACKGROUNDS))]
    if rng.random() < two_object_probability:
        pair = ("left", "right") if rng.random() < 0.5 else ("top", "bottom")
        objects = tuple(random_object(rng, p, background) for p in pair)
    else:
        objects = (random_object(rng, background=background),)
    return SceneSpec(objects, background, texture_seed=int(rng.integers(2**31)))


def random_scene(seed: int, drop: float = 0.3, two_object_probability: float = 0.25) -> Scene:
    """Scene number `seed`: deterministic, independent of any other scene."""
    rng = np.random.default_rng(seed)
    spec = random_spec(rng, two_object_probability)
    image, masks = render(spec)
    return Scene(spec, image, masks, caption(spec, rng, drop))


def exact_scene(spec: SceneSpec) -> Scene:
    """Render a given spec with its full caption (nothing dropped)."""
    image, masks = render(spec)
    return Scene(spec, image, masks, caption(spec))


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """Rendered images (n, 64, 64, 3) uint8 -> floats (n, 3, 64, 64) in [0, 1], as the models read them."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
