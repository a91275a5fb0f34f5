import numpy as np
import pytest

from elite_tutorial.toyworld.render import (
    ATTRIBUTES,
    COLOURS,
    POSITIONS,
    SIZE,
    SceneSpec,
    ToyObject,
    caption,
    describe_object,
    exact_scene,
    random_scene,
    render,
)


def test_scenes_are_deterministic_given_the_seed():
    a, b = random_scene(123), random_scene(123)
    assert a.spec == b.spec and a.caption == b.caption
    assert np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks)
    assert not np.array_equal(a.image, random_scene(124).image)


def test_image_and_mask_shapes():
    scene = random_scene(5, two_object_probability=1.0)
    assert scene.image.shape == (SIZE, SIZE, 3) and scene.image.dtype == np.uint8
    assert scene.masks.shape == (2, SIZE, SIZE) and scene.masks.dtype == bool
    assert not (scene.masks[0] & scene.masks[1]).any()  # side-by-side objects never overlap


@pytest.mark.parametrize("position", list(POSITIONS))
def test_mask_sits_at_the_labelled_position(position):
    spec = SceneSpec((ToyObject("circle", "red", size="small", position=position),), "gray")
    image, masks = render(spec)
    rows, cols = np.nonzero(masks[0])
    cx, cy = POSITIONS[position]
    assert abs(cols.mean() + 0.5 - cx) < 1 and abs(rows.mean() + 0.5 - cy) < 1
    # a solid circle: inside the mask the pixels are the object's colour, outside the background's
    # (the one-pixel rim is anti-aliased, a blend of both)
    red = np.round(np.array(COLOURS["red"]) * 255)
    interior, exterior = masks[0].copy(), ~masks[0]
    for axis in (0, 1):
        for shift in (-1, 1):
            interior &= np.roll(masks[0], shift, axis)
            exterior &= ~np.roll(masks[0], shift, axis)
    assert interior.sum() > 100
    assert np.abs(image[interior].astype(float) - red).max() <= 1
    assert np.abs(image[exterior].astype(float) - 127.5).max() <= 1


def test_size_changes_mask_area_and_shapes_differ():
    areas = {}
    for size in ATTRIBUTES["size"]:
        for shape in ATTRIBUTES["shape"]:
            masks = render(SceneSpec((ToyObject(shape, "blue", size=size),), "beige"))[1]
            areas[size, shape] = masks.sum()
    for shape in ATTRIBUTES["shape"]:
        assert areas["large", shape] > 2.5 * areas["small", shape]
    circle = render(SceneSpec((ToyObject("circle", "blue"),)))[1][0]
    assert circle.sum() == pytest.approx(np.pi * 13**2, rel=0.05)
    masks = [render(SceneSpec((ToyObject(s, "blue"),)))[1][0] for s in ATTRIBUTES["shape"]]
    assert len({m.tobytes() for m in masks}) == len(masks)


def test_later_objects_cover_earlier_ones_in_the_masks():
    spec = SceneSpec((ToyObject("square", "red", size="large"), ToyObject("circle", "blue", size="small")))
    masks = render(spec)[1]
    assert masks[1].any() and not (masks[0] & masks[1]).any()


def test_captions_say_the_labels_and_can_leave_attributes_out():
    obj = ToyObject("star", "red", "striped", "large", "left")
    spec = SceneSpec((obj,), "navy")
    assert caption(spec) == "a photo of a large red striped star on the left, on a navy background"
    assert describe_object(ToyObject("heart", "orange", size="small", position="top")) == "a small orange heart at the top"
    rng = np.random.default_rng(0)
    captions = {caption(spec, rng, drop=0.5) for _ in range(200)}
    assert all("star" in c for c in captions)  # the shape is always said
    assert any("red" not in c for c in captions) and any("navy" not in c for c in captions)
    assert any(c.startswith(("a large", "a red", "a striped", "a star")) for c in captions)  # plain, no prefix


def test_labels_and_exact_scene():
    scene = exact_scene(SceneSpec((ToyObject("triangle", "green", "dotted", "small", "bottom"),), "wood"))
    assert scene.spec.labels() == {"shape": "triangle", "colour": "green", "pattern": "dotted", "size": "small",
                                   "position": "bottom", "background": "wood"}
    assert "green dotted triangle at the bottom" in scene.caption
