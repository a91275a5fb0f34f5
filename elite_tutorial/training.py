"""Training ELITE's mapping networks (stage 1: the global mapper; stage 2: the local one) with `accelerate`.

One optimisation step of stage 1 (the authors' `train_global.py`, restated on diffusers' APIs):

    latents   = VAE(image) * scaling            noise, t drawn at random; noisy = add_noise(latents)
    words     = GlobalMapper(CLIP levels of the augmented image)         (batch, 5, text_width)
    context   = text encoder("a photo of a S", all 5 words injected at S)
    loss_mle  = || UNet(noisy, t, context; attn2 k/v = the mapper's copies) - noise ||^2
    loss_reg  = 0.01 * mean |words|
    AdamW on the mapper (MLPs + k/v copies) only; VAE, UNet and both CLIP towers frozen.

Stage 2 (`train_local`, the authors' `train_local.py`) freezes the global mapper and trains a
`LocalMapper` through ELITE's local attention branch; see `local_step_losses`.

Both stages run in the project's one training loop (`train_loop.Loop`, which Textual Inversion and the
toy world's pretraining share). Runs unchanged on one CPU, one GPU, or many GPUs/nodes (`accelerate
launch`), with mixed precision, gradient accumulation and optional gradient checkpointing. Every step's
randomness (which samples, noise, timesteps) is drawn from (seed, step, process), so `--resume latest`
continues to exactly the weights an uninterrupted run reaches, and `data_workers` processes can build
batches ahead of the accelerator without changing them.

Output folder:
    mapper/                 the final mapper (save_pretrained: config.json + model.safetensors, + log.json)
    checkpoints/step-N/     mapper/ + training_state.safetensors (weights, optimizer, step) + log.json; the last K kept
    validation/step-N.png   reference images and what the mapper makes of them, every N steps
    log.json                the recipe and loss_mle / loss_reg per step
"""
from __future__ import annotations

import copy
import json
import math
import re
import shutil
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import extract_model_from_parallel
from diffusers import DDPMScheduler
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image

from .attention import LocalTokens, elite_attention, set_local_tokens
from .components import Components
from .data import LOCAL_BATCH_VIEWS, LocalTrainingSource, TrainingSource, clip_normalise
from .mappers import NUM_LEVELS, GlobalMapper, LocalMapper, clip_feature_levels, mask_local_tokens
from .step_speed import StepSpeed
from .storage import atomic_directory, foreign_entries, refuse_foreign, write_json_atomic
from .train_loop import Loop, load_training_state, save_training_state, with_noise_seed
from .words import encode_prompts_with_words, tokenize_with_placeholder


@dataclass(frozen=True)
class _Recipe:
    """The numbers both stages' training loops read."""

    steps: int
    batch_size: int                 # per process
    gradient_accumulation: int
    learning_rate: float            # per sample: scaled by batch * accumulation * processes, as the authors
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    key_value_lr_scale: float = 1.0 # the k/v copies' learning rate / the mapping MLPs' (0: kept frozen)
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    validate_every: int = 500
    seed: int = 0

    def __post_init__(self):
        # refused here, not after a silently wrong run (no step taken, all checkpoints kept or deleted, NaN weights)
        for name in ("steps", "batch_size", "gradient_accumulation", "checkpoint_every", "keep_checkpoints", "validate_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}.")
        if not (math.isfinite(self.learning_rate) and self.learning_rate >= 0):
            raise ValueError(f"learning_rate must be a finite number at least 0, not {self.learning_rate}.")


@dataclass(frozen=True)
class GlobalRecipe(_Recipe):
    """Every number that decides a trained global mapper (with the code and the data)."""

    num_words: int = 5              # words injected at the placeholder in training (w0..w{n-1})
    reg_weight: float = 0.01        # weight of mean |words|

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.num_words <= NUM_LEVELS:
            raise ValueError(f"num_words must be 1 to {NUM_LEVELS} (the words a global mapper makes), not {self.num_words}.")


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


@dataclass(frozen=True)
class LocalRecipe(_Recipe):
    """Every number that decides a trained local mapper (with the code, the data and the global mapper)."""

    reg_weight: float = 1e-4        # weight of mean |local values|, averaged over the layers
    local_scale: float = 1.0        # λ while training (the authors': 1)
    scale_augmentation: bool = True # the authors' zoom in / far away targets (`data.scale_augment`)


LOCAL_PROFILES = {
    # the authors' recipe: batch 2 x accumulation 4 (x 4 GPUs), lr 1e-5 scaled; the released mapper ran 65k steps
    "sd14": LocalRecipe(steps=65_000, batch_size=2, gradient_accumulation=4, learning_rate=1e-5),
    # no scale augmentation: the toy UNet never saw zoomed or shrunk scenes and has no words for them,
    # so with it the local branch learns to make up for that instead of adding the object's detail
    "toy": LocalRecipe(steps=1000, batch_size=16, gradient_accumulation=1, learning_rate=5e-5,
                       checkpoint_every=250, validate_every=500, scale_augmentation=False),
    "smoke": LocalRecipe(steps=4, batch_size=2, gradient_accumulation=2, learning_rate=1e-4,
                         checkpoint_every=2, keep_checkpoints=2, validate_every=2),
}


@torch.no_grad()
def _noised_latents(components: Components, pixel_values: torch.Tensor, noise_scheduler: DDPMScheduler,
                    generator: torch.Generator | list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VAE latents of the targets (B, 3, H, W) in [-1, 1], noised at random timesteps: (noisy, noise, t).

    `generator`: one, or a list of k for a batch of k merged micro-batches (`train_loop.merge_batches`),
    each drawing its part's latent sample, noise and timesteps as it would alone."""
    c, device = components, components.device
    moments = c.vae.encode(pixel_values.to(device, c.vae.dtype)).latent_dist.parameters
    generators = generator if isinstance(generator, list) else [generator]
    parts = []
    for part, g in zip(moments.chunk(len(generators)), generators, strict=True):
        latents = DiagonalGaussianDistribution(part).sample(g) * c.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=g, device=device, dtype=latents.dtype)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  generator=g, device=device)
        parts.append((latents, noise, timesteps))
    latents, noise, timesteps = (torch.cat(tensors) for tensors in zip(*parts))
    return noise_scheduler.add_noise(latents, noise, timesteps), noise, timesteps


@torch.no_grad()
def _levels(components: Components, pixels01: torch.Tensor) -> list[torch.Tensor]:
    """The 5 CLIP feature levels of images (B, 3, S, S) in [0, 1], in fp32 for the mapper."""
    encoder = components.image_encoder
    return [level.float() for level in clip_feature_levels(encoder, clip_normalise(pixels01.to(encoder.device, encoder.dtype)))]


def training_step_losses(components: Components, mapper: GlobalMapper, batch: dict, recipe: GlobalRecipe,
                         noise_scheduler: DDPMScheduler,
                         generator: torch.Generator | list[torch.Generator]) -> dict[str, torch.Tensor]:
    """The two losses of one (micro-)batch, each a mean over its samples. ELITE's processors must be
    installed on the UNet. `generator`: the batch's noise, or one per merged micro-batch (`_noised_latents`).

    batch: `pixel_values` (B, 3, H, W) in [-1, 1] (the UNet's target image), `clip_pixels`
    (B, 3, S, S) in [0, 1] (the augmented image for CLIP), `prompts` (B strings with `S`).
    """
    c = components
    noisy, noise, timesteps = _noised_latents(c, batch["pixel_values"], noise_scheduler, generator)
    words = mapper(_levels(c, batch["clip_pixels"]))[:, : recipe.num_words]
    context = encode_prompts_with_words(batch["prompts"], words.to(c.text_encoder.dtype), c.tokenizer, c.text_encoder)
    prediction = c.unet(noisy, timesteps, encoder_hidden_states=context).sample
    squared = (prediction.float() - noise.float()).square()
    loss_reg = recipe.reg_weight * words.abs().mean()
    return {"loss_mle": squared.mean(), "loss_reg": loss_reg}


def local_step_losses(components: Components, global_mapper: GlobalMapper, local_mapper: LocalMapper, batch: dict,
                      recipe: LocalRecipe, noise_scheduler: DDPMScheduler,
                      generator: torch.Generator | list[torch.Generator]) -> dict[str, torch.Tensor]:
    """The two stage-2 losses of one (micro-)batch. ELITE's processors, with the local mapper's
    copies, must be installed on the UNet.

    w0 from the frozen global mapper (of the view it was trained on, `GlobalMapper.input_view`: the
    whole image, the object alone or its box) goes in at the placeholder; the local
    tokens of the object alone, masked, go through the local branch at λ = `recipe.local_scale`.
    loss_mle: squared noise error summed over latent channels and averaged over the valid region
    of the scale augmentation (the authors' normalisation); loss_reg: `reg_weight` x mean |local
    values| (the local `to_v` outputs), averaged over the layers.

    batch: `pixel_values` (B, 3, H, W) in [-1, 1], `valid_mask` (B, 1, h, w) at latent size,
    `clip_pixels`, `object_crop_pixels`, `box_crop_pixels` (`data.LOCAL_BATCH_VIEWS`) and
    `object_pixels` (B, 3, S, S) in [0, 1], `object_mask` (B, S, S), `prompts`.
    """
    c = components
    noisy, noise, timesteps = _noised_latents(c, batch["pixel_values"], noise_scheduler, generator)
    with torch.no_grad():
        w0 = global_mapper(_levels(c, batch[LOCAL_BATCH_VIEWS[global_mapper.input_view]]))[:, :1]
        context = encode_prompts_with_words(batch["prompts"], w0.to(c.text_encoder.dtype), c.tokenizer, c.text_encoder)
    tokens = mask_local_tokens(local_mapper(_levels(c, batch["object_pixels"])), batch["object_mask"].to(c.device))
    _, primary = tokenize_with_placeholder(c.tokenizer, batch["prompts"], 1)
    # on the device once, not copied from the host by each attention layer
    rows, primary = torch.arange(len(tokens), device=c.device), primary.to(c.device, non_blocking=True)
    set_local_tokens(c.unet, LocalTokens(tokens, rows, primary, recipe.local_scale))
    prediction = c.unet(noisy, timesteps, encoder_hidden_states=context).sample
    valid = batch["valid_mask"].to(c.device, torch.float32)
    squared = (prediction.float() - noise.float()).square()
    plain = extract_model_from_parallel(local_mapper)  # what `accelerator.unwrap_model` returns: the mapper inside DDP
    values = [plain.key_value(layer)[1](tokens) for layer in plain.attention_layers]
    return {"loss_mle": ((squared * valid).sum((1, 2, 3)) / valid.sum((1, 2, 3))).mean(),
            "loss_reg": recipe.reg_weight * torch.stack([v.abs().mean() for v in values]).mean()}


# --------------------------------------------------------------------------------------------------
# The run folder and its checkpoints.

# Recipe fields of options that were removed (docs/flags.md, "Removed"), with the value that meant the
# behaviour every run now has. A saved recipe (a checkpoint's or a run's log.json) that holds one of
# them at that value reads as today's recipe; at another value it was a v1 research run, which this
# code cannot continue.
REMOVED_FIELDS = {"lr_schedule": "constant", "object_loss_weight": 1.0, "snr_gamma": None, "key_value_anchor": 0.0}
LAST_COMMIT_WITH_REMOVED_OPTIONS = "8d8a8ae5611c585f0e8d7ddeab8f96b3e4458098"


def saved_recipe(saved: dict, recipe: _Recipe, where: str = "the saved recipe") -> dict:
    """A recipe read back from a log (`saved`, a dict) in terms of `recipe`'s fields: a field it lacks
    was added later, with a default that keeps the old behaviour; a removed field (`REMOVED_FIELDS`) is
    dropped when it holds the behaviour every run now has, and refused otherwise. Other keys stay, so
    a comparison with `asdict(recipe)` names them."""
    for name, value in saved.items():
        if name in REMOVED_FIELDS and value != REMOVED_FIELDS[name]:
            raise ValueError(f"{where} sets {name}={value!r}, an option removed from elite-train (docs/flags.md, "
                             f"\"Removed\"); continue that run at commit {LAST_COMMIT_WITH_REMOVED_OPTIONS[:12]}.")
    kept = {k: v for k, v in saved.items() if k not in REMOVED_FIELDS}
    return {**{f.name: f.default for f in fields(recipe)}, **kept}

RUN_ENTRIES = ("checkpoints", "validation", "mapper", "log.json")  # what a run writes into its --out
CHECKPOINT_FILES = ("mapper", "training_state.safetensors", "log.json")


def _run_stage(out: Path) -> str | None:
    """The stage ("global" or "local") of the run in `out`, from its log or newest checkpoint's; None if
    neither says (logs written before the stage was recorded tell it by their recipe's fields)."""
    for log_file in (out / "log.json", *(p / "log.json" for p in reversed(_checkpoint_dirs(out)))):
        try:
            log = json.loads(log_file.read_text())
        except (OSError, ValueError):
            continue
        return log.get("stage") or ("global" if "num_words" in log.get("recipe", {}) else "local")
    return None


def check_run_folder(out: Path, stage: str, resume: bool) -> None:
    """Refuse an --out that is not this stage's run folder, before any work: a file; a folder holding
    anything a run does not write (a user's files, other runs); another stage's run; a run that has
    started, unless resumed; or, when resuming, a folder with no checkpoint."""
    out = Path(out)
    blocking = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise NotADirectoryError(f"--out {out}: {blocking} is a file; give a folder (a new one, or the run's own to --resume).")
    refuse_foreign(out, foreign_entries(out, RUN_ENTRIES), what=f"a {stage} training run")
    other = _run_stage(out)
    if other is not None and other != stage:
        raise FileExistsError(f"--out {out} holds a {other} mapper's run; give stage {stage} a folder of its own.")
    if resume and not _checkpoint_dirs(out):
        raise FileNotFoundError(f"--resume latest: no checkpoint in {out / 'checkpoints'}.")
    if not resume and out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"{out} already holds a {stage} run ({', '.join(foreign_entries(out, ()))}); pass "
                              "--resume latest to continue it, or choose a new folder.")


def _checkpoint_dirs(out: Path) -> list[Path]:
    found = [p for p in (out / "checkpoints").glob("step-*") if re.fullmatch(r"step-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _save_checkpoint(out: Path, step: int, mapper: GlobalMapper | LocalMapper, optimizer, log: dict, keep: int) -> None:
    """checkpoints/step-N/: training_state.safetensors (`train_loop.save_training_state`: the mapper's
    weights, the optimizer's state, the step), mapper/ (to use or score the checkpoint) and log.json."""
    with atomic_directory(out / "checkpoints" / f"step-{step:06d}", own=CHECKPOINT_FILES) as staging:
        mapper.save_pretrained(staging / "mapper")
        save_training_state(staging / "training_state.safetensors", step, mapper, optimizer)
        (staging / "log.json").write_text(json.dumps(log))
    for old in _checkpoint_dirs(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _resume(out: Path, mapper: GlobalMapper | LocalMapper, optimizer, recipe, device) -> tuple[int, list]:
    """Load the newest checkpoint into `mapper` and `optimizer`; return (its step, its loss history)."""
    latest = _checkpoint_dirs(out)[-1]  # `check_run_folder` made sure there is one
    log = json.loads((latest / "log.json").read_text())
    saved = saved_recipe(log["recipe"], recipe, f"{latest / 'log.json'}")
    current = asdict(recipe)
    changed = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
    if changed:
        raise ValueError(f"{latest} was trained with another recipe (differs in {changed}); resume with the same "
                         "options, or start a new output folder.")
    # checkpoints written before the training state held the weights have them in mapper/ alone
    mapper.load_state_dict(type(mapper).from_pretrained(latest / "mapper").state_dict())
    step = load_training_state(latest / "training_state.safetensors", mapper, optimizer, device)
    return step, log["history"][:step]


# --------------------------------------------------------------------------------------------------
# Validation images.

@torch.no_grad()
def _validation_grid(components: Components, mapper: GlobalMapper, source: TrainingSource, path: Path, seed: int,
                     local_mapper: LocalMapper | None = None) -> None:
    """Reference images (top row) and "a photo of a S" generated from each (bottom row), as one PNG."""
    from .pipeline import ELITEPipeline  # noqa: PLC0415 (the pipeline imports diffusers' pipelines, slow)

    # copies: the pipeline casts its mappers to the models' dtype
    pipe = ELITEPipeline(components, copy.deepcopy(mapper), local_mapper and copy.deepcopy(local_mapper))
    pipe.sd_pipeline.set_progress_bar_config(disable=True)
    if local_mapper is None and mapper.input_view == "image":
        references = [(image, None) for image in source.validation_images()]
    else:  # the local branch, and a mapper that reads the object alone, need each object's mask
        references = source.validation_concepts()
    generated = []
    for index, (image, mask) in enumerate(references):
        concept = pipe.encode(image, mask)
        out = pipe("a photo of a S", concept, generator=torch.Generator().manual_seed(seed + index))
        generated.append(np.asarray(out.images[0]))
    side = generated[0].shape[0]
    top = [np.asarray(image.resize((side, side))) for image, _ in references]
    grid = np.concatenate([np.concatenate(top, 1), np.concatenate(generated, 1)], 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)


# --------------------------------------------------------------------------------------------------
# The loop (both stages).

def _train(
    stage: str,
    components: Components,
    next_batch: Callable[[np.random.Generator, int], dict],
    out: Path,
    recipe: _Recipe,
    mapper: GlobalMapper | LocalMapper,
    step_losses: Callable[[torch.nn.Module, dict, torch.Generator], dict[str, torch.Tensor]],
    attention: Callable[[torch.nn.Module], AbstractContextManager],
    validate: Callable[[torch.nn.Module, Path], None],
    resume: bool,
    mixed_precision: str,
    stop_after: int | None,
    command: str | None,
    data_workers: int = 0,
    speed: StepSpeed = StepSpeed(),
):
    """AdamW on `mapper`'s trainable parameters in the shared loop (`train_loop.Loop`, on `accelerate`),
    with the run folder's checkpoints, validation images and log.

    `step_losses(mapper as prepared, batch, generator)` returns the named losses of one micro-batch;
    `attention(mapper)` installs ELITE's processors for the whole run; `validate(mapper, png path)`.
    `next_batch(rng, batch_size)` builds a micro-batch; micro-batch m of step k draws from the seed
    (recipe seed, k, process, m). `data_workers` processes build batches ahead (0: in the training
    process, between steps). `speed`: how the steps are computed (`step_speed.StepSpeed`), never what.
    """
    state = PartialState()
    merge = speed.merged(recipe.batch_size, recipe.gradient_accumulation)  # refused before any work
    speed.check_device(state.device)
    check_run_folder(out, stage, resume)
    scale = recipe.batch_size * recipe.gradient_accumulation * state.num_processes
    optimizer = speed.adamw(_parameter_groups(mapper, recipe.learning_rate * scale, recipe.key_value_lr_scale),
                            recipe.weight_decay)
    start, history = 0, []
    if resume:
        start, history = _resume(out, mapper, optimizer, recipe, state.device)
    # the speed options are logged, not part of the recipe: a run may resume with others
    log = {"stage": stage, "command": command, "recipe": asdict(recipe), "speed": asdict(speed)}
    end = recipe.steps if stop_after is None else min(stop_after, recipe.steps)

    def after_step(done: int, history: list) -> None:
        if loop.accelerator.is_main_process:
            if done % recipe.checkpoint_every == 0 or done == end:
                _save_checkpoint(out, done, loop.unwrap(), optimizer, {**log, "history": history}, recipe.keep_checkpoints)
            if done % recipe.validate_every == 0 or done == recipe.steps:
                validate(loop.unwrap(), out / "validation" / f"step-{done:06d}.png")

    loop = Loop(
        mapper, optimizer, step_losses,
        make_batch=with_noise_seed(lambda rng: next_batch(rng, recipe.batch_size)),
        key=lambda step, micro: (recipe.seed, step, state.process_index, micro),
        steps=recipe.steps, device=state.device, start=start, end=end, accumulation=recipe.gradient_accumulation,
        merge=merge,
        max_grad_norm=recipe.max_grad_norm, mixed_precision=mixed_precision, history=history,
        record=lambda losses: {k: float(f"{v:.6g}") for k, v in losses.items()},  # 6 significant digits: the reg losses are small
        after_step=after_step, needs_history=lambda done: done % recipe.checkpoint_every == 0,
        workers=data_workers, description=f"train {stage} mapper")
    started = time.perf_counter()
    with speed.applied(components), attention(mapper):
        log["history"] = loop.run()
    log["seconds"] = round(time.perf_counter() - started, 1)
    if loop.accelerator.is_main_process and end == recipe.steps:
        mapper.save_pretrained(out / "mapper", log=log)  # the mapper folder documents itself
        write_json_atomic(out / "log.json", log)
    loop.accelerator.wait_for_everyone()
    return mapper


def _parameter_groups(mapper: GlobalMapper | LocalMapper, learning_rate: float, key_value_lr_scale: float) -> list[dict]:
    """AdamW groups: the mapping MLPs at `learning_rate`, the k/v copies at `key_value_lr_scale` times
    it. A scale of 0 freezes the copies (they stay the UNet's own) and leaves them out of the optimizer."""
    if key_value_lr_scale == 0:
        for name in (f"to_k_{mapper.branch}", f"to_v_{mapper.branch}"):
            getattr(mapper, name).requires_grad_(False)
    mappings, copies = [], []
    for name, parameter in mapper.named_parameters():
        if parameter.requires_grad:
            (copies if name.startswith(("to_k_", "to_v_")) else mappings).append(parameter)
    groups = [{"params": mappings, "lr": learning_rate}]
    if copies:
        groups.append({"params": copies, "lr": learning_rate * key_value_lr_scale})
    return groups


def _fresh_mapper(mapper_class, components: Components, seed: int, **options):
    """A new mapper for `components` whose initial weights follow `seed`, in fp32, trainable."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return mapper_class.from_components(components, **options).float().train().requires_grad_(True)


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
    data_workers: int = 0,
    initial_mapper: GlobalMapper | None = None,
    speed: StepSpeed = StepSpeed(),
) -> GlobalMapper:
    """Train a global mapper on `components` (frozen) with samples from `source`; see the module docstring.

    `stop_after` ends the run after that many steps (a checkpoint is written), as a crash would.
    `command` (the command line, if any) is recorded in the log. `data_workers` processes build the
    batches ahead (worth it beside a GPU; the batches are the same either way). `initial_mapper`:
    start from its weights (k/v copies included) instead of fresh ones, e.g. to fine-tune the
    authors' checkpoint; it must read the source's view. `speed`: the step's speed options
    (`step_speed.StepSpeed`; they change how fast a step runs, not what it computes).
    """
    components = components.to(PartialState().device)
    if gradient_checkpointing:  # the UNet's activations dominate the memory of a step
        components.unet.enable_gradient_checkpointing()
    if initial_mapper is None:
        # the mapper keeps the view of the image it was trained on, so the pipeline shows it the same
        mapper = _fresh_mapper(GlobalMapper, components, recipe.seed, input_view=source.global_view)
    else:
        initial_mapper.check_compatible(components)
        if initial_mapper.input_view != source.global_view:
            raise ValueError(f"The initial mapper reads the {initial_mapper.input_view!r} view and the training data "
                             f"shows the {source.global_view!r} view; choose the matching --toy-global-view.")
        mapper = copy.deepcopy(initial_mapper).to(components.device).float().train().requires_grad_(True)
    for level in range(recipe.num_words, mapper.num_levels):  # words never injected are not trained
        mapper.mapping[level].requires_grad_(False)
        mapper.mapping_patch[level].requires_grad_(False)
    noise_scheduler = DDPMScheduler.from_config(components.scheduler.config)
    return _train(
        "global", components, source.batch, Path(out), recipe, mapper,
        step_losses=lambda m, batch, generator: training_step_losses(components, m, batch, recipe, noise_scheduler, generator),
        attention=lambda m: elite_attention(components.unet, m),
        validate=lambda m, path: _validation_grid(components, m, source, path, recipe.seed),
        resume=resume, mixed_precision=mixed_precision, stop_after=stop_after, command=command,
        data_workers=data_workers, speed=speed)


def train_local(
    components: Components,
    global_mapper: GlobalMapper,
    source: LocalTrainingSource,
    out: str | Path,
    recipe: LocalRecipe,
    resume: bool = False,
    mixed_precision: str = "no",
    gradient_checkpointing: bool = False,
    stop_after: int | None = None,
    command: str | None = None,
    data_workers: int = 0,
    speed: StepSpeed = StepSpeed(),
) -> LocalMapper:
    """Stage 2: train a local mapper (its MLPs and local k/v copies) with `global_mapper` and its k/v
    copies frozen; see `local_step_losses`. Same options, checkpoints and output as `train_global`."""
    components = components.to(PartialState().device)
    if gradient_checkpointing:
        components.unet.enable_gradient_checkpointing()
    global_mapper.check_compatible(components)
    global_mapper = global_mapper.to(components.device).float().eval().requires_grad_(False)
    mapper = _fresh_mapper(LocalMapper, components, recipe.seed)
    noise_scheduler = DDPMScheduler.from_config(components.scheduler.config)
    return _train(
        "local", components, lambda rng, size: source.local_batch(rng, size, recipe.scale_augmentation), Path(out),
        recipe, mapper,
        step_losses=lambda m, batch, generator: local_step_losses(components, global_mapper, m, batch, recipe,
                                                                 noise_scheduler, generator),
        attention=lambda m: elite_attention(components.unet, global_mapper, local_mapper=m),
        validate=lambda m, path: _validation_grid(components, global_mapper, source, path, recipe.seed, local_mapper=m),
        resume=resume, mixed_precision=mixed_precision, stop_after=stop_after, command=command,
        data_workers=data_workers, speed=speed)


def recipe_with(profile: str, stage: str = "global", **overrides) -> GlobalRecipe | LocalRecipe:
    """A `stage` ("global" or "local") profile with some fields replaced (None values are ignored)."""
    profiles = PROFILES if stage == "global" else LOCAL_PROFILES
    if profile not in profiles:
        raise ValueError(f"Unknown {stage} profile {profile!r}; choose one of {', '.join(profiles)}.")
    return replace(profiles[profile], **{k: v for k, v in overrides.items() if v is not None})
