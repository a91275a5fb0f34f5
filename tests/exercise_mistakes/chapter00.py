"""Chapter 00: one typical mistake per exercise, keyed by its check's name; each must fail its check with a message
(tests/test_exercises.py). Each source defines the exercise's function, written wrong."""

MISTAKES = {
    # 00: the guidance pushed from the wrong side; ᾱ without its square roots; x̂0 forgotten
    "guided_noise": """
def guided_noise(noise_uncond, noise_text, guidance_scale):
    return noise_text + guidance_scale * (noise_text - noise_uncond)
""",
    "noised_latents": """
def noised_latents(latents, noise, alpha_bar):
    alpha_bar = alpha_bar.view(-1, 1, 1, 1)
    return alpha_bar * latents + (1 - alpha_bar) * noise
""",
    "ddim_step": """
def ddim_step(noise_pred, latents, alpha_bar, alpha_bar_prev):
    return alpha_bar_prev ** 0.5 * latents + (1 - alpha_bar_prev) ** 0.5 * noise_pred
""",
}
MISTAKES["cross_attention"] = """
import torch


def cross_attention(attn, hidden_states, context):
    batch, heads = len(hidden_states), attn.heads
    def split(x):
        return x.view(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2)
    q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(context)), split(attn.to_v(context))
    weights = (q @ k.transpose(-1, -2)).softmax(dim=-1)  # the 1/sqrt(d) scale forgotten
    out = (weights @ v).transpose(1, 2).reshape(batch, -1, heads * q.shape[-1])
    return attn.to_out[1](attn.to_out[0](out))
"""
