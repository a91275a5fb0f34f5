"""The toy world as a source of training samples for ELITE's mappers (`data.TrainingSource`,
`data.LocalTrainingSource`): single-object scenes drawn on the fly, never showing a personal
concept's identity (`ToyWorldSource`), or a few fixed objects, Textual Inversion's setting
(`FixedObjectsSource`). What is generic (crops, views, augmentation, scale augmentation) is `data`'s.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from ..data import (
    GLOBAL_VIEWS,
    augment_for_clip,
    box_crop,
    global_view_image,
    local_batch_views,
    object_crop,
    object_view_for_clip,
    scale_augment,
    target_object_mask,
    target_pixels,
    with_scale_phrase,
)
from .concepts import CONCEPTS, is_held_out, render_concept
from .render import LOW_CONTRAST, POSITION_PHRASES, PREFIXES, SceneSpec, _article, exact_scene, random_scene, random_spec, render

# What the UNet learns to draw from the words in toy stage-1 training: the scene, its `close_up`, the
# box view itself (the authors' recipe: target and encoder input are the same crop), or `another_view`
# of the same identity (so that the words can carry the identity and nothing else).
TOY_TARGETS = ("scene", "close-up", "box", "other-view")
# How often a toy training caption says the object's size, its position and the background (each)
TOY_CONTEXT_PROBABILITY = 0.5


def toy_prompt_with_placeholder(spec, rng: np.random.Generator, placeholder: str = "S",
                                context_probability: float = TOY_CONTEXT_PROBABILITY) -> str:
    """'a photo of a large S on the left, on a grass background', each of size, position and
    background said with probability `context_probability`. A toy training image is a scene (or its
    `close_up`), not a tight crop of the object as in the authors' data, so the caption names the rest
    of the scene; the words then have no reason to carry it (when it is said)."""
    obj = spec.objects[0]
    text = f"a {obj.size} {placeholder}" if rng.random() < context_probability else f"a {placeholder}"
    if rng.random() < context_probability:
        text += " " + POSITION_PHRASES[obj.position]
    if rng.random() < context_probability:
        text += f", on {_article(spec.background)} {spec.background} background"
    prefix = PREFIXES[rng.integers(len(PREFIXES))]
    return f"{prefix} {text}" if prefix else text


def toy_training_scenes(rng: np.random.Generator, size: int) -> list:
    """`size` random single-object toy scenes, none of them a personal concept's identity: a scene
    that shows one is replaced by a fresh draw (`concepts.is_held_out`), so no mapper is
    ever trained on the objects it is scored on."""
    scenes = []
    while len(scenes) < size:
        drawn = [random_scene(int(seed), two_object_probability=0.0) for seed in rng.integers(0, 10**9, size - len(scenes))]
        scenes += [scene for scene in drawn if not is_held_out(scene.spec.objects[0])]
    return scenes


def another_view(scene, rng: np.random.Generator):
    """The scene's object (its shape, colour and pattern) in another random single-object scene: its
    own size, place, background (one its colour stands out on) and texture. Two views of one identity,
    as a personal concept's photos are: what they share is all the words can learn from."""
    obj = scene.spec.objects[0]
    while True:
        spec = random_spec(rng, two_object_probability=0.0)
        if obj.colour not in LOW_CONTRAST.get(spec.background, ()):
            break
    other = replace(spec.objects[0], shape=obj.shape, colour=obj.colour, pattern=obj.pattern)
    return exact_scene(replace(spec, objects=(other,)))


def close_up(scene):
    """The scene's object redrawn large at the centre, on the same background: the toy world's
    nearest to the authors' stage-1 images, which are boxes around an object (padded by 10 px), so
    the object fills them. A crop of a toy scene, scaled up, would be blurred, and larger than
    anything the toy UNet has learned to draw; "large, in the center" is the largest it draws."""
    obj = replace(scene.spec.objects[0], size="large", position="center", offset=(0.0, 0.0))
    return exact_scene(SceneSpec((obj,), scene.spec.background, scene.spec.texture_seed))


class ToyWorldSource:
    """Single-object toy scenes drawn on the fly (`toy_training_scenes`: never a personal concept's
    identity); validation shows four of the held-out personal concepts.

    `target`: the UNet's stage-1 target, "scene", the whole scene as drawn (the object anywhere,
    small or large); "close-up", the object redrawn large at the centre (`close_up`), which the
    encoder then reads too; "box", the padded box around the object (`box_crop`), captioned "a photo
    of a S" with no context, as the authors' box crops are; or "other-view", `another_view` of the
    object, its context said in the caption with `context_probability`.
    `global_view`: what the global mapper's encoder sees of the scene (`global_view_image`): "image",
    all of it, "object", the object alone (`object_crop`), or "box", the padded box around it.
    """

    def __init__(self, clip_size: int, image_size: int = 64, latent_factor: int = 4,
                 context_probability: float = TOY_CONTEXT_PROBABILITY,
                 global_view: str = "image", target: str = "scene"):
        if global_view not in GLOBAL_VIEWS:
            raise ValueError(f"global_view must be one of {GLOBAL_VIEWS}, not {global_view!r}.")
        if target not in TOY_TARGETS:
            raise ValueError(f"target must be one of {TOY_TARGETS}, not {target!r}.")
        self.clip_size, self.image_size, self.latent_factor = clip_size, image_size, latent_factor
        self.context_probability, self.global_view, self.target = context_probability, global_view, target

    def batch(self, rng: np.random.Generator, size: int) -> dict:
        scenes = toy_training_scenes(rng, size)
        if self.target == "close-up":
            scenes = [close_up(scene) for scene in scenes]
        seen = [global_view_image(Image.fromarray(s.image), s.masks[0], self.global_view) for s in scenes]
        drawn = [another_view(s, rng) for s in scenes] if self.target == "other-view" else scenes
        images, masks = [Image.fromarray(s.image) for s in drawn], [s.masks[0] for s in drawn]
        if self.target == "box":
            boxes = [(box_crop(i, m), box_crop(Image.fromarray(m), m)) for i, m in zip(images, masks)]
            images = [box for box, _ in boxes]
            masks = [np.asarray(m.resize((self.image_size,) * 2, Image.Resampling.NEAREST)) for _, m in boxes]
        said = 0.0 if self.target == "box" else self.context_probability
        return {"pixel_values": torch.stack([target_pixels(i, self.image_size) for i in images]),
                "target_object_mask": target_object_mask(np.stack(masks), self.image_size),
                "clip_pixels": torch.stack([augment_for_clip(i, self.clip_size, rng) for i in seen]),
                "prompts": [toy_prompt_with_placeholder(s.spec, rng, context_probability=said) for s in drawn]}

    def local_batch(self, rng: np.random.Generator, size: int, scale_augmentation: bool = True) -> dict:
        """A stage-2 batch (see `train_local`): the scene, scale-augmented unless `scale_augmentation` is
        False, as the UNet's target, with its valid-region mask; the whole scene and the object cut
        out (`object_crop`) for the global words; the object alone for the local tokens, with its
        mask; captions with the scale phrase."""
        scenes = toy_training_scenes(rng, size)
        targets, valid, object_pixels, object_masks, prompts = [], [], [], [], []
        for scene in scenes:
            image = Image.fromarray(scene.image)
            target, region, phrase = scale_augment(image, self.image_size, self.latent_factor, rng, scale_augmentation)
            pixels, mask = object_view_for_clip(image, scene.masks[0], self.clip_size, rng)
            targets.append(target)
            valid.append(region)
            object_pixels.append(pixels)
            object_masks.append(mask)
            prompts.append(with_scale_phrase(toy_prompt_with_placeholder(scene.spec, rng), phrase))
        return {"pixel_values": torch.stack(targets), "valid_mask": torch.stack(valid),
                **local_batch_views([(Image.fromarray(s.image), s.masks[0]) for s in scenes], self.clip_size),
                "object_pixels": torch.stack(object_pixels), "object_mask": torch.stack(object_masks),
                "prompts": prompts}

    def validation_images(self) -> list[Image.Image]:
        return [image for image, _ in self.validation_concepts()]

    def validation_concepts(self) -> list[tuple[Image.Image, np.ndarray]]:
        """(image, mask) of four held-out personal concepts."""
        return [(Image.fromarray(image), mask) for image, mask in (render_concept(c) for c in CONCEPTS[:4])]


class FixedObjectsSource:
    """A few toy objects, each in its one render (large, at the centre, on grey) and captioned "a photo
    of a S": Textual Inversion's setting, for many objects at once. The encoder sees each object alone
    (`object_crop`, augmented as in training). A mapper trained here can fit the objects it is shown;
    scoring it on others says whether it learnt to read objects or only those ones."""
    global_view = "object"

    def __init__(self, objects, clip_size: int, image_size: int = 64):
        if not objects:
            raise ValueError("FixedObjectsSource needs at least one object.")
        if held_out := [obj for obj in objects if is_held_out(obj)]:
            raise ValueError(f"{held_out[0]} is a personal concept's identity: concepts are held out of training.")
        self.renders = [render(SceneSpec((obj,))) for obj in objects]  # (image (H, W, 3) uint8, masks)
        self.clip_size, self.image_size = clip_size, image_size

    def batch(self, rng: np.random.Generator, size: int) -> dict:
        picks = rng.integers(0, len(self.renders), size)
        images = [Image.fromarray(self.renders[k][0]) for k in picks]
        masks = [self.renders[k][1][0] for k in picks]
        return {"pixel_values": torch.stack([target_pixels(i, self.image_size) for i in images]),
                "target_object_mask": target_object_mask(np.stack(masks), self.image_size),
                "clip_pixels": torch.stack([augment_for_clip(object_crop(i, m), self.clip_size, rng)
                                            for i, m in zip(images, masks)]),
                "prompts": ["a photo of a S"] * size}

    def validation_images(self) -> list[Image.Image]:
        return [image for image, _ in self.validation_concepts()]

    def validation_concepts(self) -> list[tuple[Image.Image, np.ndarray]]:
        """(image, mask) of the first four objects."""
        return [(Image.fromarray(image), masks[0]) for image, masks in self.renders[:4]]
