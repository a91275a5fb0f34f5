"""Pretraining the toy world's miniature Stable Diffusion, stage by stage, as SD v1.4 was built:

1. **CLIP** (text + vision towers) trained contrastively on scenes and their captions;
2. **VAE** (`AutoencoderKL`) trained to reconstruct scenes through 4 x 16 x 16 latents;
3. **UNet** trained to predict the noise added to VAE latents, conditioned on the *frozen* CLIP text
   encoder's hidden states, with 10 % of captions dropped to "" for classifier-free guidance;
4. the **toy judge** (evaluation only) trained on rendered ground truth.

Console script: `elite-toy-pretrain --out assets/toy-sd --eval-out assets/toy-eval`.
Resumable: each stage writes a checkpoint every `checkpoint_every` steps into `<out>.work/` (atomic
safetensors) and a finished stage's models; rerunning the same command continues where it stopped.
Batches, caption drops and noise at step k come from a generator seeded by (seed, stage, k), so a
resumed run computes exactly the steps an uninterrupted run would, and DataLoader workers can build
batches ahead of the accelerator. `--stages` runs some stages only (see `pretrain`).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer, CLIPVisionModel

from ..data import clip_normalise  # the toy image encoder is fed exactly like ViT-L/14
from ..storage import write_json_atomic
from ..toyworld.judge import ToyJudge, label_indices
from ..toyworld.models import toy_clip, toy_scheduler, toy_tokenizer, toy_unet, toy_vae
from ..toyworld.render import SHAPES, SIZE, SceneSpec, caption, images_to_tensor, random_spec, render
from ..train_loop import Loop, StepRate, load_training_state, save_training_state, with_noise_seed

STAGES = ("clip", "vae", "unet", "judge")
HELD_OUT_SEED = 10**9  # evaluation scenes use seeds from here on; training pools never reach it


@dataclass(frozen=True)
class Recipe:
    """Every number that decides the shipped weights (with the code itself)."""

    seed: int = 0
    pool_size: int = 20_000
    caption_drop: float = 0.3
    clip_steps: int = 600
    clip_batch: int = 128
    clip_lr: float = 1e-3
    # groups of five scenes per CLIP batch that differ only in the object's shape (see `shape_contrast_group`)
    clip_shape_groups: int = 0
    clip_patch_size: int = 8        # pixels per vision-tower patch side (4: a 16 x 16 grid)
    vae_steps: int = 600
    vae_batch: int = 32
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    vae_crop: int = 32
    unet_steps: int = 1000
    unet_batch: int = 64
    unet_lr: float = 1e-3
    cfg_dropout: float = 0.1
    snr_gamma: float = 5.0
    ema_decay: float = 0.995
    judge_steps: int = 300
    judge_batch: int = 128
    judge_lr: float = 2e-3
    warmup_steps: int = 100
    checkpoint_every: int = 250


PROFILES = {
    # sized for about an hour on a 2-core CPU
    "default": Recipe(),
    # sized for about five minutes on one H100 with CLIP, VAE and judge run at once (`--stages`): the
    # steps there cost what the kernel launches cost, so batches are wide; the VAE sees whole scenes
    "gpu": Recipe(pool_size=50_000, clip_steps=1500, clip_batch=256, vae_steps=2000, vae_batch=128, vae_crop=64,
                  unet_steps=2000, unet_batch=768, ema_decay=0.998, judge_steps=1000, judge_batch=256,
                  checkpoint_every=500),
    # a few steps of everything: for tests and for trying the command
    "smoke": Recipe(pool_size=64, clip_steps=6, clip_batch=16, vae_steps=6, vae_batch=8, unet_steps=6,
                    unet_batch=8, judge_steps=6, judge_batch=16, warmup_steps=2, checkpoint_every=3),
}


# --------------------------------------------------------------------------------------------------
# Data.

def _render_image(spec: SceneSpec) -> np.ndarray:
    return render(spec)[0]


class ScenePool:
    """`size` rendered scenes (specs and pixels), drawn once; captions are drawn afresh per use.

    With `cache`, the pixels are saved there (`.npy`) the first time and memory-mapped after, so a
    resumed run, or stages run as separate processes, render the pool once."""

    def __init__(self, first_seed: int, size: int, two_object_probability: float = 0.25,
                 processes: int | None = None, cache: Path | None = None):
        self.specs = [random_spec(np.random.default_rng(s), two_object_probability)
                      for s in range(first_seed, first_seed + size)]
        if cache is not None and cache.exists():
            self.images = np.load(cache, mmap_mode="r")
            if self.images.shape[0] == size:
                return
        processes = processes or min(os.cpu_count() or 1, 16)
        # fork (Linux): workers only run numpy; spawn would re-run the caller's script in each worker
        if processes > 1 and size >= 256 and "fork" in multiprocessing.get_all_start_methods():
            with multiprocessing.get_context("fork").Pool(processes) as workers:
                rendered = workers.map(_render_image, self.specs, chunksize=256)
        else:
            rendered = [_render_image(spec) for spec in self.specs]
        self.images = np.stack(rendered)  # (size, 64, 64, 3) uint8
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            partial = cache.with_name(f"{cache.stem}.{os.getpid()}.partial.npy")
            np.save(partial, self.images)
            os.replace(partial, cache)

    def __len__(self) -> int:
        return len(self.specs)

    def pixels(self, index: np.ndarray) -> torch.Tensor:
        """(batch, 3, 64, 64) floats in [0, 1]."""
        return images_to_tensor(self.images[index])


def tokenize(tokenizer: CLIPTokenizer, texts: list[str], padding: str = "max_length") -> torch.Tensor:
    """(batch, 77) ids padded with end-of-text tokens, as Stable Diffusion pads prompts.

    CLIP training pads only to the longest caption (`padding="longest"`): under the causal mask no
    token up to the end-of-text token sees the padding, so this changes nothing but the cost."""
    return tokenizer(texts, padding=padding, max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def _loader_workers(device: torch.device, renders: bool = False) -> int:
    """Batch-building processes: none on a CPU (its cores are busy training). Beside a GPU, a few for
    batches read from a pool; for batches that render scenes as they are built (CLIP's shape groups:
    120 renders a step in the `gpu` recipe with 24 groups), every core but the trainer's."""
    if device.type == "cpu":
        return 0
    cores = os.cpu_count() or 2
    return max(1, cores - 1) if renders else min(4, max(1, cores // 4))


# --------------------------------------------------------------------------------------------------
# The training loop shared by all stages: the project's one loop (`train_loop.Loop`).

def _learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak (stateless: resume needs no scheduler)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_loop(
    name: str,
    model: torch.nn.Module,
    make_batch: Callable[[np.random.Generator], dict],
    loss_fn: Callable[[dict, torch.Generator], dict[str, torch.Tensor]],
    steps: int,
    lr: float,
    recipe: Recipe,
    work: Path,
    device: torch.device,
    ema: torch.nn.Module | None = None,
    stop_after: int | None = None,
    workers: int | None = None,
) -> list[dict[str, float]]:
    """AdamW over `model`'s trainable parameters for `steps` steps, in `train_loop.Loop`. `make_batch(rng)`
    builds a step's inputs on the CPU, rng seeded by (recipe.seed, stage, step); `loss_fn(batch on
    device, generator)` returns named losses whose sum is minimised. The learning rate warms up over
    `recipe.warmup_steps`, then falls to a tenth (`_learning_rate`); gradients are clipped to norm 1.
    `ema`: a copy of `model` that ends as the average of its weights (diffusers' `EMAModel`, decay up to
    `recipe.ema_decay`). Resumes from `work/<name>.checkpoint.safetensors` when present (the history
    from `work/<name>.history.json`). `stop_after` ends the run early after that many total steps (to
    test resuming). `workers`: batch-building processes (default `_loader_workers(device)`); they change
    nothing but the speed."""
    work.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2, fused=device.type == "cuda")
    checkpoint = work / f"{name}.checkpoint.safetensors"
    history_file = work / f"{name}.history.json"
    names = [n for n, _ in model.named_parameters()]
    average = None if ema is None else EMAModel(ema.parameters(), decay=recipe.ema_decay, foreach=True)
    start, history = 0, []
    if checkpoint.exists():
        start = load_training_state(checkpoint, model, optimizer, device, average, names)
        # the history may have been written just before a crash that kept the older checkpoint
        history = json.loads(history_file.read_text())[:start]
    end = min(steps, stop_after or steps)

    def save(done: int, history: list) -> None:
        if done % recipe.checkpoint_every == 0 or done == end:
            history_file.write_text(json.dumps(history))
            save_training_state(checkpoint, done, model, optimizer, average, names)

    stage = STAGES.index(name) if name in STAGES else 99
    loop = Loop(model, optimizer, lambda _model, batch, generator: loss_fn(batch, generator), with_noise_seed(make_batch),
                key=lambda step, _micro: (recipe.seed, stage, step), steps=steps, device=device, start=start, end=end,
                max_grad_norm=1.0, schedule=lambda o, last: StepRate(o, lambda step, peak: _learning_rate(
                    step, steps, peak, recipe.warmup_steps), last),
                ema=average, history=history, record=lambda losses: {k: round(v, 6) for k, v in losses.items()},
                after_step=save, needs_history=lambda done: done % recipe.checkpoint_every == 0,
                workers=_loader_workers(device) if workers is None else workers, description=f"pretrain {name}")
    history = loop.run()
    if average is not None:
        average.copy_to(ema.parameters())
    return history


# --------------------------------------------------------------------------------------------------
# Stages. Each builds its batches on the CPU (`make_batch`) and computes its losses on the device.

def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _seed_init(recipe: Recipe, stage: str) -> None:
    """Seed the global generator before a stage builds its models: initial weights follow the seed."""
    torch.manual_seed(recipe.seed * 100 + STAGES.index(stage))


def shape_contrast_group(rng: np.random.Generator) -> list[SceneSpec]:
    """One random single-object scene drawn once in each shape, all else equal (colour, pattern, size,
    position, background, texture).

    In a batch of random scenes two captions rarely agree on everything but the shape, so CLIP can
    match images to captions without ever reading shape, and it learns to see little of it. A group
    in the batch makes shape the only way to tell its five images (and captions) apart."""
    spec = random_spec(rng, two_object_probability=0.0)
    return [replace(spec, objects=(replace(spec.objects[0], shape=shape),)) for shape in SHAPES]


def train_clip(pool: ScenePool, tokenizer, recipe: Recipe, work: Path, device, stop_after=None):
    _seed_init(recipe, "clip")
    model = toy_clip(tokenizer, recipe.clip_patch_size).to(device)
    grouped = len(SHAPES) * recipe.clip_shape_groups
    if grouped > recipe.clip_batch:
        raise ValueError(f"clip_shape_groups={recipe.clip_shape_groups} needs {grouped} images, more than "
                         f"the batch of {recipe.clip_batch}.")

    def make_batch(rng):
        index = rng.integers(len(pool), size=recipe.clip_batch - grouped)
        groups = [spec for _ in range(recipe.clip_shape_groups) for spec in shape_contrast_group(rng)]
        specs = [pool.specs[i] for i in index] + groups
        pixels = pool.pixels(index)
        if groups:
            pixels = torch.cat([pixels, images_to_tensor(np.stack([render(spec)[0] for spec in groups]))])
        texts = [caption(spec, rng, recipe.caption_drop) for spec in specs]
        return {"input_ids": tokenize(tokenizer, texts, padding="longest"), "pixel_values": clip_normalise(pixels)}

    def loss_fn(batch, generator):
        with _autocast(device):
            out = model(**batch, return_loss=True)
        return {"loss_contrastive": out.loss.float()}

    history = train_loop("clip", model, make_batch, loss_fn, recipe.clip_steps, recipe.clip_lr, recipe, work, device,
                         stop_after=stop_after, workers=_loader_workers(device, renders=grouped > 0))
    return model, history


def train_vae(pool: ScenePool, recipe: Recipe, work: Path, device, stop_after=None):
    _seed_init(recipe, "vae")
    vae = toy_vae().to(device)
    crop = recipe.vae_crop

    def make_batch(rng):
        images = pool.pixels(rng.integers(len(pool), size=recipe.vae_batch)) * 2 - 1
        # the VAE is fully convolutional: random crops teach it the same at a fraction of the cost
        top, left = (int(v) for v in rng.integers(0, SIZE - crop + 1, size=2) // 4 * 4)
        return {"images": images[:, :, top:top + crop, left:left + crop]}

    def loss_fn(batch, generator):
        images = batch["images"]
        with _autocast(device):
            posterior = vae.encode(images).latent_dist
            reconstruction = vae.decode(posterior.sample(generator)).sample.float()
        return {"loss_mse": F.mse_loss(reconstruction, images),
                "loss_l1": F.l1_loss(reconstruction, images),
                "loss_kl": recipe.vae_kl_weight * posterior.kl().mean()}

    history = train_loop("vae", vae, make_batch, loss_fn, recipe.vae_steps, recipe.vae_lr, recipe, work, device, stop_after=stop_after)
    # SD scales latents to unit variance (0.18215 for SD's VAE): measure ours the same way.
    with torch.no_grad():
        sample = pool.pixels(np.arange(min(len(pool), 1024))).to(device) * 2 - 1
        std = torch.cat([vae.encode(b).latent_dist.mean for b in sample.split(256)]).std()
    vae.register_to_config(scaling_factor=round(float(1 / std), 5))
    return vae, history


@torch.no_grad()
def _encode_pool(vae, pool: ScenePool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent means and standard deviations of every pool scene, (size, 4, 16, 16) each, on `device`."""
    means, stds = [], []
    for start in range(0, len(pool), 256):
        images = pool.pixels(np.arange(start, min(start + 256, len(pool)))).to(device) * 2 - 1
        dist = vae.encode(images).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def train_unet(pool: ScenePool, tokenizer, text_encoder: CLIPTextModel, vae, recipe: Recipe, work: Path, device, stop_after=None):
    _seed_init(recipe, "unet")
    unet = toy_unet().to(device)
    ema = toy_unet().to(device).requires_grad_(False)
    ema.load_state_dict(unet.state_dict())
    noise_scheduler = DDPMScheduler.from_config(toy_scheduler().config)
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
    latent_mean, latent_std = _encode_pool(vae, pool, device)
    scale = vae.config.scaling_factor
    text_encoder = text_encoder.to(device).requires_grad_(False).eval()

    def make_batch(rng):
        index = rng.integers(len(pool), size=recipe.unet_batch)
        texts = ["" if rng.random() < recipe.cfg_dropout else caption(pool.specs[i], rng, recipe.caption_drop) for i in index]
        return {"index": torch.from_numpy(index), "input_ids": tokenize(tokenizer, texts),
                "timesteps": torch.from_numpy(rng.integers(noise_scheduler.config.num_train_timesteps, size=len(index)))}

    def loss_fn(batch, generator):
        index, timesteps = batch["index"], batch["timesteps"]
        with torch.no_grad():
            context = text_encoder(batch["input_ids"]).last_hidden_state
        mean, std = latent_mean[index], latent_std[index]
        latents = (mean + std * torch.randn(mean.shape, generator=generator, device=device)) * scale
        noise = torch.randn(latents.shape, generator=generator, device=device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        with _autocast(device):
            prediction = unet(noisy, timesteps, encoder_hidden_states=context).sample.float()
        # Min-SNR-gamma weighting (Hang et al. 2023; `--snr_gamma` in diffusers' SD training example):
        # the many nearly-clean timesteps stop dominating, so training converges in fewer steps.
        snr = alphas_cumprod[timesteps] / (1 - alphas_cumprod[timesteps])
        weight = snr.clamp(max=recipe.snr_gamma) / snr
        per_sample = (prediction - noise).square().flatten(1).mean(1)
        return {"loss_noise": (weight * per_sample).mean()}

    history = train_loop("unet", unet, make_batch, loss_fn, recipe.unet_steps, recipe.unet_lr, recipe, work, device, ema=ema,
                         stop_after=stop_after)
    return ema, history


def train_judge(recipe: Recipe, work: Path, device, stop_after=None, make_reader: Callable[[], torch.nn.Module] = ToyJudge):
    """The judge (or, with `make_reader`, another reader of the same attributes: `studies.judge_check`) on
    single-object scenes of its own pool, drawn from the recipe's seed, with a little blur and noise."""
    pool = ScenePool(recipe.seed * 1_000_000 + 500_000, max(recipe.pool_size // 2, 64), two_object_probability=0.0,
                     cache=work / "judge-pool.npy")
    labels = label_indices([spec.labels() for spec in pool.specs])
    _seed_init(recipe, "judge")
    judge = make_reader().to(device)

    def make_batch(rng):
        index = rng.integers(len(pool), size=recipe.judge_batch)
        return {"images": pool.pixels(index), "blur": bool(rng.random() < 0.5),
                **{f"label_{name}": values[index] for name, values in labels.items()}}

    def loss_fn(batch, generator):
        images = batch["images"]
        # robust to what generated images look like: a little blur and noise
        if batch["blur"]:
            images = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        images = images + 0.03 * torch.randn(images.shape, generator=generator, device=device)
        logits = judge(images)
        return {f"loss_{name}": F.cross_entropy(logits[name], batch[f"label_{name}"]) for name in logits}

    history = train_loop("judge", judge, make_batch, loss_fn, recipe.judge_steps, recipe.judge_lr, recipe, work, device,
                         stop_after=stop_after)
    return judge, history


# --------------------------------------------------------------------------------------------------
# The whole run.

def _stage_done(work: Path, name: str) -> bool:
    return (work / f"{name}.done").is_dir()


def _finish_stage(work: Path, name: str, save: Callable[[Path], None], record: dict) -> None:
    """Write a stage's models and its record (seconds, last losses, command) as one folder."""
    tmp = work / f"{name}.saving.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp)
    (tmp / "record.json").write_text(json.dumps(record, indent=1))
    tmp.rename(work / f"{name}.done")
    (work / f"{name}.checkpoint.safetensors").unlink(missing_ok=True)


def pretrain(out: Path, eval_out: Path, recipe: Recipe = Recipe(), device: str | None = None,
             command: str = "", stages: tuple[str, ...] = STAGES) -> dict | None:
    """Run (or resume) `stages`; once all four are done, write `out` (components folder) and
    `eval_out`, and return the run's log (None while stages remain).

    Stages only meet through `<out>.work/`: CLIP, VAE and judge need nothing from each other, so on a
    machine with a GPU they can run as three processes at once (`--stages clip`, `--stages vae`,
    `--stages judge`), before the UNet, which needs the first two."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out, eval_out = Path(out), Path(eval_out)
    for target in (out, eval_out):
        if target.exists():
            raise FileExistsError(f"{target} exists; move it away to pretrain again.")
    work = out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    recipe_file = work / "recipe.json"
    if recipe_file.exists() and json.loads(recipe_file.read_text()) != asdict(recipe):
        raise ValueError(
            f"{work} holds an unfinished run with another recipe ({recipe_file.read_text()}); resume it "
            "with the same --profile and --seed, or delete that folder to start over."
        )
    write_json_atomic(recipe_file, asdict(recipe))

    tokenizer = toy_tokenizer()
    pool_cache = work / "pool.npy"

    @functools.cache
    def pool() -> ScenePool:  # rendered (or read back) only when a stage that needs it runs
        rendered_here = not pool_cache.exists()
        started = time.perf_counter()
        scenes = ScenePool(recipe.seed * 1_000_000, recipe.pool_size, cache=pool_cache)
        if rendered_here:
            write_json_atomic(work / "pool.json", {"seconds": round(time.perf_counter() - started, 1)})
        return scenes

    def clip_stage():
        model, history = train_clip(pool(), tokenizer, recipe, work, device)
        return model.save_pretrained, history

    def vae_stage():
        vae, history = train_vae(pool(), recipe, work, device)
        return vae.save_pretrained, history

    def unet_stage():
        for needed in ("clip", "vae"):
            if not _stage_done(work, needed):
                raise RuntimeError(f"the UNet needs the {needed} stage: run it first (--stages {needed}).")
        text_encoder = CLIPTextModel.from_pretrained(work / "clip.done")
        vae = AutoencoderKL.from_pretrained(work / "vae.done").to(device)
        unet, history = train_unet(pool(), tokenizer, text_encoder, vae, recipe, work, device)
        return unet.save_pretrained, history

    def judge_stage():
        judge, history = train_judge(recipe, work, device)
        return judge.save_pretrained, history

    runs = {"clip": clip_stage, "vae": vae_stage, "unet": unet_stage, "judge": judge_stage}
    for name in STAGES:
        if name in stages and not _stage_done(work, name):
            t0 = time.perf_counter()
            save, history = runs[name]()
            record = {"seconds": round(time.perf_counter() - t0, 1),  # of the run that finished the stage
                      "loss_last": history[-1], "device": str(device), "command": command}
            _finish_stage(work, name, save, record)
    if not all(_stage_done(work, name) for name in STAGES):
        return None

    records = {name: json.loads((work / f"{name}.done" / "record.json").read_text()) for name in STAGES}
    seconds = {"render_pool": json.loads((work / "pool.json").read_text())["seconds"]}
    seconds.update({name: record["seconds"] for name, record in records.items()})
    seconds["total"] = round(sum(seconds.values()), 1)
    log = {"seconds": seconds, "recipe": asdict(recipe), "device": str(device), "torch": torch.__version__,
           "commands": sorted({record["command"] for record in records.values()} | {command}),
           **{f"{name}_loss_last": record["loss_last"] for name, record in records.items()}}
    _assemble(work, out, eval_out, tokenizer, log)
    return log


def _assemble(work: Path, out: Path, eval_out: Path, tokenizer: CLIPTokenizer, log: dict) -> None:
    """Write the final folders (diffusers layout + image_encoder/; judge + full CLIP), atomically.

    Weights are stored in fp16 (half the size; `load_components` loads them in the dtype asked for,
    fp32 on a CPU): the whole toy world then fits in a few tens of MB."""
    half = torch.float16
    staging = out.with_name(out.name + ".assembling")
    eval_staging = eval_out.with_name(eval_out.name + ".assembling")
    for folder in (staging, eval_staging):
        shutil.rmtree(folder, ignore_errors=True)
    tokenizer.save_pretrained(staging / "tokenizer")
    CLIPTextModel.from_pretrained(work / "clip.done").to(half).save_pretrained(staging / "text_encoder")
    CLIPVisionModel.from_pretrained(work / "clip.done").to(half).save_pretrained(staging / "image_encoder")
    toy_scheduler().save_pretrained(staging / "scheduler")
    AutoencoderKL.from_pretrained(work / "vae.done").to(half).save_pretrained(staging / "vae")
    UNet2DConditionModel.from_pretrained(work / "unet.done").to(half).save_pretrained(staging / "unet")
    (staging / "pretrain_log.json").write_text(json.dumps(log, indent=1))
    # evaluation models: the judge, and the full CLIP (with its projection heads) for CLIP-T / CLIP-I
    ToyJudge.from_pretrained(work / "judge.done").to(half).save_pretrained(eval_staging / "judge")
    CLIPModel.from_pretrained(work / "clip.done").to(half).save_pretrained(eval_staging / "clip")
    staging.rename(out)
    eval_staging.rename(eval_out)
    shutil.rmtree(work)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="elite-toy-pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("assets/toy-sd"))
    parser.add_argument("--eval-out", type=Path, default=Path("assets/toy-eval"))
    parser.add_argument("--profile", choices=sorted(PROFILES), default="default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help="comma-separated stages to run now (default: all); the folders are written "
                             "once all four are done")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--clip-steps", type=int, default=None, help="CLIP stage steps (default: the profile's)")
    parser.add_argument("--clip-shape-groups", type=int, default=None,
                        help="shape-contrast groups of five scenes in each CLIP batch (default: the profile's)")
    parser.add_argument("--clip-patch-size", type=int, default=None,
                        help="pixels per side of the CLIP vision tower's patches (default: the profile's)")
    args = parser.parse_args(argv)
    stages = tuple(args.stages.split(","))
    if unknown := set(stages) - set(STAGES):
        parser.error(f"unknown stages {sorted(unknown)}; choose from {', '.join(STAGES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = replace(PROFILES[args.profile], seed=args.seed)
    for field in ("clip_steps", "clip_shape_groups", "clip_patch_size"):
        if (value := getattr(args, field)) is not None:
            recipe = replace(recipe, **{field: value})
    command = " ".join(["elite-toy-pretrain", *(sys.argv[1:] if argv is None else argv)])
    log = pretrain(args.out, args.eval_out, recipe, args.device, command=command, stages=stages)
    print(json.dumps(log["seconds"]) if log else f"stages {args.stages} done; run the others to finish.")


if __name__ == "__main__":
    main()
