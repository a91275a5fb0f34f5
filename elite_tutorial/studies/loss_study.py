"""What the diffusion loss rewards: the toy model's noise-prediction error on the same scenes, noise
and timesteps, under captions that get one identity attribute wrong, and under a global mapper's
words (through its k/v copies).

The error is reported over the whole image (what stage 1 minimises) and over the object's pixels
only, per band of timesteps. A mapper's words can only be as good as the loss tells them to be: if a
wrong shape barely raises the loss, no amount of training on it teaches shape.

    python -m elite_tutorial.studies.loss_study --mapper assets/toy-global-mapper --count 384
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from ..attention import elite_attention
from ..components import ASSETS_DIR, Components, load_components
from ..data import clip_pixels, object_crop
from ..mappers import GlobalMapper, clip_feature_levels
from ..toyworld.render import COLOURS, PATTERNS, POSITION_PHRASES, SHAPES, _article, caption, exact_scene, random_spec
from ..words import encode_prompts_with_words

TIMESTEP_BANDS = ((0, 250), (250, 500), (500, 750), (750, 1000))
WRONG = {"wrong shape": ("shape", tuple(SHAPES)), "wrong colour": ("colour", tuple(COLOURS)),
         "wrong pattern": ("pattern", tuple(PATTERNS))}


def _with_another(spec, field: str, values: tuple[str, ...], rng: np.random.Generator):
    """`spec` with its object's `field` replaced by another of `values`, drawn from `rng`."""
    obj = spec.objects[0]
    others = [v for v in values if v != getattr(obj, field)]
    return dataclasses.replace(spec, objects=(dataclasses.replace(obj, **{field: others[rng.integers(len(others))]}),))


def _placeholder_prompt(spec) -> str:
    """The caption with the object's words replaced by S, context kept: 'a photo of a large S on the
    left, on a grey background' (the training prompts' form, with every context attribute said)."""
    obj = spec.objects[0]
    return f"a photo of a {obj.size} S {POSITION_PHRASES[obj.position]}, on {_article(spec.background)} {spec.background} background"


def _errors(squared: torch.Tensor, object_share: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: the mean squared error (B, C, h, w) over the image and over the object's pixels
    (`object_share` (B, 1, h, w): the share of each latent pixel the object covers)."""
    on_object = (squared * object_share).sum((1, 2, 3)) / (object_share.sum((1, 2, 3)) * squared.shape[1])
    return squared.mean((1, 2, 3)), on_object


@torch.no_grad()
def loss_by_caption(components: Components, mappers: dict[str, GlobalMapper] | None = None, count: int = 384,
                    seed: int = 0, batch_size: int = 64) -> dict:
    """The mean noise-prediction error of the plain model under the right caption, captions with one
    wrong identity attribute, no object words ("a photo of an object") and the empty caption; and,
    for each mapper, the right caption, its five words and its w0 alone, the last two at S of the
    caption's context, all through the mapper's k/v copies. `count` single-object scenes; each
    entry: {"image", "object", "object by timestep band"} (bands: TIMESTEP_BANDS)."""
    c, rng = components, np.random.default_rng(seed)
    specs = [random_spec(rng, 0.0) for _ in range(count)]
    scenes = [exact_scene(spec) for spec in specs]
    captions = {"right caption": [caption(s) for s in specs],
                **{name: [caption(_with_another(s, field, values, rng)) for s in specs] for name, (field, values) in WRONG.items()},
                "no object words": ["a photo of an object"] * count, "empty caption": [""] * count}
    mappers = mappers or {}
    errors: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    timesteps = []
    generator = torch.Generator().manual_seed(seed)
    for start in tqdm(range(0, count, batch_size), desc="loss by caption"):
        batch = scenes[start:start + batch_size]
        pixels = torch.from_numpy(np.stack([s.image for s in batch])).permute(0, 3, 1, 2).float() / 127.5 - 1
        latents = c.vae.encode(pixels.to(c.device, c.vae.dtype)).latent_dist.sample(generator) * c.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype)
        t = torch.randint(0, c.scheduler.config.num_train_timesteps, (len(batch),), generator=generator)
        timesteps.append(t)
        noisy = c.scheduler.add_noise(latents, noise, t)
        masks = torch.from_numpy(np.stack([s.masks[0] for s in batch])[:, None].astype(np.float32))
        share = F.adaptive_avg_pool2d(masks, latents.shape[-2:])

        def record(name: str, context: torch.Tensor) -> None:
            squared = (c.unet(noisy, t, encoder_hidden_states=context).sample.float() - noise.float()).square()
            errors.setdefault(name, []).append(_errors(squared, share))

        contexts = {}
        for name, texts in captions.items():
            ids = c.tokenizer(texts[start:start + batch_size], padding="max_length", truncation=True,
                              max_length=c.tokenizer.model_max_length, return_tensors="pt").input_ids
            contexts[name] = c.text_encoder(ids.to(c.device))[0]
            record(name, contexts[name])
        prompts = [_placeholder_prompt(s.spec) for s in batch]
        for label, mapper in mappers.items():
            views = [Image.fromarray(s.image) if mapper.input_view == "image" else object_crop(Image.fromarray(s.image), s.masks[0])
                     for s in batch]
            words = mapper(clip_feature_levels(c.image_encoder, torch.stack([clip_pixels(v, c.image_encoder.config.image_size)
                                                                              for v in views])))
            with elite_attention(c.unet, mapper):
                record(f"{label}: right caption, through its k/v copies", contexts["right caption"])
                for name, chosen in (("its 5 words", words), ("its w0", words[:, :1])):
                    record(f"{label}: {name}", encode_prompts_with_words(prompts, chosen.to(c.text_encoder.dtype),
                                                                           c.tokenizer, c.text_encoder))
    timesteps = torch.cat(timesteps)
    report = {}
    for name, parts in errors.items():
        image, on_object = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        report[name] = {"image": round(image.mean().item(), 4), "object": round(on_object.mean().item(), 4),
                        "object by timestep band": [round(on_object[(timesteps >= a) & (timesteps < b)].mean().item(), 4)
                                                    for a, b in TIMESTEP_BANDS]}
    return {"count": count, "seed": seed, "timestep bands": TIMESTEP_BANDS, "errors": report}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The toy diffusion loss under right, wrong and mapped captions (JSON).")
    parser.add_argument("--mapper", type=Path, action="append", default=None,
                        help="a global mapper folder (repeatable; default: the shipped toy mapper)")
    parser.add_argument("--count", type=int, default=384)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    components = load_components("toy", device="cpu", dtype=torch.float32)
    folders = args.mapper or [ASSETS_DIR / "toy-global-mapper"]
    report = loss_by_caption(components, {str(f): GlobalMapper.from_pretrained(f).eval() for f in folders},
                             args.count, args.seed)
    report["command"] = "python -m elite_tutorial.studies.loss_study " + " ".join(f"--mapper {f}" for f in folders) + \
        f" --count {args.count} --seed {args.seed}"
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
