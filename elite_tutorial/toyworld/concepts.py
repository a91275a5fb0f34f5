"""Personal concepts: toy objects the toy model can draw, in combinations no mapper ever sees.

In Stable Diffusion your teapot is drawable (some embedding draws it) but not sayable in one typed
word. The toy world's personal concepts keep that premise: each is an *identity*, a shape, a colour
and a pattern, every value of which the toy model draws and sees in many training identities, in a
combination held out of every mapper training source (`is_held_out`; `sources.ToyWorldSource` and the
other sources never produce one) and of the retrained image encoder's data. The toy language can say
a concept in three words ("red dotted heart"); its class word ("heart") says a third of it.

Each concept is rendered in four views (position, size, background; three large, one small) and
written in the ELITE authors' folder layout, `N.png` with its mask `N_bg.png` (white = object), with
`labels.json` beside the folders: each folder's true `shape`, `colour`, `pattern`, its `class_word`
and its `description` in the toy language. Fidelity is scored against those labels.

`OUT_OF_SPAN` keeps four objects the toy model never learned to draw (a ring, a plus sign, a teal
hue, rainbow bands), written to a folder of their own: a lesson on the method's limits, since no
word, typed, optimised or mapped, draws a shape the generator has not learned.

    python -m elite_tutorial.toyworld.concepts assets/concepts assets/concepts-out-of-span
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..storage import atomic_directory
from .render import LOW_CONTRAST, PATTERNS, SHAPES, SceneSpec, ToyObject, described, render

Region = Callable[[np.ndarray, np.ndarray], np.ndarray]                 # (u, v) -> inside, bool
Fill = Callable[[np.ndarray, np.ndarray, tuple], np.ndarray]            # (u, v, rgb) -> (.., 3) colours

IDENTITY = ("shape", "colour", "pattern")


@dataclass(frozen=True)
class PersonalConcept:
    """A held-out identity: a shape, colour and pattern of the toy vocabulary."""

    shape: str
    colour: str
    pattern: str

    @property
    def name(self) -> str:
        return f"{self.colour}_{self.pattern}_{self.shape}"

    @property
    def class_word(self) -> str:
        """The concept's class ("heart"): the class-word baseline says this much of it."""
        return self.shape

    @property
    def description(self) -> str:
        """The concept in the toy language's words: 'red dotted heart'."""
        return described(self.labels())

    def labels(self) -> dict[str, str]:
        """Its true shape, colour and pattern (what fidelity is scored against)."""
        return {"shape": self.shape, "colour": self.colour, "pattern": self.pattern}


# Sixteen identities: every shape three or four times, seven colours two or three times, the three
# patterns five or six times, so each value is learnt from many other identities. All are patterned,
# none green (a grass background, one of the edits, hides green), and none is one of the v1 record's
# "sayable objects" (every solid shape-colour pairing and twenty patterned ones), on which its
# fixed-objects runs trained (a test checks both; docs/flags.md, "Removed").
CONCEPTS: tuple[PersonalConcept, ...] = (
    PersonalConcept("heart", "red", "dotted"),
    PersonalConcept("circle", "red", "striped"),
    PersonalConcept("star", "red", "checkered"),
    PersonalConcept("triangle", "blue", "checkered"),
    PersonalConcept("star", "blue", "striped"),
    PersonalConcept("square", "yellow", "dotted"),
    PersonalConcept("heart", "yellow", "checkered"),
    PersonalConcept("circle", "purple", "dotted"),
    PersonalConcept("triangle", "purple", "striped"),
    PersonalConcept("star", "orange", "dotted"),
    PersonalConcept("circle", "orange", "checkered"),
    PersonalConcept("square", "orange", "striped"),
    PersonalConcept("heart", "white", "striped"),
    PersonalConcept("square", "white", "checkered"),
    PersonalConcept("triangle", "black", "dotted"),
    PersonalConcept("star", "black", "striped"),
)

# Sixteen more, held out exactly like the test concepts, on which recipes, checkpoints and noise levels
# are chosen, so that the sixteen test concepts are scored once per shipped recipe. Drawn under the same
# rules (patterned, not green, no sayable object, no test concept; every shape three or four times, every
# colour but green two or three times, each pattern five or six times); with both sets held out, every
# value is still seen on 15 or more training identities.
VALIDATION_CONCEPTS: tuple[PersonalConcept, ...] = (
    PersonalConcept("square", "black", "striped"),
    PersonalConcept("triangle", "black", "checkered"),
    PersonalConcept("circle", "blue", "striped"),
    PersonalConcept("heart", "blue", "striped"),
    PersonalConcept("heart", "blue", "checkered"),
    PersonalConcept("circle", "orange", "striped"),
    PersonalConcept("triangle", "orange", "dotted"),
    PersonalConcept("heart", "purple", "checkered"),
    PersonalConcept("star", "purple", "dotted"),
    PersonalConcept("star", "purple", "striped"),
    PersonalConcept("square", "red", "dotted"),
    PersonalConcept("square", "red", "striped"),
    PersonalConcept("circle", "white", "checkered"),
    PersonalConcept("star", "white", "checkered"),
    PersonalConcept("circle", "yellow", "dotted"),
    PersonalConcept("triangle", "yellow", "dotted"),
)
HELD_OUT_IDENTITIES = frozenset((c.shape, c.colour, c.pattern) for c in (*CONCEPTS, *VALIDATION_CONCEPTS))


def training_twins(concepts=CONCEPTS) -> tuple[PersonalConcept, ...]:
    """For each personal concept, the training identity of its shape and colour with the next pattern
    that is no concept's ("red dotted heart" -> "red striped heart"): sixteen objects the encoders, the
    map and the taught text encoder have seen, in the same views, to tell generalisation from fit."""
    patterned = [pattern for pattern in PATTERNS if pattern != "solid"]
    twins = []
    for concept in concepts:
        start = patterned.index(concept.pattern)
        for pattern in patterned[start + 1:] + patterned[:start]:
            if (concept.shape, concept.colour, pattern) not in HELD_OUT_IDENTITIES:
                twins.append(PersonalConcept(concept.shape, concept.colour, pattern))
                break
    return tuple(twins)


# what `--concepts` chooses: the test concepts (every figure), the validation ones (choosing recipes),
# and the test concepts' training twins (generalisation: the same views of identities seen in training)
CONCEPT_SETS = {"test": CONCEPTS, "validation": VALIDATION_CONCEPTS, "training": training_twins()}


def is_held_out(obj: ToyObject) -> bool:
    """Whether an object has a test or validation concept's identity (no mapper source may produce one)."""
    return (obj.shape, obj.colour, obj.pattern) in HELD_OUT_IDENTITIES


# (position, size, backgrounds to choose from) of each view: the first background that the concept's
# colour stands out on (`LOW_CONTRAST`) and that no earlier view has is used, so the four views differ
# in everything but identity.
VIEWS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("center", "large", ("gray",)),
    ("left", "large", ("beige", "mint", "navy")),
    ("right", "large", ("wood", "water", "grass")),
    ("center", "small", ("navy", "mint", "grass")),
)


# -- out of span: shapes, hues and patterns the toy model never learned (object-local u, v in [-1, 1])

def _ring(u, v):
    return (u**2 + v**2 <= 1.0) & (u**2 + v**2 >= 0.5**2)


def _cross(u, v):
    return ((abs(u) <= 0.32) & (abs(v) <= 0.95)) | ((abs(v) <= 0.32) & (abs(u) <= 0.95))


def _bands(colours: list[tuple]) -> Fill:
    """Horizontal bands, one per colour, top to bottom (the object's own colour is ignored)."""
    palette = np.asarray(colours, np.float32)

    def fill(u, v, rgb):
        index = np.clip(((v + 1) / 2 * len(colours)).astype(int), 0, len(colours) - 1)
        return palette[index]
    return fill


@dataclass(frozen=True)
class OutOfSpanConcept:
    """An object outside what the toy model draws: its region and fill in object-local coordinates."""

    name: str
    description: str   # for people: what the toy model never learned
    class_word: str    # the nearest toy shape word
    shape: Region
    fill: Fill
    rgb: tuple[float, float, float]


OUT_OF_SPAN: tuple[OutOfSpanConcept, ...] = (
    OutOfSpanConcept("teal_heart", "a heart in teal, a hue between green and blue", "heart",
                     SHAPES["heart"], PATTERNS["solid"], (0.05, 0.55, 0.55)),
    OutOfSpanConcept("coral_ring", "a coral ring with a hole in the middle", "circle", _ring, PATTERNS["solid"],
                     (1.0, 0.5, 0.4)),
    OutOfSpanConcept("cyan_cross", "a cyan plus sign", "square", _cross, PATTERNS["solid"], (0.2, 0.85, 0.9)),
    OutOfSpanConcept("rainbow_heart", "a heart in rainbow bands, red to blue", "heart", SHAPES["heart"],
                     _bands([(0.86, 0.16, 0.16), (0.96, 0.55, 0.12), (0.95, 0.83, 0.16), (0.16, 0.66, 0.24),
                             (0.16, 0.31, 0.86)]), (0, 0, 0)),
)
# (position, size, rotation in degrees, background) of each out-of-span view
OUT_OF_SPAN_VIEWS: tuple[tuple[str, str, float, str], ...] = (
    ("center", "large", 0.0, "gray"),
    ("left", "large", -12.0, "beige"),
    ("right", "large", 10.0, "wood"),
    ("center", "small", 5.0, "navy"),
)

Concept = PersonalConcept | OutOfSpanConcept


def concept_by_name(name: str) -> Concept:
    for concept in (*CONCEPTS, *VALIDATION_CONCEPTS, *OUT_OF_SPAN):
        if concept.name == name:
            return concept
    known = ", ".join(c.name for c in (*CONCEPTS, *VALIDATION_CONCEPTS, *OUT_OF_SPAN))
    raise KeyError(f"No personal concept {name!r}; the concepts are: {known}.")


def render_concept(concept: Concept, position="center", size="large", rotation=0.0,
                   background="gray", texture_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One view of a concept: image (64, 64, 3) uint8 and object mask (64, 64) bool."""
    if isinstance(concept, PersonalConcept):
        obj = ToyObject(concept.shape, concept.colour, concept.pattern, size, position, rotation)
        image, masks = render(SceneSpec((obj,), background, texture_seed))
    else:
        obj = ToyObject(shape=concept.name, colour=concept.rgb, position=position, size=size, rotation=rotation)
        image, masks = render(SceneSpec((obj,), background, texture_seed), painters={0: (concept.shape, concept.fill)})
    return image, masks[0]


def view_settings(concept: Concept) -> list[tuple[str, str, float, str]]:
    """(position, size, rotation, background) of each of the concept's four views."""
    if isinstance(concept, OutOfSpanConcept):
        return list(OUT_OF_SPAN_VIEWS)
    settings = []
    for position, size, backgrounds in VIEWS:
        used = {background for *_, background in settings}
        background = next(b for b in backgrounds if b not in used and concept.colour not in LOW_CONTRAST.get(b, ()))
        settings.append((position, size, 0.0, background))
    return settings


def concept_views(concept: Concept) -> list[tuple[np.ndarray, np.ndarray]]:
    """The concept's four views, as (image, mask) pairs."""
    return [render_concept(concept, *view, texture_seed=index) for index, view in enumerate(view_settings(concept))]


def concept_record(concept: Concept) -> dict[str, str]:
    """What `labels.json` says of a concept: its true labels (in-span concepts only), class word and description."""
    labels = concept.labels() if isinstance(concept, PersonalConcept) else {}
    return {**labels, "class_word": concept.class_word, "description": concept.description}


def write_concepts(folder: str | Path, concepts: tuple[Concept, ...] = CONCEPTS) -> Path:
    """Write every concept's views as `folder/<name>/N.png` + `N_bg.png`, and `folder/labels.json`
    (the folder is replaced as a whole, where it holds nothing but concept folders and labels)."""
    own = {*(c.name for c in (*CONCEPTS, *VALIDATION_CONCEPTS, *OUT_OF_SPAN, *concepts)), "labels.json"}
    with atomic_directory(folder, own=own) as staging:
        for concept in concepts:
            (staging / concept.name).mkdir()
            for index, (image, mask) in enumerate(concept_views(concept)):
                Image.fromarray(image).save(staging / concept.name / f"{index}.png")
                Image.fromarray(mask.astype(np.uint8) * 255).save(staging / concept.name / f"{index}_bg.png")
        records = {concept.name: concept_record(concept) for concept in concepts}
        (staging / "labels.json").write_text(json.dumps(records, indent=1) + "\n")
    return Path(folder)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default="assets/concepts")
    parser.add_argument("out_of_span_folder", nargs="?", default="assets/concepts-out-of-span")
    args = parser.parse_args(argv)
    print(write_concepts(args.folder))
    print(write_concepts(args.out_of_span_folder, OUT_OF_SPAN))


if __name__ == "__main__":
    main()
