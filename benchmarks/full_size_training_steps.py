"""What one training step of each ELITE stage costs at full size (sd14 architecture, random weights).

Runs the package's own step code (`training.training_step_losses` for stage 1,
`training.local_step_losses` for stage 2: VAE encode, CLIP levels, mappers, words injected into the
text encoder, the UNet through ELITE's processors, loss, backward, AdamW) at the authors' per-GPU
micro-batch (stage 1: 4, stage 2: 2), with and without UNet gradient checkpointing.

    python benchmarks/full_size_training_steps.py                   # CPU: 256 px, batch 1, fp32
    python benchmarks/full_size_training_steps.py --device cuda     # GPU: 512 px, bf16 as `--mixed-precision bf16`

Prints seconds per micro-step (median of repeats after a warm-up), samples per second, on a GPU the
peak memory, and what the authors' recipes would take at that speed on 4 such GPUs (stage 1: 70k
steps of 4 micro-batches; stage 2: 65k steps of 4).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext

import torch
from diffusers import AutoencoderKL, DDPMScheduler, PNDMScheduler

from elite_tutorial.attention import elite_attention
from elite_tutorial.components import SD14_SCHEDULER_CONFIG, Components, sd14_architecture
from elite_tutorial.mappers import GlobalMapper, LocalMapper
from elite_tutorial.toyworld.models import TINY_WORDS
from elite_tutorial.toyworld.tokenizer import build_clip_tokenizer
from elite_tutorial.training import LOCAL_PROFILES, PROFILES, local_step_losses, training_step_losses

SD14_VAE_CONFIG = dict(
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2, sample_size=512,
)


def full_size_components(device, dtype) -> Components:
    """sd14-shaped components with random weights (the tokenizer's ids only need to be < 49408)."""
    models = sd14_architecture(device=device, dtype=dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        vae = AutoencoderKL(**SD14_VAE_CONFIG).to(device=device, dtype=dtype).requires_grad_(False).eval()
    return Components(build_clip_tokenizer(TINY_WORDS), models.text_encoder, models.image_encoder, vae, models.unet,
                      PNDMScheduler(**SD14_SCHEDULER_CONFIG))


def batches(batch: int, resolution: int, device) -> dict[str, dict]:
    """Random inputs of each stage's shapes."""
    g = torch.Generator().manual_seed(0)
    clip = lambda: torch.rand(batch, 3, 224, 224, generator=g)  # noqa: E731
    pixels = torch.rand(batch, 3, resolution, resolution, generator=g) * 2 - 1
    mask = torch.zeros(batch, 224, 224)
    mask[:, 56:168, 56:168] = 1
    prompts = ["a photo of a S"] * batch
    stage1 = {"pixel_values": pixels, "clip_pixels": clip(), "prompts": prompts}
    stage2 = {"pixel_values": pixels, "valid_mask": torch.ones(batch, 1, resolution // 8, resolution // 8),
              "clip_pixels": clip(), "object_pixels": clip(), "object_mask": mask, "prompts": prompts}
    move = lambda b: {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}  # noqa: E731
    return {"global": move(stage1), "local": move(stage2)}


def timed_steps(components, stage: str, batch: dict, autocast_dtype, checkpointing: bool, repeats: int) -> dict:
    """Median seconds of one micro-step (forward, backward, AdamW) and, on a GPU, the peak memory."""
    c, device = components, components.device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        global_mapper = GlobalMapper.from_components(c).float()
        local_mapper = LocalMapper.from_components(c).float()
    trained = global_mapper if stage == "global" else local_mapper
    trained.train().requires_grad_(True)
    if stage == "local":
        global_mapper.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-6, weight_decay=1e-2)
    scheduler = DDPMScheduler.from_config(c.scheduler.config)
    (c.unet.enable_gradient_checkpointing if checkpointing else c.unet.disable_gradient_checkpointing)()
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    attention = (elite_attention(c.unet, global_mapper) if stage == "global"
                 else elite_attention(c.unet, global_mapper, local_mapper=local_mapper))

    def step():
        generator = torch.Generator(device).manual_seed(0)
        with autocast:
            if stage == "global":
                losses = training_step_losses(c, global_mapper, batch, PROFILES["sd14"], scheduler, generator)
            else:
                losses = local_step_losses(c, global_mapper, local_mapper, batch, LOCAL_PROFILES["sd14"], scheduler, generator)
        sum(losses.values()).backward()
        torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    gpu = device.type == "cuda"
    with attention:
        if gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        step()  # warm-up
        times = []
        for _ in range(repeats):
            if gpu:
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    c.unet.disable_gradient_checkpointing()
    result = {"seconds_per_step": round(statistics.median(times), 3)}
    if gpu:
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--batch", type=int, help="one micro-batch size for both stages (default: the authors')")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    resolution = args.resolution or (512 if gpu else 256)
    autocast_dtype = torch.bfloat16 if gpu else None
    components = full_size_components(device, torch.bfloat16 if gpu else torch.float32)
    report = {"device": torch.cuda.get_device_name() if gpu else f"cpu ({torch.get_num_threads()} threads)",
              "resolution": resolution, "precision": "bf16 autocast, frozen models in bf16" if gpu else "fp32",
              "repeats": args.repeats}
    recipes = {"global": PROFILES["sd14"], "local": LOCAL_PROFILES["sd14"]}
    for stage, recipe in recipes.items():
        batch = args.batch or (1 if not gpu else recipe.batch_size)
        inputs = batches(batch, resolution, device)[stage]
        for checkpointing in (False, True):
            result = timed_steps(components, stage, inputs, autocast_dtype, checkpointing, args.repeats)
            result["batch"] = batch
            result["samples_per_second"] = round(batch / result["seconds_per_step"], 2)
            # the authors' run: `steps` optimizer steps of `gradient_accumulation` micro-steps on each of 4 GPUs
            result["authors_recipe_hours_on_4"] = round(
                recipe.steps * recipe.gradient_accumulation * result["seconds_per_step"] / 3600, 1)
            report[f"{stage}{' + gradient checkpointing' if checkpointing else ''}"] = result
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
