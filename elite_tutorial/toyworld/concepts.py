"""Personal concepts: held-out toy objects whose exact look the toy language has no words for.

ELITE's job is to capture *this* object (your dog, not "a dog") from an image. In the toy world a
"personal concept" is an object the captions never describe exactly: an unnamed hue (teal, coral,
lavender), a shape outside the five (crescent, ring, cross, diamond, hexagon), a two-tone or
composite body, or a pattern the world has no word for (rings, zigzag, gradient, rainbow bands).
None of them appears in pretraining, so the only way to generate one is to read it from its image.

Each concept is rendered in a few views (position, size, rotation, background) and written in the
ELITE authors' folder layout, `N.png` with its mask `N_bg.png` (white = object):

    python -m elite_tutorial.toyworld.concepts assets/concepts

`class_word` is the toy shape word nearest to the concept, used by the class-word baseline
("a photo of a heart") that ELITE must beat.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..storage import atomic_directory
from .render import SHAPES, PATTERNS, SceneSpec, ToyObject, _polygon, render

Region = Callable[[np.ndarray, np.ndarray], np.ndarray]                 # (u, v) -> inside, bool
Fill = Callable[[np.ndarray, np.ndarray, tuple], np.ndarray]            # (u, v, rgb) -> (.., 3) colours


# -- shapes the toy language has no word for (object-local coordinates u, v in [-1, 1]) -------------

def _crescent(u, v):
    return (u**2 + v**2 <= 1.0) & ((u - 0.45) ** 2 + (v + 0.2) ** 2 > 0.75**2)


def _ring(u, v):
    return (u**2 + v**2 <= 1.0) & (u**2 + v**2 >= 0.5**2)


def _cross(u, v):
    return ((abs(u) <= 0.32) & (abs(v) <= 0.95)) | ((abs(v) <= 0.32) & (abs(u) <= 0.95))


def _diamond(u, v):
    return abs(u) / 0.72 + abs(v) <= 1.0


_hexagon = _polygon([(np.cos(a), np.sin(a)) for a in np.arange(6) * np.pi / 3])


# -- fills: colours and patterns without a name -------------------------------------------------------

def _solid(u, v, rgb):
    return PATTERNS["solid"](u, v, rgb)


def _two_colours(region: Region, second: tuple) -> Fill:
    """`rgb` where `region` is false, `second` where it is true."""
    def fill(u, v, rgb):
        return np.where(region(u, v)[..., None], np.asarray(second, np.float32), np.asarray(rgb, np.float32))
    return fill


def _gradient(bottom: tuple) -> Fill:
    """`rgb` at the top blending into `bottom` at the bottom of the object."""
    def fill(u, v, rgb):
        t = np.clip((v + 1) / 2, 0, 1)[..., None]
        return (1 - t) * np.asarray(rgb, np.float32) + t * np.asarray(bottom, np.float32)
    return fill


def _bands(colours: list[tuple]) -> Fill:
    """Horizontal bands, one per colour, top to bottom (the object's own colour is ignored)."""
    palette = np.asarray(colours, np.float32)

    def fill(u, v, rgb):
        index = np.clip(((v + 1) / 2 * len(colours)).astype(int), 0, len(colours) - 1)
        return palette[index]
    return fill


CREAM = (0.97, 0.92, 0.78)


@dataclass(frozen=True)
class PersonalConcept:
    """A held-out object: its region and fill in object-local coordinates, and its base colour."""

    name: str
    description: str   # for people: what makes it unsayable in the toy language
    class_word: str    # the nearest toy shape word (class-word baseline)
    shape: Region
    fill: Fill
    rgb: tuple[float, float, float]


CONCEPTS: tuple[PersonalConcept, ...] = (
    PersonalConcept("teal_heart", "a heart in teal, a hue between green and blue", "heart",
                    SHAPES["heart"], _solid, (0.05, 0.55, 0.55)),
    PersonalConcept("pink_dotted_star", "a pink star with darker pink dots", "star",
                    SHAPES["star"], PATTERNS["dotted"], (0.98, 0.55, 0.72)),
    PersonalConcept("maroon_ringed_square", "a maroon square with cream concentric rings", "square",
                    SHAPES["square"], _two_colours(lambda u, v: np.floor(np.sqrt(u**2 + v**2) * 4) % 2 == 1, CREAM),
                    (0.5, 0.08, 0.15)),
    PersonalConcept("split_circle", "a circle, yellow on the left half and blue on the right", "circle",
                    SHAPES["circle"], _two_colours(lambda u, v: u > 0, (0.16, 0.31, 0.86)), (0.95, 0.83, 0.16)),
    PersonalConcept("olive_zigzag_triangle", "an olive triangle with cream zigzag stripes", "triangle",
                    SHAPES["triangle"],
                    _two_colours(lambda u, v: np.floor((v + 0.35 * abs((u * 3) % 2 - 1)) * 3 + 10) % 2 == 1, CREAM),
                    (0.47, 0.47, 0.1)),
    PersonalConcept("lavender_crescent", "a lavender crescent moon", "circle",
                    _crescent, _solid, (0.72, 0.6, 0.92)),
    PersonalConcept("coral_ring", "a coral ring with a hole in the middle", "circle",
                    _ring, _solid, (1.0, 0.5, 0.4)),
    PersonalConcept("cyan_cross", "a cyan plus sign", "square",
                    _cross, _solid, (0.2, 0.85, 0.9)),
    PersonalConcept("sunset_diamond", "a diamond fading from orange at the top to magenta at the bottom", "square",
                    _diamond, _gradient((0.8, 0.1, 0.55)), (0.98, 0.6, 0.1)),
    PersonalConcept("gold_hexagon", "a gold hexagon with a brown centre", "circle",
                    _hexagon, _two_colours(lambda u, v: u**2 + v**2 < 0.4**2, (0.4, 0.22, 0.08)), (0.85, 0.65, 0.13)),
    PersonalConcept("rainbow_heart", "a heart in rainbow bands, red to blue", "heart",
                    SHAPES["heart"], _bands([(0.86, 0.16, 0.16), (0.96, 0.55, 0.12), (0.95, 0.83, 0.16),
                                             (0.16, 0.66, 0.24), (0.16, 0.31, 0.86)]), (0, 0, 0)),
    PersonalConcept("brown_white_star", "a star, chocolate brown on top and white below", "star",
                    SHAPES["star"], _two_colours(lambda u, v: v > 0.05, (0.96, 0.96, 0.96)), (0.42, 0.25, 0.13)),
)

# (position, size, rotation in degrees, background) of each view; views differ in everything but identity
VIEWS: tuple[tuple[str, str, float, str], ...] = (
    ("center", "large", 0.0, "gray"),
    ("left", "large", -12.0, "beige"),
    ("right", "large", 10.0, "wood"),
    ("center", "small", 5.0, "navy"),
)


def concept_by_name(name: str) -> PersonalConcept:
    for concept in CONCEPTS:
        if concept.name == name:
            return concept
    raise KeyError(f"No personal concept {name!r}; the concepts are: {', '.join(c.name for c in CONCEPTS)}.")


def render_concept(concept: PersonalConcept, position="center", size="large", rotation=0.0,
                   background="gray", texture_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One view of a concept: image (64, 64, 3) uint8 and object mask (64, 64) bool."""
    obj = ToyObject(shape=concept.name, colour=concept.rgb, position=position, size=size, rotation=rotation)
    image, masks = render(SceneSpec((obj,), background, texture_seed), painters={0: (concept.shape, concept.fill)})
    return image, masks[0]


def concept_views(concept: PersonalConcept) -> list[tuple[np.ndarray, np.ndarray]]:
    """The concept's standard views (VIEWS), as (image, mask) pairs."""
    return [render_concept(concept, *view, texture_seed=index) for index, view in enumerate(VIEWS)]


def write_concepts(folder: str | Path) -> Path:
    """Write every concept's views as `folder/<name>/N.png` + `N_bg.png` (replaced as a whole)."""
    with atomic_directory(folder) as staging:
        for concept in CONCEPTS:
            (staging / concept.name).mkdir()
            for index, (image, mask) in enumerate(concept_views(concept)):
                Image.fromarray(image).save(staging / concept.name / f"{index}.png")
                Image.fromarray(mask.astype(np.uint8) * 255).save(staging / concept.name / f"{index}_bg.png")
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default="assets/concepts")
    print(write_concepts(parser.parse_args(argv).folder))


if __name__ == "__main__":
    main()
