import numpy as np
from PIL import Image

from elite_tutorial.components import ASSETS_DIR
from elite_tutorial.toyworld.concepts import CONCEPTS, VIEWS, concept_by_name, concept_views, write_concepts
from elite_tutorial.toyworld.render import COLOURS, PATTERNS, SHAPES


def test_at_least_twelve_distinct_concepts_outside_the_vocabulary():
    assert len(CONCEPTS) >= 12
    assert len({c.name for c in CONCEPTS}) == len(CONCEPTS)
    for concept in CONCEPTS:
        assert concept.class_word in SHAPES
        # something about it has no toy word: its hue, its shape or its pattern
        unnamed_hue = tuple(concept.rgb) not in {tuple(rgb) for rgb in COLOURS.values()}
        unnamed_shape = concept.shape not in SHAPES.values()
        unnamed_fill = concept.fill not in PATTERNS.values()
        assert unnamed_hue or unnamed_shape or unnamed_fill, concept.name
    views = [np.stack([image for image, _ in concept_views(c)]) for c in CONCEPTS]
    for i in range(len(views)):  # no two concepts look alike in any view
        for j in range(i + 1, len(views)):
            assert np.abs(views[i].astype(int) - views[j]).mean() > 3


def test_views_are_deterministic_and_masks_cover_the_object():
    concept = concept_by_name("coral_ring")
    first, second = concept_views(concept), concept_views(concept)
    for (image_a, mask_a), (image_b, mask_b) in zip(first, second):
        assert np.array_equal(image_a, image_b) and np.array_equal(mask_a, mask_b)
        assert 20 < mask_a.sum() < 0.5 * mask_a.size
        # object pixels are the concept's colour, background pixels are not
        coral = np.asarray(concept.rgb) * 255
        assert np.abs(image_a[mask_a] - coral).mean() < 30
        assert np.abs(image_a[~mask_a] - coral).mean() > 45
    # the ring has a hole: the centre pixel of the large centred view is background
    assert not first[0][1][32, 32]


def test_shipped_concept_folders_match_the_renderer(tmp_path):
    written = write_concepts(tmp_path / "concepts")
    shipped = ASSETS_DIR / "concepts"
    assert sorted(p.name for p in shipped.iterdir()) == sorted(c.name for c in CONCEPTS)
    for concept in CONCEPTS:
        for index in range(len(VIEWS)):
            for suffix in ("", "_bg"):
                name = f"{concept.name}/{index}{suffix}.png"
                assert np.array_equal(np.asarray(Image.open(shipped / name)), np.asarray(Image.open(written / name))), name
    mask = np.asarray(Image.open(shipped / "teal_heart" / "0_bg.png"))
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}


def test_unknown_concept_names_the_known_ones():
    try:
        concept_by_name("dragon")
    except KeyError as error:
        assert "teal_heart" in str(error)
    else:
        raise AssertionError("expected a KeyError")
