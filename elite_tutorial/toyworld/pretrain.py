"""Pretraining the toy world's miniature Stable Diffusion, stage by stage, as SD v1.4 was built:

1. **CLIP** (text + vision towers) trained contrastively on scenes and their captions;
2. **VAE** (`AutoencoderKL`) trained to reconstruct scenes through 4 x 16 x 16 latents;
3. **UNet** trained to predict the noise added to VAE latents, conditioned on the *frozen* CLIP text
   encoder's hidden states, with 10 % of captions dropped to "" for classifier-free guidance;
4. the **toy judge** (evaluation only) trained on rendered ground truth.

Console script: `elite-toy-pretrain --out assets/toy-sd --judge-out assets/toy-judge`.
Resumable: each stage writes a checkpoint every `checkpoint_every` steps into `<out>.work/` (atomic
safetensors) and a finished stage's models; rerunning the same command continues where it stopped.
Batches, caption drops and noise at step k come from a generator seeded by (seed, stage, k), so a
resumed run computes exactly the steps an uninterrupted run would.
"""
from __future__ import annotations

import argparse
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
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer, CLIPVisionModel

from ..data import clip_normalise  # the toy image encoder is fed exactly like ViT-L/14
from ..storage import load_optimizer_tensors, optimizer_tensors, save_safetensors_atomic
from .judge import ToyJudge, label_indices
from .models import toy_clip, toy_scheduler, toy_tokenizer, toy_unet, toy_vae
from .render import SIZE, SceneSpec, caption, images_to_tensor, random_spec, render

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
    # a few steps of everything: for tests and for trying the command
    # longer and wider batches: for a GPU
    "large": Recipe(clip_steps=2000, vae_steps=2000, vae_batch=64, unet_steps=6000, unet_batch=128,
                    judge_steps=1000, pool_size=50_000, ema_decay=0.998, checkpoint_every=1000),
    "smoke": Recipe(pool_size=64, clip_steps=6, clip_batch=16, vae_steps=6, vae_batch=8, unet_steps=6,
                    unet_batch=8, judge_steps=6, judge_batch=16, warmup_steps=2, checkpoint_every=3),
}


# --------------------------------------------------------------------------------------------------
# Data.

def _render_seed(seed: int, two_object_probability: float) -> tuple[SceneSpec, np.ndarray]:
    spec = random_spec(np.random.default_rng(seed), two_object_probability)
    return spec, render(spec)[0]


class ScenePool:
    """`size` rendered scenes (specs and pixels), drawn once; captions are drawn afresh per use."""

    def __init__(self, first_seed: int, size: int, two_object_probability: float = 0.25, processes: int | None = None):
        seeds = range(first_seed, first_seed + size)
        args = [(s, two_object_probability) for s in seeds]
        processes = processes or min(os.cpu_count() or 1, 8)
        # fork (Linux): workers only run numpy; spawn would re-run the caller's script in each worker
        if processes > 1 and size >= 256 and "fork" in multiprocessing.get_all_start_methods():
            with multiprocessing.get_context("fork").Pool(processes) as pool:
                rendered = pool.starmap(_render_seed, args, chunksize=256)
        else:
            rendered = [_render_seed(*a) for a in args]
        self.specs = [spec for spec, _ in rendered]
        self.images = np.stack([image for _, image in rendered])  # (size, 64, 64, 3) uint8

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


# --------------------------------------------------------------------------------------------------
# The training loop shared by all stages.

def _learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak (stateless: resume needs no scheduler)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_loop(
    name: str,
    model: torch.nn.Module,
    loss_fn: Callable[[np.random.Generator, torch.Generator], dict[str, torch.Tensor]],
    steps: int,
    lr: float,
    recipe: Recipe,
    work: Path,
    device: torch.device,
    ema: torch.nn.Module | None = None,
    stop_after: int | None = None,
) -> list[dict[str, float]]:
    """AdamW over `model`'s trainable parameters for `steps` steps; `loss_fn` returns named losses
    whose sum is minimised. Resumes from `work/<name>.checkpoint.safetensors` when present.
    `stop_after` ends the run early after that many total steps (to test resuming)."""
    work.mkdir(parents=True, exist_ok=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    checkpoint = work / f"{name}.checkpoint.safetensors"
    history_file = work / f"{name}.history.json"
    start, history = 0, []
    if checkpoint.exists():
        tensors = load_file(str(checkpoint), device=str(device))
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        if ema is not None:
            ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        load_optimizer_tensors(optimizer, tensors)
        with safe_open(str(checkpoint), "pt") as f:
            start = int(f.metadata()["step"])
        # the history may have been written just before a crash that kept the older checkpoint
        history = json.loads(history_file.read_text())[:start]
    stage_id = STAGES.index(name) if name in STAGES else 99
    bar = tqdm(range(start, steps), desc=f"pretrain {name}", initial=start, total=steps, dynamic_ncols=True)
    model.train()
    for step in bar:
        rng = np.random.default_rng([recipe.seed, stage_id, step])
        generator = torch.Generator(device).manual_seed(int(rng.integers(2**62)))
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, steps, lr, recipe.warmup_steps)
        losses = loss_fn(rng, generator)
        total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if ema is not None:
            decay = min(recipe.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for e, p in zip(ema.parameters(), model.parameters()):
                    e.lerp_(p, 1 - decay)
        history.append({k: round(float(v.detach()), 6) for k, v in losses.items()})
        bar.set_postfix({k: f"{v:.4f}" for k, v in history[-1].items()})
        done = step + 1
        if done % recipe.checkpoint_every == 0 or done == steps or done == stop_after:
            tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
            if ema is not None:
                tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
            tensors.update(optimizer_tensors(optimizer))
            history_file.write_text(json.dumps(history))
            save_safetensors_atomic(tensors, checkpoint, {"step": str(done)})
        if done == stop_after:
            break
    bar.close()
    model.eval()
    return history


# --------------------------------------------------------------------------------------------------
# Stages.

def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _seed_init(recipe: Recipe, stage: str) -> None:
    """Seed the global generator before a stage builds its models: initial weights follow the seed."""
    torch.manual_seed(recipe.seed * 100 + STAGES.index(stage))


def train_clip(pool: ScenePool, tokenizer, recipe: Recipe, work: Path, device, stop_after=None):
    _seed_init(recipe, "clip")
    model = toy_clip(tokenizer).to(device)

    def loss_fn(rng, generator):
        index = rng.integers(len(pool), size=recipe.clip_batch)
        texts = [caption(pool.specs[i], rng, recipe.caption_drop) for i in index]
        with _autocast(device):
            out = model(input_ids=tokenize(tokenizer, texts, padding="longest").to(device),
                        pixel_values=clip_normalise(pool.pixels(index)).to(device), return_loss=True)
        return {"loss_contrastive": out.loss.float()}

    history = train_loop("clip", model, loss_fn, recipe.clip_steps, recipe.clip_lr, recipe, work, device, stop_after=stop_after)
    return model, history


def train_vae(pool: ScenePool, recipe: Recipe, work: Path, device, stop_after=None):
    _seed_init(recipe, "vae")
    vae = toy_vae().to(device)

    crop = recipe.vae_crop

    def loss_fn(rng, generator):
        images = pool.pixels(rng.integers(len(pool), size=recipe.vae_batch)) * 2 - 1
        # the VAE is fully convolutional: random crops teach it the same at a fraction of the cost
        top, left = (int(v) for v in rng.integers(0, SIZE - crop + 1, size=2) // 4 * 4)
        images = images[:, :, top:top + crop, left:left + crop].to(device)
        with _autocast(device):
            posterior = vae.encode(images).latent_dist
            reconstruction = vae.decode(posterior.sample(generator)).sample.float()
        return {"loss_mse": F.mse_loss(reconstruction, images),
                "loss_l1": F.l1_loss(reconstruction, images),
                "loss_kl": recipe.vae_kl_weight * posterior.kl().mean()}

    history = train_loop("vae", vae, loss_fn, recipe.vae_steps, recipe.vae_lr, recipe, work, device, stop_after=stop_after)
    # SD scales latents to unit variance (0.18215 for SD's VAE): measure ours the same way.
    with torch.no_grad():
        sample = pool.pixels(np.arange(min(len(pool), 1024))).to(device) * 2 - 1
        std = torch.cat([vae.encode(b).latent_dist.mean for b in sample.split(256)]).std()
    vae.register_to_config(scaling_factor=round(float(1 / std), 5))
    return vae, history


@torch.no_grad()
def _encode_pool(vae, pool: ScenePool, device) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for start in range(0, len(pool), 256):
        images = pool.pixels(np.arange(start, min(start + 256, len(pool)))).to(device) * 2 - 1
        dist = vae.encode(images).latent_dist
        means.append(dist.mean.cpu())
        stds.append(dist.std.cpu())
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

    def loss_fn(rng, generator):
        index = rng.integers(len(pool), size=recipe.unet_batch)
        texts = ["" if rng.random() < recipe.cfg_dropout else caption(pool.specs[i], rng, recipe.caption_drop) for i in index]
        with torch.no_grad():
            context = text_encoder(tokenize(tokenizer, texts).to(device)).last_hidden_state
        eps = torch.randn(latent_mean[index].shape, generator=torch.Generator().manual_seed(int(rng.integers(2**62))))
        latents = ((latent_mean[index] + latent_std[index] * eps) * scale).to(device)
        noise = torch.randn(latents.shape, generator=generator, device=device)
        timesteps = torch.from_numpy(rng.integers(noise_scheduler.config.num_train_timesteps, size=len(index))).to(device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        with _autocast(device):
            prediction = unet(noisy, timesteps, encoder_hidden_states=context).sample.float()
        # Min-SNR-gamma weighting (Hang et al. 2023; `--snr_gamma` in diffusers' SD training example):
        # the many nearly-clean timesteps stop dominating, so training converges in fewer steps.
        snr = alphas_cumprod[timesteps] / (1 - alphas_cumprod[timesteps])
        weight = snr.clamp(max=recipe.snr_gamma) / snr
        per_sample = (prediction - noise).square().flatten(1).mean(1)
        return {"loss_noise": (weight * per_sample).mean()}

    history = train_loop("unet", unet, loss_fn, recipe.unet_steps, recipe.unet_lr, recipe, work, device, ema=ema, stop_after=stop_after)
    return ema, history


def train_judge(recipe: Recipe, work: Path, device, stop_after=None):
    pool = ScenePool(recipe.seed * 1_000_000 + 500_000, max(recipe.pool_size // 2, 64), two_object_probability=0.0)
    labels = label_indices([spec.labels() for spec in pool.specs])
    _seed_init(recipe, "judge")
    judge = ToyJudge().to(device)

    def loss_fn(rng, generator):
        index = rng.integers(len(pool), size=recipe.judge_batch)
        images = pool.pixels(index).to(device)
        # robust to what generated images look like: a little blur and noise
        if rng.random() < 0.5:
            images = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        images = images + 0.03 * torch.randn(images.shape, generator=generator, device=device)
        logits = judge(images)
        return {f"loss_{name}": F.cross_entropy(logits[name], labels[name][index].to(device)) for name in logits}

    history = train_loop("judge", judge, loss_fn, recipe.judge_steps, recipe.judge_lr, recipe, work, device, stop_after=stop_after)
    return judge, history


# --------------------------------------------------------------------------------------------------
# The whole run.

def _stage_done(work: Path, name: str) -> bool:
    return (work / f"{name}.done").is_dir()


def _finish_stage(work: Path, name: str, save: Callable[[Path], None]) -> None:
    tmp = work / f"{name}.saving"
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp)
    tmp.rename(work / f"{name}.done")
    (work / f"{name}.checkpoint.safetensors").unlink(missing_ok=True)


def pretrain(out: Path, eval_out: Path, recipe: Recipe = Recipe(), device: str | None = None,
             command: str = "") -> dict:
    """Run (or resume) every stage; write `out` (components folder) and `eval_out` at the end."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out, eval_out = Path(out), Path(eval_out)
    for target in (out, eval_out):
        if target.exists():
            raise FileExistsError(f"{target} exists; move it away to pretrain again.")
    work = out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    log_file = work / "log.json"
    log = json.loads(log_file.read_text()) if log_file.exists() else {"seconds": {}}
    if log.get("recipe", asdict(recipe)) != asdict(recipe):
        raise ValueError(
            f"{work} holds an unfinished run with another recipe ({log['recipe']}); resume it with the "
            "same --profile and --seed, or delete that folder to start over."
        )
    log.update(recipe=asdict(recipe), device=str(device), command=command, torch=torch.__version__)

    tokenizer = toy_tokenizer()
    started = time.perf_counter()
    pool = ScenePool(recipe.seed * 1_000_000, recipe.pool_size)
    log["seconds"]["render_pool"] = round(time.perf_counter() - started, 1)

    def timed(name: str, run: Callable[[], None]) -> None:
        if _stage_done(work, name):
            return
        t0 = time.perf_counter()
        run()
        log["seconds"][name] = round(time.perf_counter() - t0, 1)  # of the run that finished the stage
        log_file.write_text(json.dumps(log, indent=1))

    def clip_stage():
        model, history = train_clip(pool, tokenizer, recipe, work, device)
        log["clip_loss_last"] = history[-1]
        _finish_stage(work, "clip", lambda d: model.save_pretrained(d))

    def vae_stage():
        vae, history = train_vae(pool, recipe, work, device)
        log["vae_loss_last"] = history[-1]
        _finish_stage(work, "vae", lambda d: vae.save_pretrained(d))

    def unet_stage():
        text_encoder = CLIPTextModel.from_pretrained(work / "clip.done")
        vae = AutoencoderKL.from_pretrained(work / "vae.done").to(device)
        unet, history = train_unet(pool, tokenizer, text_encoder, vae, recipe, work, device)
        log["unet_loss_last"] = history[-1]
        _finish_stage(work, "unet", lambda d: unet.save_pretrained(d))

    def judge_stage():
        judge, history = train_judge(recipe, work, device)
        log["judge_loss_last"] = history[-1]
        _finish_stage(work, "judge", lambda d: judge.save_pretrained(d))

    for name, run in (("clip", clip_stage), ("vae", vae_stage), ("unet", unet_stage), ("judge", judge_stage)):
        timed(name, run)
    log["seconds"]["total"] = round(sum(v for k, v in log["seconds"].items() if k != "total"), 1)
    log_file.write_text(json.dumps(log, indent=1))
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
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = replace(PROFILES[args.profile], seed=args.seed)
    log = pretrain(args.out, args.eval_out, recipe, args.device, command=" ".join(["elite-toy-pretrain", *(argv or sys.argv[1:])]))
    print(json.dumps(log["seconds"]))


if __name__ == "__main__":
    main()
