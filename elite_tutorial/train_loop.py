"""The one training loop: every trainer of the project runs its optimisation steps here.

`elite-train` (both stages, `training`), Textual Inversion (`baselines`) and the toy world's
pretraining, its encoder study and its compound teaching (`studies.pretrain.train_loop`) differ in
their models, batches and losses, not in how a step is taken. A step, for every one of them:

    for each of the `accumulation` micro-batches of step k:
        batch     = make_batch(rng)        rng seeded by `key(k, micro)` alone (`StepBatches`)
        generator = torch.Generator(device).manual_seed(batch["seed"])     the step's noise
        losses    = step_losses(model, batch, generator)                   named, summed
        accelerator.backward(sum(losses))  (divided by `accumulation`)
    clip the gradient norm (optional); AdamW step; the learning-rate schedule steps; the EMA follows

on `accelerate` (mixed precision, gradient accumulation, several processes), with the learning rate
from `diffusers.optimization.get_scheduler` (or a schedule of the same kind, see `step_schedule`) and
the weights' average kept by `diffusers.training_utils.EMAModel`. With `merge` > 1 the loop computes
`merge` micro-batches in one pass, and the generator is the list of their generators (`StepBatches`).

Every step's randomness comes from the step alone, so a run stopped at step k and resumed from its
checkpoint (`save_training_state` / `load_training_state`: one safetensors file, no pickle) reaches the
weights of an uninterrupted run, and DataLoader workers can build batches ahead without changing them.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .storage import load_optimizer_tensors, optimizer_tensors, save_safetensors_atomic

LOG_EVERY = 25  # steps between reading losses back from the device (each read waits for the device)


def noise_seed(rng: np.random.Generator) -> int:
    """The seed of a step's noise generator, drawn from the step's batch generator."""
    return int(rng.integers(2**62))


def with_noise_seed(make_batch: Callable[[np.random.Generator], dict]) -> Callable[[np.random.Generator], dict]:
    """`make_batch` with the batch's `seed` drawn first, before the batch itself."""
    return lambda rng: {"seed": noise_seed(rng), **make_batch(rng)}


class StepBatches(Dataset):
    """Item i is micro-batch i of the run from step `start` to `end` (`accumulation` micro-batches a
    step): `make_batch(rng)` with rng = `np.random.default_rng(key(step, micro))`, a dict that holds
    `seed`, the seed of the step's noise. Items do not depend on each other, so DataLoader workers can
    build them ahead, and a resumed run sees the batches an uninterrupted run sees.

    With `merge` > 1 an item is `merge` consecutive micro-batches of a step in one (`merge_batches`):
    the same samples, computed in fewer, larger passes."""

    def __init__(self, make_batch: Callable[[np.random.Generator], dict], key: Callable[[int, int], Sequence[int]],
                 start: int, end: int, accumulation: int = 1, merge: int = 1):
        if accumulation % merge:
            raise ValueError(f"{merge} micro-batches a pass do not divide the {accumulation} of a step.")
        self.make_batch, self.key, self.start, self.end = make_batch, key, start, end
        self.accumulation, self.merge = accumulation, merge

    def __len__(self) -> int:
        return (self.end - self.start) * self.accumulation // self.merge

    def __getitem__(self, i: int) -> dict:
        step, first = divmod(i * self.merge, self.accumulation)
        batches = [self.make_batch(np.random.default_rng(list(self.key(self.start + step, micro))))
                   for micro in range(first, first + self.merge)]
        return batches[0] if self.merge == 1 else merge_batches(batches)


def merge_batches(batches: Sequence[dict]) -> dict:
    """Micro-batches as one: tensors concatenated along the batch, lists joined, and `seed` the list of
    their noise seeds (the loop makes one generator of each, so every part draws the noise it drew alone)."""
    merged = {}
    for name, first in batches[0].items():
        values = [batch[name] for batch in batches]
        if name == "seed":
            merged[name] = values
        elif torch.is_tensor(first):
            merged[name] = torch.cat(values)
        elif isinstance(first, list):
            merged[name] = [item for value in values for item in value]
        else:
            raise TypeError(f"merge_batches: {name!r} is a {type(first).__name__}; batches hold tensors and lists.")
    return merged


def noise_generators(seed: int | list[int], device: torch.device) -> torch.Generator | list[torch.Generator]:
    """The generator of a micro-batch's noise, or for merged micro-batches one per part, in order."""
    if isinstance(seed, list):
        return [torch.Generator(device).manual_seed(s) for s in seed]
    return torch.Generator(device).manual_seed(seed)


Schedule = Callable[[torch.optim.Optimizer, int], torch.optim.lr_scheduler.LRScheduler]


def constant_schedule(optimizer: torch.optim.Optimizer, last_epoch: int = -1) -> torch.optim.lr_scheduler.LRScheduler:
    """The authors' and the diffusers examples' schedule, from `get_scheduler`: the recipe's rate at
    every step. `last_epoch`: the last step taken (-1: none), as for every torch schedule."""
    return get_scheduler("constant", optimizer, last_epoch=last_epoch)


class StepRate(torch.optim.lr_scheduler.LRScheduler):
    """A learning-rate schedule of a shape `get_scheduler` does not name, set from the step alone:
    `rate(step, the group's base rate)` (pretraining's warm-up, then cosine decay to a tenth)."""

    def __init__(self, optimizer: torch.optim.Optimizer, rate: Callable[[int, float], float], last_epoch: int = -1):
        self.rate = rate
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return [self.rate(self.last_epoch, base) for base in self.base_lrs]


# --------------------------------------------------------------------------------------------------
# The checkpoint: one safetensors file.

def save_training_state(path: Path, step: int, model: torch.nn.Module | None, optimizer: torch.optim.Optimizer,
                        ema: EMAModel | None = None, parameter_names: Sequence[str] = ()) -> None:
    """Write what resuming needs, atomically, as one safetensors file: `model.<name>` (the trained
    module's state dict), `ema.<parameter name>` (the EMA's weights), the optimizer's state
    (`storage.optimizer_tensors`) and the step (metadata). No RNG state: every step's randomness comes
    from its seed."""
    tensors = {} if model is None else {f"model.{k}": v for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{name}": p for name, p in zip(parameter_names, ema.shadow_params)})
    tensors.update(optimizer_tensors(optimizer))
    save_safetensors_atomic(tensors, path, {"step": str(step)})


def load_training_state(path: Path, model: torch.nn.Module | None, optimizer: torch.optim.Optimizer,
                        device: torch.device | str, ema: EMAModel | None = None,
                        parameter_names: Sequence[str] = ()) -> int:
    """Load a `save_training_state` file into `model` (where it holds the model's weights: checkpoints of
    `elite-train` written before it did keep them in the `mapper` folder beside it), `optimizer` and
    `ema`; return its step."""
    tensors = load_file(str(path), device=str(device))
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    if model is not None and weights:
        model.load_state_dict(weights)
    with safe_open(str(path), "pt") as f:
        step = int(f.metadata()["step"])
    if ema is not None:
        with torch.no_grad():
            for name, shadow in zip(parameter_names, ema.shadow_params):
                shadow.copy_(tensors[f"ema.{name}"])
        ema.optimization_step = step
    load_optimizer_tensors(optimizer, tensors)
    return step


# --------------------------------------------------------------------------------------------------
# The loop.

def _one_thread(_worker: int) -> None:
    torch.set_num_threads(1)  # each worker builds one batch at a time; more threads only oversubscribe


@dataclass
class Loop:
    """One run's loop: see the module docstring. `run()` takes the steps from `start` to `end` and
    returns the loss history (one dict of named losses a step, each the mean over the micro-batches).

    model: the module the optimizer trains (None when it trains bare tensors, as Textual Inversion);
    it is `accelerator.prepare`d with the optimizer and handed to `step_losses`. Trainers put their
    models on `device` themselves (`accelerate` places nothing: a CPU run stays on the CPU beside a
    GPU); the loop moves each batch's tensors there.
    merge: micro-batches computed together in one pass (`StepBatches`); `step_losses` then gets one
    generator per micro-batch, in a list, and must return means over the samples (the parts are equal).
    history: the steps before `start` (a resumed run's); `record(mean losses)` is what each new step adds.
    after_step(done, history): called after each step, with the history read back up to `done` when
    `needs_history(done)` (a checkpoint's steps) and at the end.
    """

    model: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    step_losses: Callable[[torch.nn.Module | None, dict, torch.Generator], dict[str, torch.Tensor]]
    make_batch: Callable[[np.random.Generator], dict]
    key: Callable[[int, int], Sequence[int]]
    steps: int
    device: torch.device
    start: int = 0
    end: int | None = None
    accumulation: int = 1
    merge: int = 1
    max_grad_norm: float | None = None
    schedule: Schedule = constant_schedule
    mixed_precision: str = "no"
    ema: EMAModel | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    record: Callable[[dict[str, float]], dict[str, float]] = lambda losses: losses  # how a step is logged (rounding)
    after_step: Callable[[int, list], None] | None = None
    needs_history: Callable[[int], bool] = lambda done: False
    workers: int = 0
    description: str = "train"
    progress: bool = True

    def __post_init__(self):
        self.end = self.steps if self.end is None else min(self.end, self.steps)
        self.passes = self.accumulation // self.merge  # forward passes a step (StepBatches checks that merge divides)
        self.accelerator = Accelerator(gradient_accumulation_steps=self.passes,
                                       mixed_precision=self.mixed_precision, device_placement=False)

    def unwrap(self) -> torch.nn.Module | None:
        """The trained module without the wrappers `accelerate` may have added (several processes)."""
        return None if self.model is None else self.accelerator.unwrap_model(self.prepared)

    def run(self) -> list[dict[str, float]]:
        accelerator, device = self.accelerator, torch.device(self.device)
        # on the bare optimizer, at the step the run starts from: one schedule step per optimizer step
        for group in self.optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        schedule = self.schedule(self.optimizer, self.start - 1)
        if self.model is None:
            self.prepared, optimizer = None, accelerator.prepare(self.optimizer)
        else:
            self.prepared, optimizer = accelerator.prepare(self.model, self.optimizer)
            self.model.train()
        trainable = [p for group in self.optimizer.param_groups for p in group["params"]]
        if self.workers:  # the workers tokenise; a tokenizer thread pool inside each would only oversubscribe
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        batches = iter(DataLoader(StepBatches(self.make_batch, self.key, self.start, self.end, self.accumulation, self.merge),
                                  batch_size=None, num_workers=self.workers, prefetch_factor=4 if self.workers else None,
                                  worker_init_fn=_one_thread if self.workers else None,
                                  pin_memory=device.type == "cuda",
                                  generator=torch.Generator()))  # its own: the global RNG stays untouched
        ema_parameters = list(self.unwrap().parameters()) if self.ema is not None else []
        bar = tqdm(range(self.start, self.end), initial=self.start, total=self.steps, desc=self.description,
                   disable=not (self.progress and accelerator.is_local_main_process), dynamic_ncols=True)
        pending: list[list[dict[str, torch.Tensor]]] = []  # each step's micro-batch losses, still on the device
        for step in bar:
            micro_losses = []
            for _ in range(self.passes):
                batch = next(batches)
                generator = noise_generators(batch.pop("seed"), device)
                batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
                with accelerator.accumulate(*[m for m in (self.prepared,) if m is not None]), accelerator.autocast():
                    losses = self.step_losses(self.prepared, batch, generator)
                    accelerator.backward(sum(losses.values()))
                    if accelerator.sync_gradients and self.max_grad_norm is not None:
                        accelerator.clip_grad_norm_(trainable, self.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                micro_losses.append({k: v.detach() for k, v in losses.items()})
            schedule.step()
            if self.ema is not None:
                self.ema.step(ema_parameters)
            pending.append(micro_losses)
            done = step + 1
            if len(pending) == LOG_EVERY or done == self.end or self.needs_history(done):
                self.history += [self.record(self._mean(micro)) for micro in pending]
                pending.clear()
                bar.set_postfix({k: f"{v:.4f}" for k, v in self.history[-1].items()})
            if self.after_step is not None:
                self.after_step(done, self.history)
        bar.close()
        if self.model is not None:
            self.model.eval()
        return self.history

    def _mean(self, micro_losses: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """A step's losses, each the mean over its passes (read back from the device)."""
        sums: dict[str, float] = {}
        for losses in micro_losses:
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v) / len(micro_losses)
        return sums
