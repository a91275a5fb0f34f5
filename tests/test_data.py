"""Images of any kind in, the encoders' inputs out; concept folders; training samples."""
import csv

import numpy as np
import pytest
import torch
from PIL import Image

from elite_tutorial.components import ASSETS_DIR
from elite_tutorial.data import (
    OpenImagesMaskSource,
    OpenImagesSource,
    augment_for_clip,
    box_crop,
    clip_pixels,
    concept_folder,
    load_image,
    load_mask,
    object_crop,
    unit_pixels,
)
from elite_tutorial.toyworld.concepts import is_held_out
from elite_tutorial.toyworld.render import POSITION_PHRASES, random_scene, random_spec
from elite_tutorial.toyworld.sources import (
    ToyWorldSource,
    another_view,
    toy_prompt_with_placeholder,
    toy_training_scenes,
)


def test_every_pil_mode_becomes_8_bit_rgb():
    grey = np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (30, 1))
    assert np.array_equal(np.asarray(load_image(Image.fromarray(grey)))[..., 0], grey)
    sixteen = Image.fromarray(grey.astype(np.uint16) * 257)
    assert np.abs(np.asarray(load_image(sixteen))[..., 1].astype(int) - grey).max() <= 1  # full range kept
    floats = Image.fromarray(grey.astype(np.float32) / 255)
    assert np.abs(np.asarray(load_image(floats))[..., 2].astype(int) - grey).max() <= 1
    rgba = np.zeros((30, 40, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :20, 3] = 255  # left half opaque red, right half transparent
    rgb = np.asarray(load_image(Image.fromarray(rgba)))
    assert tuple(rgb[0, 0]) == (200, 0, 0) and tuple(rgb[0, -1]) == (255, 255, 255)
    palette = Image.fromarray(grey).convert("P")
    assert load_image(palette).mode == "RGB" and load_image(palette).size == (40, 30)


def test_non_square_images_are_squashed_to_the_encoders_size_as_the_authors_do():
    wide = Image.new("RGB", (90, 30), (255, 0, 0))
    pixels = clip_pixels(wide, 32)
    assert pixels.shape == (3, 32, 32)
    red = (1 - 0.48145466) / 0.26862954
    torch.testing.assert_close(pixels[0], torch.full((32, 32), red), rtol=0, atol=1e-5)


def test_corrupt_and_missing_files_are_refused_clearly(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), (10, 20, 30)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    text = tmp_path / "notes.jpg"
    text.write_text("hello")
    for bad in (truncated, text):
        with pytest.raises(ValueError, match="not a readable image"):
            load_image(bad)
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.png")


def test_masks_are_white_on_the_object_and_must_mark_something():
    mask = np.zeros((20, 20, 3), np.uint8)
    mask[5:10, 5:15] = 255
    loaded = load_mask(Image.fromarray(mask), size=(10, 10))
    assert loaded.shape == (10, 10) and loaded.dtype == bool and loaded.sum() == 3 * 5
    with pytest.raises(ValueError, match="empty"):
        load_mask(Image.new("L", (8, 8), 0))


def test_concept_folders_in_the_authors_layout():
    views = concept_folder(ASSETS_DIR / "concepts" / "red_dotted_heart")
    assert [p.name for p, _ in views] == ["0.png", "1.png", "2.png", "3.png"]
    assert all(m is not None and m.name == f"{p.stem}_bg.png" for p, m in views)


def test_augmentation_and_toy_prompts_are_functions_of_the_rng():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    a = augment_for_clip(image, 32, np.random.default_rng(5))
    b = augment_for_clip(image, 32, np.random.default_rng(5))
    assert a.shape == (3, 32, 32) and torch.equal(a, b) and 0 <= a.min() and a.max() <= 1
    rng = np.random.default_rng(1)
    prompts = [toy_prompt_with_placeholder(random_spec(rng, 0.0), rng) for _ in range(50)]
    assert all(p.split().count("S") == 1 or p.count(" S") == 1 for p in prompts)
    assert any("background" in p for p in prompts) and any(p.endswith("a S") for p in prompts)
    batch = ToyWorldSource(clip_size=32).batch(np.random.default_rng(3), 4)
    assert batch["pixel_values"].shape == (4, 3, 64, 64) and batch["clip_pixels"].shape == (4, 3, 32, 32)
    assert -1 <= batch["pixel_values"].min() and batch["pixel_values"].max() <= 1


def test_toy_context_probability_says_size_position_and_background_always_or_never():
    specs = [random_spec(np.random.default_rng(seed), 0.0) for seed in range(30)]
    always = [toy_prompt_with_placeholder(spec, np.random.default_rng(seed), context_probability=1.0)
              for seed, spec in enumerate(specs)]
    never = [toy_prompt_with_placeholder(spec, np.random.default_rng(seed), context_probability=0.0)
             for seed, spec in enumerate(specs)]
    for spec, said, unsaid in zip(specs, always, never):
        obj = spec.objects[0]
        assert f"{obj.size} S" in said and POSITION_PHRASES[obj.position] in said and f"{spec.background} background" in said
        assert unsaid.endswith("a S") and "background" not in unsaid
        assert said.replace(f" {obj.size} S", " S").split(" S")[0] == unsaid.split(" S")[0]  # the same prefix drawn
    source = ToyWorldSource(clip_size=32, context_probability=1.0)
    assert all("background" in prompt for prompt in source.batch(np.random.default_rng(3), 4)["prompts"])


def test_object_crop_is_the_object_alone_in_a_square_around_its_mask():
    image = np.full((64, 64, 3), 90, np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[10:30, 40:50] = True  # 20 tall, 10 wide; centre (x 45, y 20)
    image[mask] = (200, 30, 10)
    crop = object_crop(Image.fromarray(image), mask, margin=0.25)
    assert crop.size == (25, 25)  # the longer side, 20, and a quarter more
    pixels = np.asarray(crop)
    object_pixels = np.all(pixels == (200, 30, 10), axis=-1)
    assert object_pixels.sum() == mask.sum() and np.all(pixels[~object_pixels] == 0)  # the background blacked out
    rows, cols = np.nonzero(object_pixels)
    assert abs((rows.min() + rows.max() + 1) / 2 - 12.5) <= 0.5 and abs((cols.min() + cols.max() + 1) / 2 - 12.5) <= 0.5
    edge = np.zeros((64, 64), bool)
    edge[0:8, 0:8] = True  # the square runs off the image: the outside stays black
    assert object_crop(Image.fromarray(image), edge).size == (10, 10)
    with pytest.raises(ValueError, match="empty"):
        object_crop(Image.fromarray(image), np.zeros((64, 64), bool))


def test_toy_global_view_shows_the_encoder_the_object_alone_and_the_unet_the_whole_scene():
    scene_view = ToyWorldSource(clip_size=32).batch(np.random.default_rng(3), 4)
    object_view = ToyWorldSource(clip_size=32, global_view="object").batch(np.random.default_rng(3), 4)
    assert torch.equal(scene_view["pixel_values"], object_view["pixel_values"])
    assert scene_view["prompts"] == object_view["prompts"]
    assert not torch.equal(scene_view["clip_pixels"], object_view["clip_pixels"])
    rng = np.random.default_rng(3)  # the batch's draws, in its order: scenes, then each view's augmentation
    scenes = toy_training_scenes(rng, 4)
    crops = [object_crop(Image.fromarray(scene.image), scene.masks[0]) for scene in scenes]
    assert torch.equal(object_view["clip_pixels"], torch.stack([augment_for_clip(crop, 32, rng) for crop in crops]))
    with pytest.raises(ValueError, match="global_view"):
        ToyWorldSource(clip_size=32, global_view="crop")


def test_the_box_view_and_the_box_target_are_the_padded_box_around_the_object():
    box = ToyWorldSource(clip_size=32, global_view="box", target="box").batch(np.random.default_rng(3), 4)
    rng = np.random.default_rng(3)
    scenes = toy_training_scenes(rng, 4)
    crops = [box_crop(Image.fromarray(scene.image), scene.masks[0]) for scene in scenes]
    assert torch.equal(box["clip_pixels"], torch.stack([augment_for_clip(crop, 32, rng) for crop in crops]))
    # the UNet's target is that same box (not augmented), and the object fills much more of it than of the scene
    expected = torch.stack([torch.from_numpy(np.asarray(c.resize((64, 64), Image.Resampling.BICUBIC), np.float32) / 127.5 - 1)
                            .permute(2, 0, 1) for c in crops])
    assert torch.equal(box["pixel_values"], expected)
    box_share = [np.asarray(box_crop(Image.fromarray(s.masks[0]), s.masks[0])).mean() for s in scenes]
    assert all(share > 2 * s.masks[0].mean() for share, s in zip(box_share, scenes))
    # no context in the captions: a box shows no place and little background, as the authors' crops
    assert all(not any(w in p for w in ("left", "right", "top", "bottom", "center", "background", "small", "large"))
               for p in box["prompts"])


def test_the_other_view_target_draws_the_same_identity_elsewhere_and_says_its_context():
    source = ToyWorldSource(clip_size=32, global_view="box", target="other-view", context_probability=1.0)
    batch = source.batch(np.random.default_rng(5), 6)
    scenes = toy_training_scenes(np.random.default_rng(5), 6)
    identities = [(s.spec.objects[0].shape, s.spec.objects[0].colour, s.spec.objects[0].pattern) for s in scenes]
    rng = np.random.default_rng(5)
    toy_training_scenes(rng, 6)
    others = [another_view(s, rng) for s in scenes]
    assert [(o.spec.objects[0].shape, o.spec.objects[0].colour, o.spec.objects[0].pattern) for o in others] == identities
    assert any(o.spec != s.spec for o, s in zip(others, scenes))
    for other, prompt in zip(others, batch["prompts"]):
        obj = other.spec.objects[0]  # the caption says the drawn view's size, place and background
        assert obj.size in prompt and other.spec.background in prompt
    images = torch.stack([torch.from_numpy(o.image.astype(np.float32) / 127.5 - 1).permute(2, 0, 1) for o in others])
    assert torch.allclose(batch["pixel_values"], images, atol=1e-5)


def test_no_training_scene_ever_shows_a_personal_concept():
    rng = np.random.default_rng(0)
    drawn = [random_scene(int(seed), two_object_probability=0.0) for seed in rng.integers(0, 10**9, 800)]
    assert sum(is_held_out(s.spec.objects[0]) for s in drawn) > 30  # unfiltered, a tenth of scenes would be
    for seed in range(4):
        scenes = toy_training_scenes(np.random.default_rng(seed), 400)
        assert len(scenes) == 400 and not any(is_held_out(s.spec.objects[0]) for s in scenes)
    # both stages' toy batches are made of those scenes
    batch = ToyWorldSource(clip_size=32).batch(np.random.default_rng(9), 64)
    scenes = toy_training_scenes(np.random.default_rng(9), 64)
    assert torch.equal(batch["pixel_values"], torch.stack([torch.from_numpy(s.image.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)
                                                          for s in scenes]))
    local = ToyWorldSource(clip_size=32).local_batch(np.random.default_rng(9), 16, scale_augmentation=False)
    assert torch.equal(local["clip_pixels"], torch.stack([unit_pixels(Image.fromarray(s.image), 32) for s in scenes[:16]]))


def test_the_box_crop_keeps_the_background_and_stays_inside_the_image():
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[10:30, 40:50] = True  # 20 tall, 10 wide; centre (x 45, y 20)
    crop = np.asarray(box_crop(Image.fromarray(image), mask, margin=0.25))
    assert crop.shape == (25, 25, 3) and np.array_equal(crop, image[7:32, 32:57])  # background kept
    edge = np.zeros((64, 64), bool)
    edge[0:8, 0:8] = True  # the square would run off the image: it slides inside
    assert np.array_equal(np.asarray(box_crop(Image.fromarray(image), edge)), image[0:10, 0:10])


def make_openimages_folder(root, boxes=6):
    """A small OpenImages-layout folder: a box table, images, and one unreadable image."""
    (root / "annotations").mkdir(parents=True)
    (root / "images" / "test").mkdir(parents=True)
    rows = []
    for i in range(boxes):
        Image.new("RGB", (80, 60), (40 * i, 100, 200)).save(root / "images" / "test" / f"img{i}.jpg")
        rows.append({"ImageID": f"img{i}", "XMin": 0.1, "XMax": 0.6, "YMin": 0.2, "YMax": 0.9})
    rows.append({"ImageID": "tiny", "XMin": 0.1, "XMax": 0.12, "YMin": 0.1, "YMax": 0.12})  # < 2 %: dropped
    rows.append({"ImageID": "broken", "XMin": 0.1, "XMax": 0.7, "YMin": 0.1, "YMax": 0.7})
    (root / "images" / "test" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with open(root / "annotations" / "test-annotations-bbox.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["ImageID", "XMin", "XMax", "YMin", "YMax"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def test_openimages_boxes_are_filtered_and_unreadable_images_skipped_and_counted(tmp_path):
    source = OpenImagesSource(make_openimages_folder(tmp_path / "oi"), resolution=32, clip_size=32)
    assert len(source.boxes) == 7  # the tiny box is filtered out
    for seed in range(4):
        batch = source.batch(np.random.default_rng(seed), 4)
        assert batch["pixel_values"].shape == (4, 3, 32, 32)
        assert all("S" in p.split() for p in batch["prompts"])
    assert source.skipped > 0
    assert source.crop(0).size == (58, 58)  # x 8..48, y 12..54, padded by 10 px, clipped to the image
    with pytest.raises(FileNotFoundError, match="box table"):
        OpenImagesSource(tmp_path)


def make_openimages_mask_folder(root, objects=4):
    """OpenImages with segmentation masks, as stage 2 reads it: a table, images, masks of another size,
    a box too small for stage 2, one unreadable mask."""
    for folder in ("annotations", "images/test", "masks/test"):
        (root / folder).mkdir(parents=True)
    rows = []
    for i in range(objects):
        pixels = np.full((240, 300, 3), (90, 140, 60), np.uint8)
        pixels[60:200, 80:220] = (200, 40 * i, 40)
        Image.fromarray(pixels).save(root / "images" / "test" / f"img{i}.jpg")
        mask = np.zeros((120, 150), np.uint8)  # half the image's size: resized to it
        mask[30:100, 40:110] = 255
        Image.fromarray(mask).save(root / "masks" / "test" / f"img{i}_m.png")
        rows.append({"MaskPath": f"img{i}_m.png", "ImageID": f"img{i}", "BoxXMin": 80 / 300, "BoxXMax": 220 / 300,
                     "BoxYMin": 60 / 240, "BoxYMax": 200 / 240})
    rows.append({"MaskPath": "img0_m.png", "ImageID": "img0", "BoxXMin": 0.1, "BoxXMax": 0.35,
                 "BoxYMin": 0.1, "BoxYMax": 0.5})  # 75 px wide: passed over
    rows.append({"MaskPath": "broken.png", "ImageID": "img1", "BoxXMin": 0.2, "BoxXMax": 0.8, "BoxYMin": 0.2, "BoxYMax": 0.8})
    (root / "masks" / "test" / "broken.png").write_bytes(b"not a png")
    with open(root / "annotations" / "test-annotations-object-segmentation.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def test_openimages_masks_give_stage_two_samples(tmp_path):
    source = OpenImagesMaskSource(make_openimages_mask_folder(tmp_path / "oi"), resolution=32, clip_size=32, latent_factor=4)
    crop, mask = source.sample(0)
    assert crop.size == (160, 160) and mask.shape == (160, 160)  # the box padded by 10 px
    assert mask[10:150, 10:150].all() and not mask[:10].any()  # the mask, resized to the image, then cropped
    assert source.sample(4) is None  # under 100 px a side
    batch = None
    for seed in range(3):
        batch = source.local_batch(np.random.default_rng(seed), 3)
    assert batch["pixel_values"].shape == (3, 3, 32, 32) and batch["valid_mask"].shape == (3, 1, 8, 8)
    assert batch["object_pixels"].shape == (3, 3, 32, 32) and batch["object_mask"].shape == (3, 32, 32)
    assert all(batch["object_pixels"][i][:, ~batch["object_mask"][i]].mean() < 0.05 for i in range(3))  # black around
    assert batch["object_crop_pixels"].shape == batch["box_crop_pixels"].shape == batch["clip_pixels"].shape
    assert all("S" in p.split() for p in batch["prompts"])
    assert source.skipped > 0  # the unreadable mask
    with pytest.raises(FileNotFoundError, match="segmentation table"):
        OpenImagesMaskSource(tmp_path)


def test_a_stage_two_batch_holds_every_global_view_a_frozen_mapper_may_read():
    batch = ToyWorldSource(clip_size=32).local_batch(np.random.default_rng(4), 3, scale_augmentation=False)
    scenes = toy_training_scenes(np.random.default_rng(4), 3)  # the batch's first draws
    for index, scene in enumerate(scenes):
        image = Image.fromarray(scene.image)
        expected = {"clip_pixels": image, "object_crop_pixels": object_crop(image, scene.masks[0]),
                    "box_crop_pixels": box_crop(image, scene.masks[0])}
        for key, view in expected.items():
            assert torch.equal(batch[key][index], unit_pixels(view, 32)), key
