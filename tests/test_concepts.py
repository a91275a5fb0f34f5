"""The personal concepts: drawable identities held out of training, their views, folders and labels."""
import json
from itertools import product

import numpy as np
import pytest
from PIL import Image

from elite_tutorial.components import ASSETS_DIR
from elite_tutorial.toyworld.concepts import (
    CONCEPT_SETS,
    CONCEPTS,
    OUT_OF_SPAN,
    VALIDATION_CONCEPTS,
    PersonalConcept,
    concept_by_name,
    concept_views,
    is_held_out,
    render_concept,
    view_settings,
    write_concepts,
)
from elite_tutorial.toyworld.render import COLOURS, PATTERNS, SHAPES, SIZES, ToyObject


def test_sixteen_identities_of_values_the_world_draws_each_learnt_from_many_training_identities():
    assert len(CONCEPTS) >= 16 and len({c.name for c in CONCEPTS}) == len(CONCEPTS)
    identities = {(c.shape, c.colour, c.pattern) for c in CONCEPTS}
    assert len(identities) == len(CONCEPTS)
    training = [i for i in product(SHAPES, COLOURS, PATTERNS) if i not in identities]
    for concept in CONCEPTS:
        assert concept.shape in SHAPES and concept.colour in COLOURS and concept.pattern in PATTERNS
        assert concept.class_word == concept.shape
        assert concept.description.split() == [concept.colour, concept.pattern, concept.shape]
        # every value of the concept comes with many other values in training identities
        for index, value in enumerate((concept.shape, concept.colour, concept.pattern)):
            assert sum(identity[index] == value for identity in training) >= 15
        assert is_held_out(ToyObject(concept.shape, concept.colour, concept.pattern, "small", "left"))
    # none of them is one of the v1 record's "sayable objects" (every solid shape-colour pairing, and twenty
    # patterned ones), on which its fixed-objects runs trained
    colours = list(COLOURS)
    sayable = [ToyObject(shape, colours[(s + 3 * p) % len(colours)], pattern)
               for s, shape in enumerate(SHAPES) for p, pattern in enumerate(PATTERNS)]
    sayable += [ToyObject(shape, colour, "solid") for shape in SHAPES for colour in COLOURS]
    assert not any(is_held_out(obj) for obj in sayable)


def test_validation_identities_are_held_out_alike_and_apart_from_the_test_concepts():
    test = {(c.shape, c.colour, c.pattern) for c in CONCEPTS}
    validation = {(c.shape, c.colour, c.pattern) for c in VALIDATION_CONCEPTS}
    assert len(validation) == len(VALIDATION_CONCEPTS) == 16 and not validation & test
    assert CONCEPT_SETS["test"] == CONCEPTS and CONCEPT_SETS["validation"] == VALIDATION_CONCEPTS
    twins = CONCEPT_SETS["training"]  # each test concept's shape and colour, in a pattern seen in training
    assert len(twins) == len(CONCEPTS) and not any(is_held_out(ToyObject(t.shape, t.colour, t.pattern)) for t in twins)
    assert [(t.shape, t.colour) for t in twins] == [(c.shape, c.colour) for c in CONCEPTS]
    training = [i for i in product(SHAPES, COLOURS, PATTERNS) if i not in test | validation]
    for concept in VALIDATION_CONCEPTS:
        assert concept.pattern != "solid" and concept.colour != "green"
        assert is_held_out(ToyObject(concept.shape, concept.colour, concept.pattern, "small", "right"))
        assert len(view_settings(concept)) == 4 and concept_by_name(concept.name) == concept
        for index, value in enumerate((concept.shape, concept.colour, concept.pattern)):
            assert sum(identity[index] == value for identity in training) >= 15
    assert not is_held_out(ToyObject("heart", "red", "striped"))  # a training identity stays in


def test_views_are_deterministic_mostly_large_and_differ_in_everything_but_identity():
    for concept in CONCEPTS:
        settings = view_settings(concept)
        assert len(settings) == 4 and sum(size == "large" for _, size, _, _ in settings) >= 2
        assert len({position for position, *_ in settings}) >= 3 and len({bg for *_, bg in settings}) == 4
    concept = concept_by_name("red_dotted_heart")
    first, second = concept_views(concept), concept_views(concept)
    for (image_a, mask_a), (image_b, mask_b), (_, size, _, _) in zip(first, second, view_settings(concept)):
        assert np.array_equal(image_a, image_b) and np.array_equal(mask_a, mask_b)
        radius = SIZES[size]
        assert 0.5 * np.pi * radius**2 < mask_a.sum() < 1.5 * np.pi * radius**2
        if size == "large":  # most object pixels are the concept's colour, dots aside
            assert np.median(np.abs(image_a[mask_a] - np.asarray(COLOURS["red"]) * 255).sum(-1)) < 20


def test_shipped_folders_and_labels_match_the_renderer(tmp_path):
    for folder, concepts in ((ASSETS_DIR / "concepts", CONCEPTS), (ASSETS_DIR / "concepts-out-of-span", OUT_OF_SPAN)):
        written = write_concepts(tmp_path / folder.name, concepts)
        assert sorted(p.name for p in folder.iterdir()) == sorted([c.name for c in concepts] + ["labels.json"])
        assert json.loads((folder / "labels.json").read_text()) == json.loads((written / "labels.json").read_text())
        for concept in concepts:
            for index in range(4):
                for suffix in ("", "_bg"):
                    name = f"{concept.name}/{index}{suffix}.png"
                    assert np.array_equal(np.asarray(Image.open(folder / name)), np.asarray(Image.open(written / name))), name
    mask = np.asarray(Image.open(ASSETS_DIR / "concepts" / CONCEPTS[0].name / "0_bg.png"))
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}


def test_the_labels_alone_redraw_every_view():
    labels = json.loads((ASSETS_DIR / "concepts" / "labels.json").read_text())
    assert set(labels) == {c.name for c in CONCEPTS}
    for name, record in labels.items():
        concept = PersonalConcept(record["shape"], record["colour"], record["pattern"])
        assert record["class_word"] == record["shape"] and record["description"] == concept.description
        for index, setting in enumerate(view_settings(concept)):
            shipped = np.asarray(Image.open(ASSETS_DIR / "concepts" / name / f"{index}.png"))
            assert np.array_equal(render_concept(concept, *setting, texture_seed=index)[0], shipped)


def test_out_of_span_concepts_are_few_and_each_has_something_the_world_never_draws():
    assert 1 <= len(OUT_OF_SPAN) <= 4
    for concept in OUT_OF_SPAN:
        unnamed_hue = tuple(concept.rgb) not in {tuple(rgb) for rgb in COLOURS.values()}
        unnamed_shape = concept.shape not in SHAPES.values()
        unnamed_fill = concept.fill not in PATTERNS.values()
        assert unnamed_hue or unnamed_shape or unnamed_fill, concept.name
    ring, _ = concept_views(concept_by_name("coral_ring"))[0]
    assert tuple(ring[32, 32]) == (128, 128, 128)  # the ring's hole shows the grey background


def test_unknown_concept_names_the_known_ones():
    with pytest.raises(KeyError, match="red_dotted_heart"):
        concept_by_name("dragon")
