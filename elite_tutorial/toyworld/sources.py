"""The toy world as a source of training samples for ELITE's mappers (`data.TrainingSource`,
`data.LocalTrainingSource`): single-object scenes drawn on the fly, never showing a personal
concept's identity (`ToyWorldSource`). What is generic (crops, views, augmentation, scale augmentation) is `data`'s.
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
    object_view_for_clip,
    scale_augment,
    target_pixels,
    with_scale_phrase,
)
from .concepts import CONCEPTS, is_held_out, render_concept
from .render import LOW_CONTRAST, POSITION_PHRASES, PREFIXES, _article, exact_scene, random_scene, random_spec

# What the UNet learns to draw from the words in toy stage-1 training: the scene, the box view itself
# (the authors' recipe: target and encoder input are the same crop), or `another_view` of the same
# identity (so that the words can carry the identity and nothing else).
TOY_TARGETS = ("scene", "box", "other-view")
# How often a toy training caption says the object's size, its position and the background (each)
TOY_CONTEXT_PROBABILITY = 0.5


def toy_prompt_with_placeholder(spec, rng: np.random.Generator, placeholder: str = "S",
                                context_probability: float = TOY_CONTEXT_PROBABILITY) -> str:
    """'a photo of a large S on the left, on a grass background', each of size, position and
    background said with probability `context_probability`. A toy training image is a scene, not a
    tight crop of the object as in the authors' data, so the caption names the rest of the scene; the
    words then have no reason to carry it (when it is said)."""
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


class ToyWorldSource:
    """Single-object toy scenes drawn on the fly (`toy_training_scenes`: never a personal concept's
    identity); validation shows four of the held-out personal concepts.

    `target`: the UNet's stage-1 target, "scene", the whole scene as drawn (the object anywhere,
    small or large); "box", the padded box around the object (`box_crop`), captioned "a photo
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
        seen = [global_view_image(Image.fromarray(s.image), s.masks[0], self.global_view) for s in scenes]
        drawn = [another_view(s, rng) for s in scenes] if self.target == "other-view" else scenes
        images = [Image.fromarray(s.image) for s in drawn]
        if self.target == "box":
            images = [box_crop(image, s.masks[0]) for image, s in zip(images, drawn)]
        said = 0.0 if self.target == "box" else self.context_probability
        return {"pixel_values": torch.stack([target_pixels(i, self.image_size) for i in images]),
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

