"""The toy image encoder, retrained to read each identity attribute of an object on its own.

A global mapper can only write what its image encoder reads. The first toy CLIP, trained on whole
scenes against captions that leave attributes out, reads colour and pattern but ties shape to them:
a linear probe fitted on some (shape, colour, pattern) identities reads shape far worse on identities
it was not fitted on. Personal concepts are exactly such unseen identities, so this module trains the
vision tower again, on what a mapper reads and with an objective that asks for each attribute apart:

- **The mapper's view.** Every image is the padded box around one object (`data.box_crop`, resized to
  64 px), as the authors' stage-1 images are boxes around an object.
- **Captions that name some of the identity.** Each caption names the object's shape, colour and
  pattern, or a random part of them ("a photo of a red heart", "a photo of dotted"). An image matches
  every caption whose named attributes it has, so the loss is CLIP's contrastive loss with all those
  matches as positives (a soft target spread over them): to match "heart" with every heart, whatever
  its colour, the image features must say "heart" apart from the colour.
- **Contrast groups.** A few groups per batch show one object drawn in every value of one attribute
  (shape, colour or pattern), all else equal, so that attribute is the only way to tell them apart.
- **Personal concepts held out.** No image shows a concept's identity (`concepts.is_held_out`), so the
  probe on them (`identity_probe`) measures reading unseen identities.

The text tower is trained with it from scratch and thrown away: only the vision tower is used, as the
components' `image_encoder`. Neither the UNet's text encoder nor the judge is touched, and the judge's
training (its own data, seed and objective: one classifier per attribute) stays apart from this one.

    python -m elite_tutorial.studies.encoder train --out toy-image-encoder          # resumable
    python -m elite_tutorial.studies.gates readable --encoder toy-image-encoder   # gate 2
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPModel, CLIPVisionModel

from ..data import box_crop, clip_normalise
from ..mappers import clip_feature_levels
from ..storage import atomic_directory, write_json_atomic
from ..toyworld.concepts import CONCEPTS, IDENTITY, is_held_out
from ..toyworld.models import toy_clip, toy_tokenizer
from ..toyworld.render import ATTRIBUTES, LOW_CONTRAST, PREFIXES, SIZE, SceneSpec, images_to_tensor, random_spec, render
from .pretrain import HELD_OUT_SEED, Recipe, _autocast, _seed_init, tokenize, train_loop

VIEW_MARGIN = 0.25  # the box's padding, as a fraction of its longer side (`data.box_crop`)


@dataclass(frozen=True)
class EncoderRecipe:
    """Every number that decides the retrained image encoder (with the code itself)."""

    seed: int = 0
    steps: int = 1500
    batch: int = 128
    groups: int = 4               # contrast groups per batch (each 5 or fewer images, see `contrast_group`)
    full_caption: float = 0.5     # probability that a caption names the whole identity
    margin_jitter: float = 0.15   # the box's padding varies by up to this much in training
    lr: float = 1e-3
    patch_size: int = 8
    warmup_steps: int = 100
    checkpoint_every: int = 250


PROFILES = {"default": EncoderRecipe(), "smoke": EncoderRecipe(steps=4, batch=24, groups=1, warmup_steps=2,
                                                                checkpoint_every=2)}


def box_view(image: np.ndarray, mask: np.ndarray, margin: float = VIEW_MARGIN) -> np.ndarray:
    """What a global mapper reads of an image (H, W, 3) uint8 with its object's mask (H, W) bool: the
    padded box around the object, (64, 64, 3) uint8."""
    crop = box_crop(Image.fromarray(image), mask, margin)
    return np.asarray(crop.resize((SIZE, SIZE), Image.Resampling.BICUBIC))


def mapper_view(spec: SceneSpec, margin: float = VIEW_MARGIN) -> np.ndarray:
    """The box view (`box_view`) of a single-object scene, (64, 64, 3) uint8."""
    image, masks = render(spec)
    return box_view(image, masks[0], margin)


def training_spec(rng: np.random.Generator) -> SceneSpec:
    """A random single-object scene whose identity is no personal concept's (redrawn until so)."""
    while True:
        spec = random_spec(rng, two_object_probability=0.0)
        if not is_held_out(spec.objects[0]):
            return spec


def contrast_group(rng: np.random.Generator, attribute: str) -> list[SceneSpec]:
    """One training scene drawn in every value of `attribute` ("shape", "colour" or "pattern"), all
    else equal; values that would give a personal concept, or vanish on the background, are left out."""
    spec = training_spec(rng)
    variants = [replace(spec, objects=(replace(spec.objects[0], **{attribute: value}),)) for value in ATTRIBUTES[attribute]]
    hidden = LOW_CONTRAST.get(spec.background, ())
    return [v for v in variants if not is_held_out(v.objects[0]) and v.objects[0].colour not in hidden]


def identity_caption(labels: dict[str, str], named: tuple[str, ...], rng: np.random.Generator) -> str:
    """'a photo of a red dotted heart' with only the `named` identity attributes said."""
    words = [labels[a] for a in ("colour", "pattern", "shape") if a in named]
    prefix = PREFIXES[rng.integers(len(PREFIXES))]
    return " ".join(([prefix] if prefix else []) + ["a"] + words)


def _named_attributes(rng: np.random.Generator, full: float) -> tuple[str, ...]:
    if rng.random() < full:
        return IDENTITY
    while not (named := tuple(a for a in IDENTITY if rng.random() < 0.5)):
        pass
    return named


def encoder_samples(rng: np.random.Generator, recipe: EncoderRecipe) -> list[tuple[SceneSpec, float, tuple[str, ...], str]]:
    """A batch's samples: (scene, box padding, the attributes its caption names, the caption), the
    contrast groups first."""
    specs = [spec for _ in range(recipe.groups)
             for spec in contrast_group(rng, IDENTITY[rng.integers(len(IDENTITY))])]
    specs += [training_spec(rng) for _ in range(recipe.batch - len(specs))]
    margins = VIEW_MARGIN + rng.uniform(-recipe.margin_jitter, recipe.margin_jitter, len(specs))
    named = [_named_attributes(rng, recipe.full_caption) for _ in specs]
    texts = [identity_caption(spec.labels(), n, rng) for spec, n in zip(specs, named)]
    return list(zip(specs, margins.tolist(), named, texts))


def encoder_batch(rng: np.random.Generator, recipe: EncoderRecipe, tokenizer) -> dict:
    """A training batch (`encoder_samples`): `pixel_values` (B, 3, 64, 64) CLIP-normalised box views,
    `input_ids` of the captions, and `positives` (B, B) bool: image i has every attribute caption j names."""
    specs, margins, named, texts = zip(*encoder_samples(rng, recipe))
    pixels = images_to_tensor(np.stack([mapper_view(s, m) for s, m in zip(specs, margins)]))
    labels = [s.labels() for s in specs]
    positives = torch.tensor([[all(labels[i][a] == labels[j][a] for a in named[j]) for j in range(len(specs))]
                              for i in range(len(specs))])
    return {"input_ids": tokenize(tokenizer, list(texts), padding="longest"), "pixel_values": clip_normalise(pixels),
            "positives": positives}


def multi_positive_contrastive_loss(logits_per_image: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy with every match a positive: logits (B, B), positives (B, B)
    bool with a true diagonal. Each row's (and column's) target spreads evenly over its positives."""
    targets = positives.float()
    image_to_text = F.cross_entropy(logits_per_image, targets / targets.sum(1, keepdim=True))
    text_to_image = F.cross_entropy(logits_per_image.T, (targets / targets.sum(0, keepdim=True)).T)
    return (image_to_text + text_to_image) / 2


def train_encoder(recipe: EncoderRecipe, work: Path, device, stop_after: int | None = None):
    """A toy CLIP trained as the module doc says; returns it and its loss history."""
    device = torch.device(device)
    tokenizer = toy_tokenizer()
    loop_recipe = Recipe(seed=recipe.seed, warmup_steps=recipe.warmup_steps, checkpoint_every=recipe.checkpoint_every)
    _seed_init(loop_recipe, "clip")
    model = toy_clip(tokenizer, recipe.patch_size).to(device)

    def loss_fn(batch, generator):
        with _autocast(device):
            out = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"])
        return {"loss_contrastive": multi_positive_contrastive_loss(out.logits_per_image.float(), batch["positives"])}

    history = train_loop("encoder", model, lambda rng: encoder_batch(rng, recipe, tokenizer), loss_fn, recipe.steps,
                         recipe.lr, loop_recipe, work, device, stop_after=stop_after, workers=0)
    return model, history


# --------------------------------------------------------------------------------------------------
# Gate 2: can a linear probe read each identity attribute of an unseen identity?

PROBE_SEED = HELD_OUT_SEED + 70_000  # scenes no training pool reaches


def probe_specs(training: int = 3000, per_concept: int = 40, seed: int = PROBE_SEED) -> tuple[list, list]:
    """Scenes of training identities (random, concepts redrawn) and of the personal concepts, each
    concept in `per_concept` random settings (size, place, background it stands out on, texture)."""
    rng = np.random.default_rng(seed)
    fitted = [training_spec(rng) for _ in range(training)]
    held_out = []
    for concept in CONCEPTS:
        for _ in range(per_concept):
            while True:
                spec = random_spec(rng, two_object_probability=0.0)
                if concept.colour not in LOW_CONTRAST.get(spec.background, ()):
                    break
            held_out.append(replace(spec, objects=(replace(spec.objects[0], **concept.labels()),)))
    return fitted, held_out


@torch.no_grad()
def view_features(image_encoder: CLIPVisionModel, views: np.ndarray, batch: int = 250) -> torch.Tensor:
    """What a global mapper reads of box views (n, 64, 64, 3) uint8: at each of the five levels, the
    class token and the mean patch token, side by side. (n, 5 * 2 * width)."""
    features = []
    for start in range(0, len(views), batch):
        pixels = images_to_tensor(views[start:start + batch])
        levels = clip_feature_levels(image_encoder, clip_normalise(pixels).to(image_encoder.dtype))
        features.append(torch.cat([torch.cat([level[:, 0], level[:, 1:].mean(1)], 1) for level in levels], 1).float().cpu())
    return torch.cat(features)


def mapper_features(image_encoder: CLIPVisionModel, specs: list[SceneSpec], batch: int = 250) -> torch.Tensor:
    """`view_features` of each single-object scene's box view. (n, 5 * 2 * width)."""
    return view_features(image_encoder, np.stack([mapper_view(spec) for spec in specs]), batch)


def identity_probe(image_encoder: CLIPVisionModel, training: int = 3000, per_concept: int = 40) -> dict:
    """Gate 2: for each identity attribute, a linear probe on `mapper_features` fitted on scenes of
    training identities and scored on scenes of the held-out personal concepts, beside its accuracy
    on more scenes of training identities (`seen`: the last fifth, not fitted) and chance."""
    from .report import linear_probe_accuracy  # noqa: PLC0415 (report imports the whole toy world)

    fitted, held_out = probe_specs(training, per_concept)
    features = mapper_features(image_encoder, fitted + held_out)
    fit = int(0.8 * training)
    result = {}
    for attribute in IDENTITY:
        labels = torch.tensor([ATTRIBUTES[attribute].index(s.labels()[attribute]) for s in fitted + held_out])
        on_seen = linear_probe_accuracy(features[:training], labels[:training], fit)
        order = torch.cat([torch.arange(fit), torch.arange(training, len(labels))])  # fitted rows, then the concepts
        on_held_out = linear_probe_accuracy(features[order], labels[order], fit)
        result[attribute] = {"held_out_identities": on_held_out, "seen_identities": on_seen,
                             "chance": round(1 / len(ATTRIBUTES[attribute]), 3)}
    return {"view": "box", "scenes_fitted": fit, "held_out_scenes": len(held_out), "attributes": result}


# --------------------------------------------------------------------------------------------------
# The command.

def write_encoder(model: CLIPModel, out: Path, record: dict) -> None:
    """The vision tower (fp16, as the shipped components store it) and its record, written atomically."""
    with atomic_directory(out, own=("config.json", "model.safetensors", "record.json")) as staging:
        vision = CLIPVisionModel(model.config.vision_config)
        vision.load_state_dict(model.vision_model.state_dict())
        vision.to(torch.float16).save_pretrained(staging)
        (staging / "record.json").write_text(json.dumps(record, indent=1))


def load_encoder(source: Path) -> CLIPVisionModel:
    """An image encoder in fp32 from a folder (`write_encoder`'s or a components folder's
    `image_encoder/`), or from a training checkpoint (`<out>.work/encoder.checkpoint.safetensors`)."""
    source = Path(source)
    if source.is_file():
        model = toy_clip(toy_tokenizer(), EncoderRecipe.patch_size)
        model.load_state_dict({k.removeprefix("model."): v for k, v in load_file(str(source)).items() if k.startswith("model.")})
        vision = CLIPVisionModel(model.config.vision_config)
        vision.load_state_dict(model.vision_model.state_dict())
        return vision.eval()
    return CLIPVisionModel.from_pretrained(source, dtype=torch.float32).eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m elite_tutorial.studies.encoder", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["train"], help="train the image encoder (rerun the same command to resume)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.out.exists():
        parser.error(f"{args.out} exists; move it away to train again.")
    recipe = replace(PROFILES[args.profile], seed=args.seed)
    if args.steps is not None:
        recipe = replace(recipe, steps=args.steps)
    work = args.out.with_name(args.out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    recipe_file = work / "recipe.json"
    if recipe_file.exists() and json.loads(recipe_file.read_text()) != asdict(recipe):
        parser.error(f"{work} holds an unfinished run with another recipe; resume it with the same options, "
                     "or delete that folder to start over.")
    write_json_atomic(recipe_file, asdict(recipe))
    started = time.perf_counter()
    model, history = train_encoder(recipe, work, args.device)
    model.eval()
    record = {"command": " ".join(["python -m elite_tutorial.studies.encoder", *(sys.argv[1:] if argv is None else argv)]),
              "recipe": asdict(recipe), "seconds_this_run": round(time.perf_counter() - started, 1),
              "loss_last": history[-1], "torch": torch.__version__}
    write_encoder(model, args.out, record)
    shutil.rmtree(work)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
