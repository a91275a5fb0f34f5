"""The benchmarks time what they claim: the same step on both sides, every configuration running on the CPU."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from elite_tutorial.attention import elite_attention
from elite_tutorial.mappers import GlobalMapper

spec = importlib.util.spec_from_file_location(
    "global_training_step", Path(__file__).resolve().parent.parent / "benchmarks" / "global_training_step.py")
benchmark = importlib.util.module_from_spec(spec)
spec.loader.exec_module(benchmark)


def test_authors_eager_attention_equals_ours(tiny):
    unet, mapper = tiny.unet, GlobalMapper.from_components(tiny)
    with torch.no_grad():
        for layer in mapper.attention_layers:
            mapper.to_v_global[layer].weight.mul_(-0.7)  # copies unlike the UNet's own
    latents, t, context = torch.randn(2, 4, 16, 16), torch.tensor([3, 700]), torch.randn(2, 77, 32)
    previous = unet.attn_processors
    unet.set_attn_processor(benchmark.authors_processors(unet, mapper))
    try:
        with torch.no_grad():
            authors = unet(latents, t, encoder_hidden_states=context).sample
    finally:
        unet.set_attn_processor(previous)
    with torch.no_grad(), elite_attention(unet, mapper):
        ours = unet(latents, t, encoder_hidden_states=context).sample
    torch.testing.assert_close(ours, authors, rtol=1e-4, atol=1e-5)


def test_the_full_size_step_benchmark_runs_on_the_cpu(tmp_path, monkeypatch):
    """The GPU benchmark's regression check: at 256 px and micro-batch 1 (2 for the largest), fp32, every
    configuration of both stages runs, counts its FLOPs, and computes the plain step's loss and gradient."""
    spec = importlib.util.spec_from_file_location(
        "full_size_training_steps", Path(__file__).resolve().parent.parent / "benchmarks" / "full_size_training_steps.py")
    full_size = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, full_size)  # its dataclass looks itself up there
    spec.loader.exec_module(full_size)
    report = full_size.main(["--out", str(tmp_path / "cpu.json")])
    assert json.loads((tmp_path / "cpu.json").read_text()) == json.loads(json.dumps(report))
    assert report["resolution"] == 256 and not report["skipped"]
    for stage in ("global", "local"):
        rows = {r["configuration"]: r for r in report["rows"] if r["stage"] == stage}
        assert set(rows) == {"plain", "plain + checkpointing", "fast", "fast, largest"}
        assert all(r["flops_per_micro_step"] > 1e11 and r["seconds_per_micro_step"] > 0 for r in rows.values())
        assert all(r["same_step"] for r in rows.values())
        # the counted FLOPs follow the samples; checkpointing recomputes the UNet's forward pass
        assert rows["fast, largest"]["flops_per_micro_step"] == pytest.approx(2 * rows["fast"]["flops_per_micro_step"], rel=1e-3)
        assert rows["fast"]["flops_per_micro_step"] == rows["plain"]["flops_per_micro_step"]
        assert rows["plain + checkpointing"]["flops_per_micro_step"] > rows["plain"]["flops_per_micro_step"]
        checks = report["loss_check"][stage]
        assert checks["samples"] == 2
        for name in ("plain + checkpointing", "fast", "fast, largest"):  # fp32: equal up to rounding
            assert checks[name]["loss_relative_difference"] < 1e-5 and checks[name]["gradient_relative_difference"] < 1e-4
        assert report["figures"][stage]["largest_loss_relative_difference"] < 1e-5
