"""Full-size (sd14-architecture, random weights) ELITE stage-1 training step: ours vs the authors' step.

Both sides run the same step on the same inputs: CLIP ViT-L/14 levels -> GlobalMapper -> words
injected into the CLIP-L text encoder -> sd14 UNet whose cross-attention reads the mapper's k/v
copies -> noise MSE + 0.01 mean |words| -> backward -> AdamW. (The frozen VAE encode is the same on
both sides and left out: the step starts from latents.) They differ where the implementations do:

- authors: fp32, eager attention everywhere (matmul, softmax, matmul: their `inj_forward_crossattention`
  and the attention of the diffusers version they pinned);
- ours: diffusers' fused `scaled_dot_product_attention` for self-attention and ELITE's processor for
  cross-attention; on a GPU, bf16 autocast with fp32 mapper weights.

    python benchmarks/global_training_step.py                       # CPU: 256 px, batch 1
    python benchmarks/global_training_step.py --device cuda         # GPU: 512 px, batch 4

Prints seconds per step for both (median of interleaved repeats), their ratio (ours / authors),
samples per second, and on a GPU the peak memory of each.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from elite_tutorial.attention import elite_attention
from elite_tutorial.components import sd14_architecture
from elite_tutorial.mappers import GlobalMapper, clip_feature_levels
from elite_tutorial.toyworld.models import TINY_WORDS
from elite_tutorial.toyworld.tokenizer import build_clip_tokenizer
from elite_tutorial.words import encode_prompts_with_words


class AuthorsEagerAttention:
    """Explicit attention as in the authors' code; cross-attention keys/values from the copies."""

    def __init__(self, to_k=None, to_v=None):
        self.to_k, self.to_v = to_k, to_v

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        cross = encoder_hidden_states is not None
        context = encoder_hidden_states if cross else hidden_states
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim((self.to_k if cross else attn.to_k)(context))
        value = attn.head_to_batch_dim((self.to_v if cross else attn.to_v)(context))
        probs = (torch.matmul(query, key.transpose(-1, -2)) * attn.scale).softmax(dim=-1)
        out = attn.batch_to_head_dim(torch.matmul(probs, value))
        return attn.to_out[1](attn.to_out[0](out))


def authors_processors(unet, mapper):
    return {name: AuthorsEagerAttention(*mapper.key_value(name)) if "attn2" in name else AuthorsEagerAttention()
            for name in unet.attn_processors}


class Side:
    """One implementation: its processors, precision and optimizer over its own mapper."""

    def __init__(self, name, models, tokenizer, autocast_dtype, eager: bool):
        self.name, self.models, self.tokenizer, self.autocast_dtype, self.eager = name, models, tokenizer, autocast_dtype, eager
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.mapper = GlobalMapper.from_components(models).train().requires_grad_(True)
        self.optimizer = torch.optim.AdamW(self.mapper.parameters(), lr=1e-5, weight_decay=1e-2)

    def step(self, latents, clip_pixels, prompts, noise, timesteps, alphas):
        device = latents.device
        with torch.autocast(device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            with torch.no_grad():
                levels = clip_feature_levels(self.models.image_encoder, clip_pixels)
            words = self.mapper([level.float() for level in levels])
            context = encode_prompts_with_words(prompts, words, self.tokenizer, self.models.text_encoder)
            a = alphas[timesteps].view(-1, 1, 1, 1)
            noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
            prediction = self.models.unet(noisy, timesteps, encoder_hidden_states=context).sample
            loss = F.mse_loss(prediction.float(), noise) + 0.01 * words.abs().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.mapper.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def timed_step(self, *inputs) -> float:
        unet = self.models.unet
        previous = unet.attn_processors
        if self.eager:
            unet.set_attn_processor(authors_processors(unet, self.mapper))
            context = nullcontext()
        else:
            context = elite_attention(unet, self.mapper)
        sync(inputs[0].device)
        start = time.perf_counter()
        with context:
            self.step(*inputs)
        sync(inputs[0].device)
        elapsed = time.perf_counter() - start
        unet.set_attn_processor(previous)
        return elapsed


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    resolution = args.resolution or (512 if gpu else 256)
    batch = args.batch or (4 if gpu else 1)

    models = sd14_architecture(device=device)
    tokenizer = build_clip_tokenizer(TINY_WORDS)  # the text encoder's ids only need to be < 49408
    generator = torch.Generator(device).manual_seed(0)
    latents = torch.randn(batch, 4, resolution // 8, resolution // 8, generator=generator, device=device)
    clip_pixels = torch.randn(batch, 3, 224, 224, generator=generator, device=device)
    noise = torch.randn(latents.shape, generator=generator, device=device)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator, device=device)
    alphas = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, device=device) ** 2, 0)
    prompts = ["a photo of a S"] * batch
    inputs = (latents, clip_pixels, prompts, noise, timesteps, alphas)

    sides = [Side("authors (fp32, eager attention)", models, tokenizer, None, eager=True),
             Side("ours (" + ("bf16 autocast" if gpu else "fp32") + ", fused attention)", models, tokenizer,
                  torch.bfloat16 if gpu else None, eager=False)]
    times = {side.name: [] for side in sides}
    peaks = {}
    for side in sides:  # warm-up (and peak memory, measured alone)
        if gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        side.timed_step(*inputs)
        if gpu:
            peaks[side.name] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    for _ in range(args.repeats):  # interleaved, so both see the same machine
        for side in sides:
            times[side.name].append(side.timed_step(*inputs))
    seconds = {name: statistics.median(t) for name, t in times.items()}
    authors, ours = (seconds[s.name] for s in sides)
    report = {
        "device": torch.cuda.get_device_name() if gpu else f"cpu ({torch.get_num_threads()} threads)",
        "resolution": resolution, "batch": batch, "repeats": args.repeats,
        "seconds_per_step": {k: round(v, 3) for k, v in seconds.items()},
        "samples_per_second": {k: round(batch / v, 2) for k, v in seconds.items()},
        "ratio_ours_over_authors": round(ours / authors, 3),
    }
    if gpu:
        report["peak_memory_gib"] = peaks
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
