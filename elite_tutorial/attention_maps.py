"""Capturing cross-attention probabilities while images are generated.

    with capture_cross_attention(pipe) as capture:     # an ELITEPipeline, a diffusers pipeline or a UNet
        image = pipe("a photo of a S on the left", concept).images[0]
    probs = capture.probabilities("up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor")

For every cross-attention (`attn2`) layer, the capture receives softmax(q k^T / sqrt(d)): for each row
of the UNet batch, each head and each query pixel, a distribution over the prompt's 77 tokens. It keys
them by layer (whose grid size gives the resolution), head, row and step (one UNet call, with its
timestep; PNDM, the toy preset's scheduler, takes its first step twice, so 25 steps make 26); under
classifier-free guidance the batch is [unconditional; conditional] and
`capture.conditional_rows` picks the conditional half. With ELITE's local branch it also records the
gate, w0's normalised map, per layer (rows of the local branch, heads, pixels).

Memory stays bounded. By default probabilities are summed per layer over the steps as they arrive
(one (rows, heads, pixels, tokens) float32 tensor per layer, on the UNet's device); `keep_steps=True`
also keeps every step (float16, on the CPU) so a range of steps can be chosen afterwards; `tokens=[...]`
keeps only those token positions. Probabilities are computed explicitly only inside the `with` block:
on exit the UNet's processors are restored, and the fused `scaled_dot_product_attention` runs again.

`AttentionCapture.save` / `load_capture` write and read a capture as one safetensors file.
`attention_plots` turns a capture into per-word maps and figures.
"""
from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from safetensors.torch import load_file

from .arguments import path_argument
from .attention import ELITEAttnProcessor, attention_probabilities
from .attention import cross_attention_layers as cross_attention_layers  # where the capture's users find it
from .storage import save_safetensors_atomic


def layer_resolution(unet: UNet2DConditionModel, processor_name: str) -> int:
    """Side of the grid a down/mid/up block's attention runs at, for the UNet's square `sample_size`."""
    side = unet.config.sample_size
    parts = processor_name.split(".")
    if parts[0] == "mid_block":
        return side // 2 ** (len(unet.config.block_out_channels) - 1)
    block = int(parts[1])
    if parts[0] == "down_blocks":
        return side // 2**block
    return side // 2 ** (len(unet.config.block_out_channels) - 1 - block)


def _token_positions(tokens) -> list[int]:
    """A capture's `tokens` (a list, tuple, range, array or tensor of positions) as a list of ints, or
    a ValueError that says what it takes."""
    if hasattr(tokens, "tolist"):
        positions = tokens.tolist()
    else:
        positions = list(tokens) if isinstance(tokens, Iterable) and not isinstance(tokens, (str, bytes)) else None
    if not (isinstance(positions, list) and positions and all(
            isinstance(t, numbers.Integral) and not isinstance(t, bool) and t >= 0 for t in positions)):
        raise ValueError(f"tokens must be None (every token) or a non-empty list of token positions >= 0, not {tokens!r}.")
    return [int(t) for t in positions]


class AttentionCapture:
    """Cross-attention probabilities (and ELITE's local gate) recorded over the UNet calls of a generation.

    tokens: the token positions to keep (None: all). keep_steps: keep every call, not only the sum.
    guided: whether the UNet batch is [unconditional; conditional]; `capture_cross_attention` reads it
    from the pipeline when there is one.
    """

    def __init__(self, tokens: Sequence[int] | None = None, keep_steps: bool = False, guided: bool = False):
        self.tokens = None if tokens is None else _token_positions(tokens)
        self.keep_steps, self.guided = keep_steps, guided
        self.sums: dict[str, torch.Tensor] = {}          # layer -> (rows, heads, pixels, kept tokens) float32
        self.steps: dict[str, list[torch.Tensor]] = {}   # layer -> per call, the same in float16 on the CPU
        self.calls: dict[str, int] = {}
        self.gate_sums: dict[str, torch.Tensor] = {}     # layer -> (local rows, heads, pixels) float32
        self.gate_steps: dict[str, list[torch.Tensor]] = {}
        self.timesteps: list[float] = []                 # one per UNet call
        self.latent_size: tuple[int, int] | None = None  # (height, width) of the UNet's input

    # -- recording (called by the processors and the UNet hook) --------------------------------------

    def record(self, layer: str, probs: torch.Tensor) -> None:
        """Add one call's probabilities (rows, heads, pixels, tokens) of `layer`."""
        self.check_tokens_fit(probs.shape[-1])
        kept = (probs if self.tokens is None else probs[..., self.tokens]).detach().float()
        _accumulate(self.sums, self.steps if self.keep_steps else None, layer, kept)
        self.calls[layer] = self.calls.get(layer, 0) + 1

    def check_tokens_fit(self, length: int) -> None:
        """Refuse kept token positions that reach past a prompt of `length` tokens."""
        if self.tokens is not None and max(self.tokens) >= length:
            raise ValueError(f"tokens {self.tokens} reach past a prompt's {length} token positions (0 to {length - 1}).")

    def record_gate(self, layer: str, gate: torch.Tensor) -> None:
        """Add one call's local-branch gate (local rows, heads, pixels) of `layer`."""
        _accumulate(self.gate_sums, self.gate_steps if self.keep_steps else None, layer, gate.detach().float())

    def on_unet_call(self, sample: torch.Tensor, timestep) -> None:
        self.timesteps.append(float(torch.as_tensor(timestep).flatten()[0]))
        self.latent_size = tuple(sample.shape[-2:])

    # -- reading -------------------------------------------------------------------------------------

    @property
    def layers(self) -> list[str]:
        """The layers recorded, in the order they first ran (down blocks, mid block, up blocks)."""
        return list(self.sums)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def conditional_rows(self) -> slice:
        """The rows of the prompts (under guidance the second half of the batch; else all of it)."""
        rows = next(iter(self.sums.values())).shape[0] if self.sums else 0
        return slice(rows // 2 if self.guided else 0, rows)

    def resolution(self, layer: str) -> tuple[int, int]:
        """(height, width) of the grid `layer` attends from."""
        if self.latent_size is None:
            raise ValueError("Nothing was recorded: run the pipeline inside `capture_cross_attention`.")
        pixels = self.sums[layer].shape[2] if layer in self.sums else self.gate_sums[layer].shape[2]
        factor = round(math.sqrt(self.latent_size[0] * self.latent_size[1] / pixels))
        return self.latent_size[0] // factor, self.latent_size[1] // factor

    def column(self, position: int) -> int:
        """The column of prompt token `position` in the recorded probabilities."""
        if self.tokens is None:
            return position
        if position not in self.tokens:
            raise ValueError(f"Token position {position} was not captured (kept: {self.tokens}).")
        return self.tokens.index(position)

    def steps_between(self, high: float, low: float) -> list[int]:
        """Indices of the UNet calls whose timestep t has high >= t >= low (sampling runs t downwards)."""
        return [i for i, t in enumerate(self.timesteps) if low <= t <= high]

    def probabilities(self, layer: str, steps: Sequence[int] | None = None) -> torch.Tensor:
        """The mean over `steps` (default: all) of `layer`'s probabilities: (rows, heads, pixels, kept tokens)."""
        return _mean(self.sums, self.steps, self.calls.get(layer, 0), layer, steps, self.keep_steps)

    def gate(self, layer: str, steps: Sequence[int] | None = None) -> torch.Tensor:
        """The mean over `steps` of `layer`'s local gate: (local rows, heads, pixels)."""
        if layer not in self.gate_sums:
            raise ValueError(f"No local gate was recorded for {layer} (generate with a LocalMapper and λ > 0).")
        return _mean(self.gate_sums, self.gate_steps, self.calls.get(layer, 0), layer, steps, self.keep_steps)

    def nbytes(self) -> int:
        """Bytes held by the recorded tensors."""
        tensors = [*self.sums.values(), *self.gate_sums.values(),
                   *(t for calls in (*self.steps.values(), *self.gate_steps.values()) for t in calls)]
        return sum(t.numel() * t.element_size() for t in tensors)

    # -- saving --------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the capture to one safetensors file (atomically); `load_capture` reads it back."""
        tensors = {}
        for prefix, sums, steps in (("sum", self.sums, self.steps), ("gate", self.gate_sums, self.gate_steps)):
            for layer, total in sums.items():
                tensors[f"{prefix}/{layer}"] = total.cpu()
                for index, step in enumerate(steps.get(layer, [])):
                    tensors[f"{prefix}/{index}/{layer}"] = step
        meta = {"tokens": self.tokens, "keep_steps": self.keep_steps, "guided": self.guided, "calls": self.calls,
                "timesteps": self.timesteps, "latent_size": self.latent_size, "layers": self.layers}
        path = Path(path)
        save_safetensors_atomic(tensors, path, {"attention_capture": json.dumps(meta)})
        return path


def load_capture(path: str | os.PathLike) -> AttentionCapture:
    """A capture written by `AttentionCapture.save`."""
    from safetensors import safe_open  # noqa: PLC0415

    path = path_argument(path, "path", "a file written by AttentionCapture.save")
    if not path.is_file():
        raise FileNotFoundError(f"No attention capture file at {path}.")
    with safe_open(str(path), "pt") as f:
        meta = (f.metadata() or {}).get("attention_capture")
    if meta is None:
        raise ValueError(f"{path} is not a saved attention capture (no 'attention_capture' metadata).")
    meta = json.loads(meta)
    tensors = load_file(str(path))
    capture = AttentionCapture(meta["tokens"], meta["keep_steps"], meta["guided"])
    capture.calls, capture.timesteps = meta["calls"], meta["timesteps"]
    capture.latent_size = None if meta["latent_size"] is None else tuple(meta["latent_size"])
    for prefix, sums, steps in (("sum", capture.sums, capture.steps), ("gate", capture.gate_sums, capture.gate_steps)):
        for layer in meta["layers"]:
            if f"{prefix}/{layer}" in tensors:
                sums[layer] = tensors[f"{prefix}/{layer}"]
                kept = []
                while f"{prefix}/{len(kept)}/{layer}" in tensors:
                    kept.append(tensors[f"{prefix}/{len(kept)}/{layer}"])
                if kept:
                    steps[layer] = kept
    return capture


def _accumulate(sums: dict, steps: dict | None, layer: str, value: torch.Tensor) -> None:
    if layer in sums:
        sums[layer] += value
    else:
        sums[layer] = value.clone()
    if steps is not None:
        steps.setdefault(layer, []).append(value.to("cpu", torch.float16))


def _mean(sums: dict, steps: dict, calls: int, layer: str, which: Sequence[int] | None, kept: bool) -> torch.Tensor:
    if layer not in sums:
        raise KeyError(f"{layer} was not recorded; recorded layers: {list(sums)}.")
    if which is None:
        return sums[layer].cpu() / max(calls, 1)
    if not kept:
        raise ValueError("Only the sum over all steps was kept: capture with keep_steps=True to choose steps.")
    which = list(which)
    if not which:
        raise ValueError("No steps selected.")
    return torch.stack([steps[layer][i].float() for i in which]).mean(0)


class CapturingAttnProcessor:
    """Stable Diffusion's cross-attention, computed explicitly so `capture` receives the probabilities.

    The same maths as diffusers' fused `AttnProcessor2_0` for these layers (no norms, no residual).
    """

    def __init__(self, layer: str, capture: AttentionCapture):
        self.layer, self.capture = layer, capture

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb=None, **kwargs) -> torch.Tensor:
        """hidden_states (batch, pixels, channels), encoder_hidden_states (batch, tokens, width)."""
        if encoder_hidden_states is None:
            raise ValueError(f"{self.layer}: this processor is for cross-attention; it got no text context.")
        batch, pixels, _ = hidden_states.shape
        head_dim = attn.to_q.out_features // attn.heads

        def heads(x: torch.Tensor) -> torch.Tensor:  # (n, length, heads * d) -> (n, heads, length, d)
            return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        query, key = heads(attn.to_q(hidden_states)), heads(attn.to_k(encoder_hidden_states))
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        probs = attention_probabilities(query, key, attn.scale, attention_mask)
        self.capture.record(self.layer, probs)
        out = (probs @ heads(attn.to_v(encoder_hidden_states))).transpose(1, 2).reshape(batch, pixels, -1)
        return attn.to_out[1](attn.to_out[0](out))


@contextmanager
def capture_cross_attention(target, tokens: Sequence[int] | None = None, keep_steps: bool = False,
                            guided: bool | None = None) -> Iterator[AttentionCapture]:
    """Record cross-attention inside the block; leave `target` exactly as it was after it.

    target: an `ELITEPipeline` (its processors, installed per call, report to the capture), a
    diffusers pipeline with a `unet`, or a `UNet2DConditionModel`. Layers running ELITE's processor
    report through it (both branches); any other `attn2` layer gets a `CapturingAttnProcessor`.
    guided: whether the UNet batch is [unconditional; conditional]; by default read from the pipeline
    at each UNet call (diffusers' `do_classifier_free_guidance`), False for a bare UNet.
    """
    diffusers_pipeline = getattr(target, "sd_pipeline", target)
    unet = target.components.unet if hasattr(target, "sd_pipeline") else getattr(target, "unet", target)
    if not isinstance(unet, UNet2DConditionModel):
        raise TypeError(f"capture_cross_attention needs an ELITEPipeline, a diffusers pipeline or a UNet; got {type(target).__name__}.")
    capture = AttentionCapture(tokens, keep_steps, bool(guided))
    tokenizer = getattr(getattr(target, "components", diffusers_pipeline), "tokenizer", None)
    if tokenizer is not None:  # known before generating; a bare UNet's prompt length is known at its first call
        capture.check_tokens_fit(tokenizer.model_max_length)

    def on_call(module, args, kwargs):
        if guided is None and hasattr(diffusers_pipeline, "do_classifier_free_guidance"):
            capture.guided = bool(diffusers_pipeline.do_classifier_free_guidance)
        capture.on_unet_call(args[0] if args else kwargs["sample"], args[1] if len(args) > 1 else kwargs["timestep"])

    reporting = (_pipeline_reports_to(target, capture) if hasattr(target, "attention_capture")
                 else _processors_report_to(unet, capture))
    hook = unet.register_forward_pre_hook(on_call, with_kwargs=True)
    try:
        with reporting:
            yield capture
    finally:
        hook.remove()


@contextmanager
def _pipeline_reports_to(pipeline, capture: AttentionCapture) -> Iterator[None]:
    """An ELITEPipeline installs its processors per call, with its `attention_capture`."""
    before, pipeline.attention_capture = pipeline.attention_capture, capture
    try:
        yield
    finally:
        pipeline.attention_capture = before


@contextmanager
def _processors_report_to(unet: UNet2DConditionModel, capture: AttentionCapture) -> Iterator[None]:
    """ELITE processors already installed report to `capture`; other attn2 layers get a capturing one."""
    previous = unet.attn_processors
    elite_captures = {name: p.capture for name, p in previous.items() if isinstance(p, ELITEAttnProcessor)}
    processors = {}
    for name, processor in previous.items():
        if isinstance(processor, ELITEAttnProcessor):
            processor.capture = capture
            processors[name] = processor
        else:
            processors[name] = CapturingAttnProcessor(name, capture) if name.endswith("attn2.processor") else processor
    try:
        unet.set_attn_processor(processors)
        yield
    finally:
        for name, value in elite_captures.items():
            previous[name].capture = value
        unet.set_attn_processor(previous)
