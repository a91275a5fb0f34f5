"""The trainer's speed options change how a step is computed, never what it computes.

Each test checks that its option took effect inside the training step, which fails without the
option. It also checks that the logged losses and the trained weights equal the plain run's. All
runs are fp32 on the CPU, so "equal" means float rounding: 1e-5 relative.
"""
import json
import traceback
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from torch._dynamo.utils import counters
from torch.optim.optimizer import register_optimizer_step_pre_hook

from elite_tutorial.attention import elite_attention
from elite_tutorial.cli import main as elite_train
from elite_tutorial.mappers import GlobalMapper
from elite_tutorial.step_speed import StepSpeed
from elite_tutorial.toyworld.sources import ToyWorldSource
from elite_tutorial.train_loop import StepBatches, merge_batches
from elite_tutorial.training import LOCAL_PROFILES, PROFILES, train_global, train_local, training_step_losses

# two steps of 2 micro-batches of 2: a micro-batch of 4 computes a step in one pass
RECIPE = replace(PROFILES["smoke"], steps=2, batch_size=2, gradient_accumulation=2, checkpoint_every=2, validate_every=100)
LOCAL_RECIPE = replace(LOCAL_PROFILES["smoke"], steps=2, batch_size=2, gradient_accumulation=2, checkpoint_every=2,
                       validate_every=100)


def source():
    return ToyWorldSource(clip_size=32, image_size=32, latent_factor=2)  # the tiny components' sizes


@contextmanager
def inside_training_steps(unet):
    """What the UNet sees in each training forward pass (the validation images run without gradients)."""
    seen = []

    def look(module, args, kwargs):
        if torch.is_grad_enabled():
            conv = module.conv_in.weight
            seen.append({"batch": len(args[0]), "channels_last": conv.is_contiguous(memory_format=torch.channels_last)
                         and not conv.is_contiguous(), "fp32_precision": torch.backends.cuda.matmul.fp32_precision})

    handle = unet.register_forward_pre_hook(look, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


@contextmanager
def optimizers_stepped():
    """The `fused` setting of every optimizer that takes a step."""
    fused = []
    handle = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: fused.append(bool(optimizer.defaults.get("fused"))))
    try:
        yield fused
    finally:
        handle.remove()


def run(tiny, out, speed=StepSpeed(), stage="global"):
    """(loss history, trained weights) of a short run."""
    if stage == "global":
        mapper = train_global(tiny, source(), out, RECIPE, speed=speed)
    else:
        with torch.random.fork_rng():
            torch.manual_seed(3)
            global_mapper = GlobalMapper.from_components(tiny)
        mapper = train_local(tiny, global_mapper, source(), out, LOCAL_RECIPE, speed=speed)
    history = json.loads((out / "log.json").read_text())["history"]
    return history, {k: v.clone() for k, v in mapper.state_dict().items()}


def assert_same_run(first, second):
    (history_a, weights_a), (history_b, weights_b) = first, second
    assert len(history_a) == len(history_b)
    for a, b in zip(history_a, history_b):
        assert b == {k: pytest.approx(v, rel=1e-5) for k, v in a.items()}
    # AdamW's first steps move each weight by about the learning rate (4e-4 here) whatever its gradient's
    # size, so where a gradient is near AdamW's eps its rounding moves the weight by up to ~1e-5 (seen:
    # 3e-6); a step gone wrong moves them by ~1e-4
    apart = {k: float((weights_a[k] - weights_b[k]).abs().max()) for k in weights_a
             if not torch.allclose(weights_a[k], weights_b[k], rtol=1e-5, atol=1e-5)}
    assert not apart, f"weights apart (largest difference): {apart}"


@pytest.fixture(scope="module")
def plain(tiny, tmp_path_factory):
    """The plain run each option is compared with, and what its steps saw."""
    with inside_training_steps(tiny.unet) as seen, optimizers_stepped() as fused:
        result = run(tiny, tmp_path_factory.mktemp("plain") / "run")
    return result, seen, fused


def test_the_plain_step_uses_no_option(plain):
    _, seen, fused = plain
    assert [s["batch"] for s in seen] == [2] * 4  # 2 steps of 2 passes of 2 samples
    assert not any(s["channels_last"] for s in seen) and not any(fused)


def test_a_larger_micro_batch_takes_the_same_step_in_fewer_passes(tiny, tmp_path, plain):
    with inside_training_steps(tiny.unet) as seen:
        merged = run(tiny, tmp_path / "run", StepSpeed(micro_batch=4))
    assert [s["batch"] for s in seen] == [4, 4]  # one pass of 4 a step
    assert_same_run(plain[0], merged)


def test_merged_micro_batches_hold_the_same_samples_and_noise_seeds():
    make = lambda rng: {"seed": int(rng.integers(100)), "x": torch.tensor([rng.random()]), "prompts": [str(rng.random())]}  # noqa: E731
    key = lambda step, micro: (7, step, micro)  # noqa: E731
    apart, merged = StepBatches(make, key, 0, 2, accumulation=4), StepBatches(make, key, 0, 2, accumulation=4, merge=2)
    assert len(apart) == 8 and len(merged) == 4
    for i in range(4):
        assert merged[i]["seed"] == [apart[2 * i]["seed"], apart[2 * i + 1]["seed"]]
        assert torch.equal(merged[i]["x"], torch.cat([apart[2 * i]["x"], apart[2 * i + 1]["x"]]))
        assert merged[i]["prompts"] == apart[2 * i]["prompts"] + apart[2 * i + 1]["prompts"]
    with pytest.raises(TypeError, match="'scale' is a float"):
        merge_batches([{"scale": 1.0}, {"scale": 2.0}])


def test_merged_noise_is_each_part_s_own(tiny):
    """One pass over two micro-batches, with their two generators, makes the losses of the two passes."""
    mapper = GlobalMapper.from_components(tiny)
    scheduler = DDPMScheduler.from_config(tiny.scheduler.config)
    parts = [source().batch(np.random.default_rng(seed), 2) for seed in (1, 2)]
    with torch.no_grad(), elite_attention(tiny.unet, mapper):
        apart = [training_step_losses(tiny, mapper, part, RECIPE, scheduler, torch.Generator().manual_seed(seed))
                 for part, seed in zip(parts, (11, 12))]
        merged = training_step_losses(tiny, mapper, merge_batches(parts), RECIPE, scheduler,
                                      [torch.Generator().manual_seed(seed) for seed in (11, 12)])
    for name in merged:
        torch.testing.assert_close(merged[name], (apart[0][name] + apart[1][name]) / 2, rtol=1e-5, atol=0)


def test_a_micro_batch_that_does_not_split_the_step_is_refused(tiny, tmp_path, capsys):
    for micro_batch in (3, 8):  # not a multiple of the batch (2); more than a step's 4 samples
        with pytest.raises(ValueError, match="must be a multiple of the batch size"):
            train_global(tiny, source(), tmp_path / "run", RECIPE, speed=StepSpeed(micro_batch=micro_batch))
    assert not (tmp_path / "run").exists()  # refused before any work
    with pytest.raises(SystemExit):
        elite_train(["global", "--preset", "tiny-random", "--profile", "smoke", "--micro-batch", "3",
                     "--out", str(tmp_path / "cli")])
    assert "--micro-batch: micro_batch 3 must be a multiple" in capsys.readouterr().err


def test_channels_last_weights_give_the_same_step(tiny, tmp_path, plain):
    with inside_training_steps(tiny.unet) as seen:
        nhwc = run(tiny, tmp_path / "run", StepSpeed(channels_last=True))
    assert seen and all(s["channels_last"] for s in seen)
    assert tiny.unet.conv_in.weight.is_contiguous()  # as it was, after the run
    assert_same_run(plain[0], nhwc)


def test_tf32_is_on_inside_the_run_and_off_after(tiny, tmp_path, plain):
    before = torch.backends.cuda.matmul.fp32_precision
    with inside_training_steps(tiny.unet) as seen:
        tf32 = run(tiny, tmp_path / "run", StepSpeed(tf32=True))
    assert seen and all(s["fp32_precision"] == "tf32" for s in seen)
    assert torch.backends.cuda.matmul.fp32_precision == before
    assert_same_run(plain[0], tf32)  # a CPU computes fp32 in fp32 either way: this checks nothing else changed


def test_fused_adamw_takes_the_same_step(tiny, tmp_path, plain):
    with optimizers_stepped() as fused:
        result = run(tiny, tmp_path / "run", StepSpeed(fused_adamw=True))
    assert fused and all(fused)
    assert_same_run(plain[0], result)


def test_the_compiled_unet_takes_the_same_steps_from_one_graph(tiny, tmp_path, plain):
    """Graphs traced by torch.compile (the `aot_eager` backend: the same tracing as inductor, without
    generating code) compute the UNet: one for the training steps (the second step reuses the
    first's), one for the validation images at the end. The UNet runs uncompiled after the run."""
    torch._dynamo.reset()
    counters.clear()
    compiled = run(tiny, tmp_path / "run", StepSpeed(compile_unet=True, compile_backend="aot_eager"))
    assert counters["stats"]["unique_graphs"] == 2 and counters["frames"]["ok"] == counters["frames"]["total"] == 2
    assert tiny.unet._compiled_call_impl is None
    assert_same_run(plain[0], compiled)


def test_stage_two_takes_the_same_step_with_the_options(tiny, tmp_path):
    plain_local = run(tiny, tmp_path / "plain", stage="local")
    with inside_training_steps(tiny.unet) as seen, optimizers_stepped() as fused:
        fast = run(tiny, tmp_path / "fast", StepSpeed.fastest(micro_batch=4, compile_unet=False), stage="local")
    assert [s["batch"] for s in seen] == [4, 4] and all(s["channels_last"] for s in seen) and all(fused)
    assert_same_run(plain_local, fast)


def test_a_training_step_reads_nothing_back_to_the_host(tiny):
    """No `.item()`, `float(t)`, `bool(t)`, ... in the loss, the backward pass, the clipping or AdamW's
    step: on a GPU each would make the host wait for the device."""
    mapper = GlobalMapper.from_components(tiny).float().train()
    optimizer = StepSpeed(fused_adamw=True).adamw([{"params": list(mapper.parameters()), "lr": 1e-4}], 1e-2)
    scheduler = DDPMScheduler.from_config(tiny.scheduler.config)
    batch = source().batch(np.random.default_rng(0), 2)
    reads = []

    def reading(name, original):
        def read(self, *args, **kwargs):
            reads.append(f"Tensor.{name}\n" + "".join(traceback.format_stack(limit=3)[:-1]))
            return original(self, *args, **kwargs)
        return read

    names = ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__")
    originals = {name: getattr(torch.Tensor, name) for name in names}
    with elite_attention(tiny.unet, mapper):
        try:
            for name in names:
                setattr(torch.Tensor, name, reading(name, originals[name]))
            losses = training_step_losses(tiny, mapper, batch, RECIPE, scheduler, torch.Generator().manual_seed(0))
            sum(losses.values()).backward()
            torch.nn.utils.clip_grad_norm_(mapper.parameters(), 1.0)
            optimizer.step()
        finally:
            for name in names:
                setattr(torch.Tensor, name, originals[name])
    assert not reads, "\n".join(reads)


def test_the_frozen_towers_run_without_gradients(tiny, tmp_path):
    """The VAE encode and the CLIP image tower build no autograd graph in either stage; the text tower
    builds one only in stage 1, where the words' gradient flows through it."""
    grad_enabled = {}
    towers = {"vae": tiny.vae.encoder, "image": tiny.image_encoder, "text": tiny.text_encoder}
    handles = [tower.register_forward_pre_hook(lambda module, args, name=name: grad_enabled[name].add(torch.is_grad_enabled()))
               for name, tower in towers.items()]
    try:
        for stage, train, recipe, frozen_mapper in (
                ("global", train_global, RECIPE, ()),
                ("local", train_local, LOCAL_RECIPE, (GlobalMapper.from_components(tiny),))):
            grad_enabled.update({name: set() for name in towers})
            # one of two steps: the validation images (without gradients) come at the end, not seen here
            train(tiny, *frozen_mapper, source(), tmp_path / stage, recipe, stop_after=1)
            assert grad_enabled["vae"] == grad_enabled["image"] == {False}
            assert grad_enabled["text"] == ({True} if stage == "global" else {False})
    finally:
        for handle in handles:
            handle.remove()


def test_the_inductor_compiled_unet_is_refused_on_the_cpu(tiny, tmp_path, capsys):
    with pytest.raises(ValueError, match="compile_unet on the CPU"):
        train_global(tiny, source(), tmp_path / "run", RECIPE, speed=StepSpeed(compile_unet=True))
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit):
        elite_train(["global", "--preset", "tiny-random", "--profile", "smoke", "--compile-unet", "--out", str(tmp_path / "cli")])
    assert "--compile-unet: compile_unet on the CPU" in capsys.readouterr().err


@pytest.mark.research
def test_why_inductor_is_refused_on_the_cpu(tiny):
    """The reason for the refusal above: compiled by inductor for the CPU, the tiny UNet's up block with
    an upsampler passes no gradient back to its input, where the same graph uncompiled, or traced and
    decomposed without inductor's code, does. If this fails, torch has fixed it: lift the refusal."""
    block = tiny.unet.up_blocks[0]
    assert block.upsamplers is not None
    generator = torch.Generator().manual_seed(0)
    width = block.resnets[0].conv2.out_channels  # the mid block's output, and each resnet's
    hidden = torch.randn(2, width, 8, 8, generator=generator)
    skips = tuple(torch.randn(2, r.conv1.in_channels - width, 8, 8, generator=generator) for r in reversed(block.resnets))
    temb = torch.randn(2, tiny.unet.time_embedding.linear_2.out_features, generator=generator)
    weights = torch.randn(2, width, 16, 16, generator=generator)

    def gradient(backend):
        x = hidden.clone().requires_grad_(True)
        run = block if backend is None else torch.compile(block, backend=backend)
        (run(x, skips, temb) * weights).sum().backward()
        torch._dynamo.reset()
        return x.grad

    eager = gradient(None)
    assert eager.norm() > 0
    torch.testing.assert_close(gradient("aot_eager_decomp_partition"), eager, rtol=1e-4, atol=1e-5)
    assert gradient("inductor").norm() == 0


def test_the_command_passes_the_speed_options_and_logs_them(tmp_path):
    elite_train(["global", "--preset", "tiny-random", "--profile", "smoke", "--steps", "1", "--batch-size", "2",
                 "--gradient-accumulation", "2", "--micro-batch", "4", "--channels-last", "--tf32", "--fused-adamw",
                 "--out", str(tmp_path / "run")])
    speed = json.loads((tmp_path / "run" / "log.json").read_text())["speed"]
    assert speed == {"micro_batch": 4, "channels_last": True, "tf32": True, "compile_unet": False, "fused_adamw": True,
                     "compile_backend": "inductor"}
