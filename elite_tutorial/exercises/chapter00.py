"""Chapter 00's exercises: a cross-attention layer, and the three lines of diffusion sampling a UNet
call is wrapped in.

Each check calls the student's function on inputs of its own (fixed seed) and compares it with what
diffusers computes; see `feedback` for what a failure says."""
from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from ..components import ASSETS_DIR
from .feedback import attempt, expect_close, passed
from .inputs import toy_components


def _scheduler_config() -> dict:
    """The toy model's noise schedule (the scaled-linear betas of Stable Diffusion, 1,000 steps)."""
    return DDPMScheduler.load_config(ASSETS_DIR / "toy-sd" / "scheduler")


def _noises(batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=generator), torch.randn(batch, 4, 8, 8, generator=generator)


def guided_noise(student) -> None:
    """`guided_noise(noise_uncond, noise_text, guidance_scale)` -> classifier-free guidance's noise."""
    name = "guided_noise"
    noise_uncond, noise_text = _noises()
    for scale in (7.5, 1.0, 0.0):
        expected = noise_uncond + scale * (noise_text - noise_uncond)  # diffusers' StableDiffusionPipeline
        got = attempt(name, student, noise_uncond.clone(), noise_text.clone(), scale)
        expect_close(name, got, expected, what=f"the result at guidance_scale={scale}",
                     hint="start from the unconditional prediction and move `guidance_scale` times the way the "
                          "prompt pushes it: uncond + scale · (text − uncond). At scale 1 you get the text prediction.")
    passed(name, "Scale 1 gives the prompt's prediction, 0 the empty prompt's; 7.5 goes 7.5 times as far")


def noised_latents(student) -> None:
    """`noised_latents(latents, noise, alpha_bar)` -> the forward process, as training noises a latent;
    latents, noise (B, 4, h, w), alpha_bar (B,) the cumulative product ᾱ_t of each sample's timestep."""
    name = "noised_latents"
    scheduler = DDPMScheduler.from_config(_scheduler_config())
    latents, noise = _noises(batch=3, seed=1)
    timesteps = torch.tensor([10, 500, 990])
    expected = scheduler.add_noise(latents, noise, timesteps)
    got = attempt(name, student, latents.clone(), noise.clone(), scheduler.alphas_cumprod[timesteps].clone())
    expect_close(name, got, expected,
                 hint="x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε, with square roots; alpha_bar has one value per sample, "
                      "so view it as (B, 1, 1, 1) to multiply a (B, 4, h, w) latent.")
    passed(name, "At t = 10 the latent is almost clean, at t = 990 almost pure noise")


def ddim_step(student) -> None:
    """`ddim_step(noise_pred, latents, alpha_bar, alpha_bar_prev)` -> DDIM's deterministic step (η = 0):
    the clean latent the noise implies, noised again to the previous timestep's level."""
    name = "ddim_step"
    scheduler = DDIMScheduler.from_config(_scheduler_config(), clip_sample=False)  # as Stable Diffusion's DDIM
    scheduler.set_timesteps(25)
    noise, latents = _noises(seed=2)
    for index in (0, 12):  # a step near pure noise and one mid-way
        t, previous = scheduler.timesteps[index], scheduler.timesteps[index + 1]
        expected = scheduler.step(noise, t, latents, eta=0.0).prev_sample
        got = attempt(name, student, noise.clone(), latents.clone(), float(scheduler.alphas_cumprod[t]),
                      float(scheduler.alphas_cumprod[previous]))
        expect_close(name, got, expected, what=f"the step from t={int(t)} to t={int(previous)}",
                     hint="first x̂_0 = (x_t − √(1 − ᾱ_t) · ε) / √ᾱ_t, then x_prev = √ᾱ_prev · x̂_0 + √(1 − ᾱ_prev) · ε.")
    passed(name, "The scheduler's step is these two lines")


def cross_attention(student) -> None:
    """`cross_attention(attn, hidden_states, context)` -> what a UNet's `attn2` layer returns: queries
    from the latent pixels (B, pixels, channels), keys and values from the prompt (B, tokens, width),
    split into `attn.heads` heads, softmax(q kᵀ / √d) v, heads joined, then `attn.to_out`."""
    name = "cross_attention"
    unet = toy_components().unet
    generator = torch.Generator().manual_seed(3)
    for layer in ("down_blocks.0.attentions.0.transformer_blocks.0.attn2", "mid_block.attentions.0.transformer_blocks.0.attn2"):
        attn = unet.get_submodule(layer)
        hidden_states = torch.randn(2, 16, attn.to_q.in_features, generator=generator)
        context = torch.randn(2, 7, attn.to_k.in_features, generator=generator)
        with torch.no_grad():
            expected = attn(hidden_states, encoder_hidden_states=context)  # diffusers' own processor
            got = attempt(name, student, attn, hidden_states.clone(), context.clone())
        expect_close(name, got, expected, what=f"the output of {layer.split('.transformer_blocks')[0]}'s attn2",
                     hint="q = attn.to_q(hidden_states), k = attn.to_k(context), v = attn.to_v(context); view each as "
                          "(B, length, heads, d) and move heads before length; weights = softmax(q @ kᵀ / √d) over the "
                          "tokens (the last axis); out = weights @ v, heads joined back to (B, pixels, heads · d); then "
                          "attn.to_out[0] (a Linear) and attn.to_out[1] (dropout).")
    passed(name, "Each pixel's output is a mix of the prompt tokens' values, weighted by how well its query meets their keys")
