"""How fast a training step runs, never what it computes: `elite-train`'s speed options.

Each option changes how the step is computed on the hardware, not the numbers it computes, and has a
CPU test that the loss of one step is unchanged with it (`tests/test_step_speed.py`):

- `micro_batch`: several of the recipe's micro-batches in one forward pass (fewer accumulation
  passes). Every sample and its noise are drawn as before: the loop concatenates the micro-batches
  (`train_loop.merge_batches`) and draws each one's noise from its own generator. The losses are means
  over equal parts, so the step's gradient is the same.
- `channels_last`: the UNet's and the VAE's convolution weights in NHWC, the layout of cuDNN's
  tensor-core kernels.
- `tf32`: fp32 matmuls on TF32 tensor cores. Under bf16 autocast only what autocast keeps in fp32
  changes. No effect on a CPU.
- `compile_unet`: `torch.compile` of the UNet, in place (`nn.Module.compile`). It pays after a warm-up
  of minutes; the validation images compile a second graph. Refused on the CPU: there, torch 2.13's
  inductor code drops the gradient through diffusers' upsampling blocks. The compiled UNet's
  gradients into the mid block's k/v copies come out zero.
- `fused_adamw`: AdamW's update of all the mapper's tensors in one kernel (`fused=True`).

What needs no option is already done in every step. The frozen parts run under `torch.no_grad`: the
VAE encode, the CLIP image tower, and stage 2's text tower. Stage 1's text tower needs the gradient of
its input words. The frozen models run in the compute dtype (`--mixed-precision bf16` loads them in
bf16). The loop reads the losses back only every `train_loop.LOG_EVERY` steps, never per step.

    speed = StepSpeed.fastest(micro_batch=16)          # everything on
    with speed.applied(components):                    # undone on exit
        ...
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .components import Components

FP32_PRECISION_SETTINGS = (torch.backends.cuda.matmul, torch.backends.cudnn.conv)  # where TF32 is switched on


@dataclass(frozen=True)
class StepSpeed:
    """The speed options of a training step (see the module docstring). The defaults are the plain step."""

    micro_batch: int | None = None      # samples per forward pass; None: the recipe's batch size
    channels_last: bool = False
    tf32: bool = False
    compile_unet: bool = False
    fused_adamw: bool = False
    compile_backend: str = "inductor"  # torch.compile's backend ("aot_eager" traces the graphs without generating code)

    def __post_init__(self):
        if self.micro_batch is not None and self.micro_batch < 1:
            raise ValueError(f"micro_batch must be at least 1, not {self.micro_batch}.")

    @classmethod
    def fastest(cls, micro_batch: int | None = None, compile_unet: bool = True) -> StepSpeed:
        """Every option on."""
        return cls(micro_batch, channels_last=True, tf32=True, compile_unet=compile_unet, fused_adamw=True)

    def check_device(self, device: torch.device) -> None:
        """Refuse what computes a different step on `device`: the UNet compiled by inductor on a CPU."""
        if self.compile_unet and self.compile_backend == "inductor" and torch.device(device).type == "cpu":
            raise ValueError(
                "compile_unet on the CPU: inductor's CPU code for the UNet computes wrong gradients (those through "
                "diffusers' upsampling blocks come out zero), so the step would not be the same; compile on a GPU, "
                "where benchmarks/full_size_training_steps.py checks the compiled step's loss and gradient.")

    def merged(self, batch_size: int, accumulation: int) -> int:
        """How many of the recipe's micro-batches (`batch_size` samples, `accumulation` a step) one
        forward pass computes: `micro_batch / batch_size`, which must divide `accumulation`."""
        if self.micro_batch is None:
            return 1
        per_step = batch_size * accumulation
        if self.micro_batch % batch_size or per_step % self.micro_batch:
            raise ValueError(
                f"micro_batch {self.micro_batch} must be a multiple of the batch size ({batch_size}) that divides the "
                f"samples of a step ({batch_size} x {accumulation} accumulation = {per_step}); raise "
                "--gradient-accumulation and lower --batch-size for the same step in larger passes.")
        return self.micro_batch // batch_size

    @contextmanager
    def applied(self, components: Components) -> Iterator[Components]:
        """`components` with the options that act on models and on torch (channels-last, TF32, the
        compiled UNet) in force inside the block, and as they were after it."""
        self.check_device(components.device)
        models = (components.unet, components.vae)
        precisions = [setting.fp32_precision for setting in FP32_PRECISION_SETTINGS]
        try:
            if self.channels_last:
                for model in models:
                    model.to(memory_format=torch.channels_last)
            if self.tf32:
                for setting in FP32_PRECISION_SETTINGS:
                    setting.fp32_precision = "tf32"
            if self.compile_unet:
                components.unet.compile(backend=self.compile_backend)
            yield components
        finally:
            if self.compile_unet:
                # what `nn.Module.compile` set; cleared, the module calls its own forward again
                components.unet._compiled_call_impl = None
            for setting, precision in zip(FP32_PRECISION_SETTINGS, precisions):
                setting.fp32_precision = precision
            if self.channels_last:
                for model in models:
                    model.to(memory_format=torch.contiguous_format)

    def adamw(self, parameter_groups: list[dict], weight_decay: float) -> torch.optim.AdamW:
        """The trainer's optimizer, fused when asked (torch's own default otherwise)."""
        return torch.optim.AdamW(parameter_groups, weight_decay=weight_decay, fused=self.fused_adamw or None)
