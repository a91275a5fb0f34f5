"""Training ELITE's mapping networks (stage 1: the global mapper) with `accelerate`.

One optimisation step of stage 1 (the authors' `train_global.py`, restated on diffusers' APIs):

    latents   = VAE(image) * scaling            noise, t drawn at random; noisy = add_noise(latents)
    words     = GlobalMapper(CLIP levels of the augmented image)         (batch, 5, text_width)
    context   = text encoder("a photo of a S", all 5 words injected at S)
    loss_mle  = || UNet(noisy, t, context; attn2 k/v = the mapper's copies) - noise ||^2
    loss_reg  = 0.01 * mean |words|
    AdamW on the mapper (MLPs + k/v copies) only; VAE, UNet and both CLIP towers frozen.

Runs unchanged on one CPU, one GPU, or many GPUs/nodes (`accelerate launch`), with mixed precision,
gradient accumulation and optional gradient checkpointing. Every step's randomness (which samples,
noise, timesteps) is drawn from (seed, step, process), so `--resume latest` continues to exactly the
weights an uninterrupted run reaches.

Output folder:
    mapper/                 the final GlobalMapper (save_pretrained: config.json + model.safetensors, + log.json)
    checkpoints/step-N/     mapper/ + training_state.safetensors (optimizer, step); the last K kept
    validation/step-N.png   reference images and what the mapper makes of them, every N steps
    log.json                the recipe and loss_mle / loss_reg per step
"""
from __future__ import annotations

import copy
import json
import re
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .attention import elite_attention
from .components import Components
from .data import TrainingSource, clip_normalise
from .mappers import GlobalMapper, clip_feature_levels
from .storage import atomic_directory, load_optimizer_tensors, optimizer_tensors, save_safetensors_atomic
from .words import encode_prompts_with_words


@dataclass(frozen=True)
class GlobalRecipe:
    """Every number that decides a trained global mapper (with the code and the data)."""

    steps: int
    batch_size: int                 # per process
    gradient_accumulation: int
    learning_rate: float            # per sample: scaled by batch * accumulation * processes, as the authors
    num_words: int = 5              # words injected at the placeholder in training (w0..w{n-1})
    reg_weight: float = 0.01        # weight of mean |words|
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    validate_every: int = 500
    seed: int = 0


PROFILES = {
    # the authors' recipe: batch 4 x accumulation 4 (x 4 GPUs), lr 1e-6 scaled, 70k steps, saves every 500
    "sd14": GlobalRecipe(steps=70_000, batch_size=4, gradient_accumulation=4, learning_rate=1e-6),
    # the shipped toy mapper: minutes on a laptop CPU
    "toy": GlobalRecipe(steps=1500, batch_size=16, gradient_accumulation=1, learning_rate=5e-5,
                        checkpoint_every=250, validate_every=500),
    # a few steps, for tests and for trying the command
    "smoke": GlobalRecipe(steps=4, batch_size=2, gradient_accumulation=2, learning_rate=1e-4,
                          checkpoint_every=2, keep_checkpoints=2, validate_every=2),
}


def training_step_losses(components: Components, mapper: GlobalMapper, batch: dict, recipe: GlobalRecipe,
                         noise_scheduler: DDPMScheduler, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The two losses of one (micro-)batch. ELITE's processors must be installed on the UNet.

    batch: `pixel_values` (B, 3, H, W) in [-1, 1] (the UNet's target image), `clip_pixels`
    (B, 3, S, S) in [0, 1] (the augmented image for CLIP), `prompts` (B strings with `S`).
    """
    c, device = components, components.device
    with torch.no_grad():
        pixels = batch["pixel_values"].to(device, c.vae.dtype)
        latents = c.vae.encode(pixels).latent_dist.sample(generator) * c.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  generator=generator, device=device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        levels = clip_feature_levels(c.image_encoder, clip_normalise(batch["clip_pixels"].to(device, c.image_encoder.dtype)))
    words = mapper([level.float() for level in levels])[:, : recipe.num_words]
    context = encode_prompts_with_words(batch["prompts"], words.to(c.text_encoder.dtype), c.tokenizer, c.text_encoder)
    prediction = c.unet(noisy, timesteps, encoder_hidden_states=context).sample
    return {"loss_mle": F.mse_loss(prediction.float(), noise.float()),
            "loss_reg": recipe.reg_weight * words.abs().mean()}


# --------------------------------------------------------------------------------------------------
# Checkpoints.

def _checkpoint_dirs(out: Path) -> list[Path]:
    found = [p for p in (out / "checkpoints").glob("step-*") if re.fullmatch(r"step-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _save_checkpoint(out: Path, step: int, mapper: GlobalMapper, optimizer, log: dict, keep: int) -> None:
    with atomic_directory(out / "checkpoints" / f"step-{step:06d}") as staging:
        mapper.save_pretrained(staging / "mapper")
        save_safetensors_atomic(optimizer_tensors(optimizer), staging / "training_state.safetensors", {"step": str(step)})
        (staging / "log.json").write_text(json.dumps(log))
    for old in _checkpoint_dirs(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _resume(out: Path, mapper: GlobalMapper, optimizer, recipe: GlobalRecipe, device) -> tuple[int, list]:
    """Load the newest checkpoint into `mapper` and `optimizer`; return (its step, its loss history)."""
    checkpoints = _checkpoint_dirs(out)
    if not checkpoints:
        raise FileNotFoundError(f"--resume latest: no checkpoint in {out / 'checkpoints'}.")
    latest = checkpoints[-1]
    log = json.loads((latest / "log.json").read_text())
    if log["recipe"] != asdict(recipe):
        changed = sorted(k for k in log["recipe"] if log["recipe"][k] != asdict(recipe).get(k))
        raise ValueError(f"{latest} was trained with another recipe (differs in {changed}); resume with the same "
                         "options, or start a new output folder.")
    state = GlobalMapper.from_pretrained(latest / "mapper").state_dict()
    mapper.load_state_dict(state)
    path = latest / "training_state.safetensors"
    load_optimizer_tensors(optimizer, load_file(str(path), device=str(device)))
    with safe_open(str(path), "pt") as f:
        step = int(f.metadata()["step"])
    return step, log["history"][:step]


# --------------------------------------------------------------------------------------------------
# Validation images.

@torch.no_grad()
def _validation_grid(components: Components, mapper: GlobalMapper, source: TrainingSource, path: Path, seed: int) -> None:
    """Reference images (top row) and "a photo of a S" generated from each (bottom row), as one PNG."""
    from .pipeline import ELITEPipeline  # noqa: PLC0415 (the pipeline imports diffusers' pipelines, slow)

    pipe = ELITEPipeline(components, copy.deepcopy(mapper))  # the pipeline casts its mapper to the models' dtype
    pipe.sd_pipeline.set_progress_bar_config(disable=True)
    references = source.validation_images()
    generated = []
    for index, image in enumerate(references):
        concept = pipe.encode(image)
        out = pipe("a photo of a S", concept, generator=torch.Generator().manual_seed(seed + index))
        generated.append(np.asarray(out.images[0]))
    side = generated[0].shape[0]
    top = [np.asarray(image.resize((side, side))) for image in references]
    grid = np.concatenate([np.concatenate(top, 1), np.concatenate(generated, 1)], 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)


# --------------------------------------------------------------------------------------------------
# The loop.

def train_global(
    components: Components,
    source: TrainingSource,
    out: str | Path,
    recipe: GlobalRecipe,
    resume: bool = False,
    mixed_precision: str = "no",
    gradient_checkpointing: bool = False,
    stop_after: int | None = None,
    command: str | None = None,
) -> GlobalMapper:
    """Train a global mapper on `components` (frozen) with samples from `source`; see the module docstring.

    `stop_after` ends the run after that many steps (a checkpoint is written), as a crash would.
    `command` (the command line, if any) is recorded in the log.
    """
    out = Path(out)
    accelerator = Accelerator(gradient_accumulation_steps=recipe.gradient_accumulation, mixed_precision=mixed_precision)
    components = components.to(accelerator.device)
    if gradient_checkpointing:  # the UNet's activations dominate the memory of a step
        components.unet.enable_gradient_checkpointing()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        mapper = GlobalMapper.from_components(components).float().train()
    mapper.requires_grad_(True)
    for level in range(recipe.num_words, mapper.num_levels):  # words never injected are not trained
        mapper.mapping[level].requires_grad_(False)
        mapper.mapping_patch[level].requires_grad_(False)
    scale = recipe.batch_size * recipe.gradient_accumulation * accelerator.num_processes
    trainable = [p for p in mapper.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=recipe.learning_rate * scale, weight_decay=recipe.weight_decay)
    start, history = 0, []
    if resume:
        start, history = _resume(out, mapper, optimizer, recipe, accelerator.device)
    elif _checkpoint_dirs(out):
        raise FileExistsError(f"{out} already holds checkpoints; pass --resume latest or choose a new folder.")
    mapper, optimizer = accelerator.prepare(mapper, optimizer)
    plain_mapper = accelerator.unwrap_model(mapper)
    noise_scheduler = DDPMScheduler.from_config(components.scheduler.config)
    log = {"command": command, "recipe": asdict(recipe), "history": history}

    bar = tqdm(range(start, recipe.steps), initial=start, total=recipe.steps, desc="train global mapper",
               disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    started = time.perf_counter()
    with elite_attention(components.unet, plain_mapper):
        for step in bar:
            sums = {"loss_mle": 0.0, "loss_reg": 0.0}
            for micro in range(recipe.gradient_accumulation):
                rng = np.random.default_rng([recipe.seed, step, accelerator.process_index, micro])
                generator = torch.Generator(accelerator.device).manual_seed(int(rng.integers(2**62)))
                batch = source.batch(rng, recipe.batch_size)
                with accelerator.accumulate(mapper), accelerator.autocast():
                    losses = training_step_losses(components, mapper, batch, recipe, noise_scheduler, generator)
                    accelerator.backward(sum(losses.values()))
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(trainable, recipe.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                for k, v in losses.items():
                    sums[k] += float(v.detach()) / recipe.gradient_accumulation
            history.append({k: round(v, 6) for k, v in sums.items()})
            bar.set_postfix({k: f"{v:.4f}" for k, v in sums.items()})
            done = step + 1
            if accelerator.is_main_process:
                if done % recipe.checkpoint_every == 0 or done == recipe.steps or done == stop_after:
                    _save_checkpoint(out, done, plain_mapper, optimizer, log, recipe.keep_checkpoints)
                if done % recipe.validate_every == 0 or done == recipe.steps:
                    _validation_grid(components, plain_mapper, source, out / "validation" / f"step-{done:06d}.png", recipe.seed)
            if done == stop_after:
                break
    bar.close()
    log["seconds"] = round(time.perf_counter() - started, 1)
    plain_mapper.eval()
    if accelerator.is_main_process and (stop_after is None or stop_after >= recipe.steps):
        plain_mapper.save_pretrained(out / "mapper")
        for path in (out / "log.json", out / "mapper" / "log.json"):  # the mapper folder documents itself
            path.write_text(json.dumps(log))
    accelerator.wait_for_everyone()
    return plain_mapper


def recipe_with(profile: str, **overrides) -> GlobalRecipe:
    """A profile with some fields replaced (None values are ignored)."""
    if profile not in PROFILES:
        raise ValueError(f"Unknown profile {profile!r}; choose one of {', '.join(PROFILES)}.")
    return replace(PROFILES[profile], **{k: v for k, v in overrides.items() if v is not None})
