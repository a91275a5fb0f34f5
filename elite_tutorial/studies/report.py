"""The toy world's figures, measured on the shipped weights: `elite-toy-report` prints them as JSON.

- size of `assets/`; time to `load_components("toy")`; one 25-step generation (CPU, benchmark);
- VAE reconstruction PSNR on held-out scenes;
- the judge's own accuracy on held-out renders;
- toy CLIP: how often it picks an image's caption among 10, and among the same scene's captions in
  the five shapes;
- what a global mapper can read from the toy image encoder: a linear probe per attribute;
- prompt adherence: generate from held-out prompts (attributes randomly left out, prefixes or plain),
  judge the images, score the attributes each prompt named;
- cross-attention localisation: noise a held-out scene, run the UNet with its caption and compare the
  shape word's attention inside and outside the object's true mask, at the 16 x 16 layers.

Held-out scenes use seeds from `HELD_OUT_SEED` on, which no training pool reaches.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm
from transformers import CLIPModel, CLIPVisionModel

from ..attention_maps import capture_cross_attention, cross_attention_layers, layer_resolution
from ..components import ASSETS_DIR, Components, load_components
from ..data import clip_normalise, object_crop
from ..mappers import clip_feature_levels
from ..metrics import projected_features
from ..toyworld.judge import ToyJudge, accuracy
from ..toyworld.render import ATTRIBUTES, POSITION_PHRASES, SIZE, caption, exact_scene, images_to_tensor, random_spec
from .pretrain import HELD_OUT_SEED, shape_contrast_group, tokenize

EVAL_DIR = ASSETS_DIR / "toy-eval"


def held_out_specs(count: int, offset: int = 0, two_object_probability: float = 0.0):
    return [random_spec(np.random.default_rng(HELD_OUT_SEED + offset + i), two_object_probability) for i in range(count)]


def _pixels(images: np.ndarray, device) -> torch.Tensor:
    return images_to_tensor(images).to(device)


def folder_megabytes(folder: Path) -> float:
    return round(sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()) / 1e6, 2)


@torch.no_grad()
def vae_psnr(components: Components, count: int = 500) -> float:
    images = np.stack([exact_scene(s).image for s in held_out_specs(count, two_object_probability=0.25)])
    x = _pixels(images, components.device) * 2 - 1
    psnrs = []
    for batch in x.split(100):
        rec = components.vae.decode(components.vae.encode(batch).latent_dist.mode()).sample.clamp(-1, 1)
        mse = ((rec - batch) / 2).square().flatten(1).mean(1)
        psnrs.append(10 * torch.log10(1 / mse))
    return round(float(torch.cat(psnrs).mean()), 2)


def _clip_embeddings(clip: CLIPModel, tokenizer, scenes) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-length CLIP embeddings of `scenes`' images and of their full captions: two (n, projection)."""
    device = clip.device
    pixels = clip_normalise(_pixels(np.stack([s.image for s in scenes]), device))
    ids = tokenize(tokenizer, [s.caption for s in scenes], "longest").to(device)
    image_features = F.normalize(projected_features(clip.get_image_features(pixel_values=pixels)), dim=-1)
    text_features = F.normalize(projected_features(clip.get_text_features(input_ids=ids)), dim=-1)
    return image_features, text_features


@torch.no_grad()
def clip_retrieval(clip: CLIPModel, tokenizer, count: int = 500, choices: int = 10) -> float:
    """Fraction of held-out images whose own caption scores highest among `choices` captions."""
    scenes = [exact_scene(s) for s in held_out_specs(count, offset=10_000, two_object_probability=0.25)]
    image_features, text_features = _clip_embeddings(clip, tokenizer, scenes)
    rng = np.random.default_rng(0)
    correct = 0
    for i in range(count):
        others = rng.choice([j for j in range(count) if j != i], size=choices - 1, replace=False)
        candidates = np.concatenate([[i], others])
        correct += int((image_features[i] @ text_features[candidates].T).argmax() == 0)
    return round(correct / count, 4)


@torch.no_grad()
def clip_shape_among_5(clip: CLIPModel, tokenizer, groups: int = 200) -> float:
    """Fraction of images whose own caption scores highest among the captions of the same held-out
    scene drawn in each of the five shapes (`pretrain.shape_contrast_group`; chance 0.2): whether
    CLIP tells shapes apart when nothing else differs."""
    specs = [spec for g in range(groups)
             for spec in shape_contrast_group(np.random.default_rng(HELD_OUT_SEED + 60_000 + g))]
    image_features, text_features = _clip_embeddings(clip, tokenizer, [exact_scene(s) for s in specs])
    shapes = len(specs) // groups
    similarity = image_features.reshape(groups, shapes, -1) @ text_features.reshape(groups, shapes, -1).transpose(1, 2)
    return round(float((similarity.argmax(-1) == torch.arange(shapes, device=similarity.device)).float().mean()), 4)


def linear_probe_accuracy(features: torch.Tensor, labels: torch.Tensor, train: int, steps: int = 300,
                          seed: int = 0) -> float:
    """Held-out accuracy of a linear classifier (softmax regression, full-batch Adam) fitted on the
    first `train` rows of `features` (n, d), standardised with those rows' statistics, to predict the
    integer `labels` (n,); scored on the remaining rows."""
    x = features.float()
    x = (x - x[:train].mean(0)) / (x[:train].std(0) + 1e-6)
    with torch.random.fork_rng():  # seeded initial weights, the caller's generator left as it was
        torch.manual_seed(seed)
        classifier = torch.nn.Linear(x.shape[1], int(labels.max()) + 1)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-2, weight_decay=1e-4)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            F.cross_entropy(classifier(x[:train]), labels[:train]).backward()
            optimizer.step()
    with torch.no_grad():
        return round(float((classifier(x[train:]).argmax(1) == labels[train:]).float().mean()), 3)


PROBED_ATTRIBUTES = ("shape", "colour", "pattern", "position", "background")


@torch.no_grad()
def mapper_input_probe(image_encoder: CLIPVisionModel, count: int = 3000, train_fraction: float = 0.8,
                       view: str = "image") -> dict:
    """What a global mapper can read from an image: for each attribute of held-out single-object
    scenes, the accuracy of a linear probe on the image encoder's last feature level (the class token
    and the mean patch token, side by side: what word w0 is computed from), with chance beside it.
    `view`: the encoder sees the whole scene ("image") or the object alone ("object", `object_crop`
    resized to the scene's size), as a global mapper with that `input_view` does.

    A mapper is a small MLP, not a linear probe, but an attribute the probe cannot read from these
    features is one the mapper has little to work with."""
    specs = held_out_specs(count, offset=50_000)
    device = image_encoder.device

    def seen(spec) -> np.ndarray:
        scene = exact_scene(spec)
        if view == "image":
            return scene.image
        crop = object_crop(Image.fromarray(scene.image), scene.masks[0]).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
        return np.asarray(crop)

    features = []
    for start in range(0, count, 250):
        pixels = clip_normalise(_pixels(np.stack([seen(s) for s in specs[start:start + 250]]), device))
        last = clip_feature_levels(image_encoder, pixels.to(image_encoder.dtype))[0].float().cpu()
        features.append(torch.cat([last[:, 0], last[:, 1:].mean(1)], dim=1))
    features = torch.cat(features)
    train = int(count * train_fraction)
    probe = {}
    for attribute in PROBED_ATTRIBUTES:
        labels = torch.tensor([ATTRIBUTES[attribute].index(s.labels()[attribute]) for s in specs])
        probe[attribute] = {"accuracy": linear_probe_accuracy(features, labels, train),
                            "chance": round(1 / len(ATTRIBUTES[attribute]), 3)}
    return probe


def judge_accuracy(judge: ToyJudge, count: int = 1000) -> dict[str, float]:
    specs = held_out_specs(count, offset=20_000)
    images = np.stack([exact_scene(s).image for s in specs])
    return {k: round(v, 4) for k, v in accuracy(judge, images, [s.labels() for s in specs]).items()}


def prompted_attributes(prompt: str, labels: dict[str, str]) -> dict[str, str]:
    """The attributes a prompt actually names (the caption generator leaves some out)."""
    words = prompt.replace(",", " ").split()
    named = {k: v for k, v in labels.items() if k not in ("position", "pattern") and v in words}
    if POSITION_PHRASES[labels["position"]] in prompt:
        named["position"] = labels["position"]
    if labels["pattern"] in words:
        named["pattern"] = labels["pattern"]
    return named


@torch.no_grad()
def prompt_adherence(components: Components, judge: ToyJudge, count: int = 500, steps: int = 25,
                     guidance: float = 7.5, batch: int = 50, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    specs = held_out_specs(count, offset=30_000)
    prompts = [caption(s, rng, drop=0.3) for s in specs]
    pipe = components.text_to_image_pipeline()
    pipe.set_progress_bar_config(disable=True)
    images = []
    for start in tqdm(range(0, count, batch), desc="prompt adherence"):
        out = pipe(prompts[start:start + batch], num_inference_steps=steps, guidance_scale=guidance,
                   height=SIZE, width=SIZE, output_type="np",
                   generator=torch.Generator(components.device).manual_seed(seed + start))
        images.append((out.images * 255).round().astype(np.uint8))
    images = np.concatenate(images)
    named = [prompted_attributes(p, s.labels()) for p, s in zip(prompts, specs)]
    per_attribute = accuracy(judge, images, named)
    predicted = judge.predict(images)
    hits = [predicted[k][i] == v for i, n in enumerate(named) for k, v in n.items()]
    plain = [i for i, p in enumerate(prompts) if not p.startswith(("a photo", "a picture", "an image", "a rendering"))]
    plain_hits = [predicted[k][i] == v for i in plain for k, v in named[i].items()]
    return {"mean_over_prompted_attributes": round(float(np.mean(hits)), 4),
            "per_attribute": {k: round(v, 4) for k, v in per_attribute.items()},
            "plain_prompts": len(plain), "plain_prompts_mean": round(float(np.mean(plain_hits)), 4),
            "prompts": count, "steps": steps, "guidance": guidance,
            "examples": [(prompts[i], images[i]) for i in range(8)]}


@torch.no_grad()
def attention_localisation(components: Components, count: int = 200, timesteps=(200, 400, 600, 800)) -> dict:
    """Mean attention of the shape word inside its true mask / outside, at the largest-map layers."""
    unet, vae = components.unet, components.vae
    specs = held_out_specs(count, offset=40_000)
    scenes = [exact_scene(s) for s in specs]
    layers = cross_attention_layers(unet)
    latent_side = unet.config.sample_size
    sizes = {name: layer_resolution(unet, name) for name in layers}
    top = [name for name in layers if sizes[name] == latent_side]
    ratios, inside, outside = [], [], []
    generator = torch.Generator().manual_seed(0)
    for start in range(0, count, 50):
        chunk = scenes[start:start + 50]
        x = _pixels(np.stack([s.image for s in chunk]), components.device) * 2 - 1
        latents = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor
        ids = tokenize(components.tokenizer, [s.caption for s in chunk]).to(components.device)
        context = components.text_encoder(ids).last_hidden_state
        shape_ids = [components.tokenizer(s.spec.objects[0].shape, add_special_tokens=False).input_ids[0] for s in chunk]
        positions = torch.tensor([row.tolist().index(t) for row, t in zip(ids.cpu(), shape_ids)])
        masks = torch.from_numpy(np.stack([s.masks[0] for s in chunk])).float()[:, None]
        masks = F.interpolate(masks, size=(latent_side, latent_side), mode="area").flatten(1) >= 0.5
        total = torch.zeros(len(chunk), latent_side * latent_side)
        for t in timesteps:
            noise = torch.randn(latents.shape, generator=generator).to(latents)
            noisy = components.scheduler.add_noise(latents, noise, torch.tensor([t]))
            with capture_cross_attention(unet) as capture:
                unet(noisy, t, encoder_hidden_states=context)
            for name in top:
                probs = capture.probabilities(name).mean(1)  # (batch, pixels, tokens), heads averaged
                total += probs[torch.arange(len(chunk)), :, positions]
        for row, mask in zip(total, masks):
            inside.append(float(row[mask].mean()))
            outside.append(float(row[~mask].mean()))
            ratios.append(inside[-1] / outside[-1])
    return {"layers": top, "resolution": latent_side, "timesteps": list(timesteps), "scenes": count,
            "inside_over_outside": round(float(np.mean(inside) / np.mean(outside)), 3),
            "median_per_scene_ratio": round(float(np.median(ratios)), 3)}


def timings(folder, device="cpu", repeats: int = 3) -> dict:
    """Load time and one 25-step generation (guidance on, batch 1), best of `repeats`."""
    loads = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        components = load_components(folder, device=device)
        loads.append(time.perf_counter() - t0)
    pipe = components.text_to_image_pipeline()
    pipe.set_progress_bar_config(disable=True)
    runs = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        pipe("a red circle on the left", num_inference_steps=25, height=SIZE, width=SIZE,
             generator=torch.Generator().manual_seed(i), output_type="np")
        runs.append(time.perf_counter() - t0)
    return {"load_seconds": round(min(loads), 3), "generate_25_steps_seconds": round(min(runs[1:]), 3)}


def toy_report(folder=None, eval_folder=None, device=None, prompts: int = 500) -> dict:
    folder = Path(folder or ASSETS_DIR / "toy-sd")
    eval_folder = Path(eval_folder or EVAL_DIR)
    components = load_components(folder, device=device, dtype=torch.float32)
    judge = ToyJudge.from_pretrained(eval_folder / "judge").to(components.device).eval()
    clip = CLIPModel.from_pretrained(eval_folder / "clip").to(components.device).eval()
    report = {
        "assets_megabytes": {"toy-sd": folder_megabytes(folder), "toy-eval": folder_megabytes(eval_folder)},
        "vae_psnr_db": vae_psnr(components),
        "judge_held_out_accuracy": judge_accuracy(judge),
        "clip_caption_among_10": clip_retrieval(clip, components.tokenizer),
        "clip_shape_among_5": clip_shape_among_5(clip, components.tokenizer),
        "mapper_input_probe": mapper_input_probe(components.image_encoder),
        "attention_localisation": attention_localisation(components),
    }
    adherence = prompt_adherence(components, judge, count=prompts)
    report["examples"] = [p for p, _ in adherence.pop("examples")]
    report["prompt_adherence"] = adherence
    report["cpu_timings"] = timings(folder, "cpu")
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="elite-toy-report", description="Print the toy world's figures as JSON.")
    parser.add_argument("--folder", type=Path, default=None, help="components folder (default assets/toy-sd)")
    parser.add_argument("--eval-folder", type=Path, default=None, help="judge + clip folder (default assets/toy-eval)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--prompts", type=int, default=500)
    args = parser.parse_args(argv)
    print(json.dumps(toy_report(args.folder, args.eval_folder, args.device, args.prompts), indent=1))


if __name__ == "__main__":
    main()
