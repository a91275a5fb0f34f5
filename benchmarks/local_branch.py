"""What ELITE's local branch costs at generation time: global + local (λ = 0.8) / global only.

    python benchmarks/local_branch.py

- toy: 25-step guided generations of one concept with the shipped toy mappers (`ELITEPipeline`
  with and without the `LocalMapper`), CPU;
- sd14 architecture (random weights) at a small resolution on the CPU: guided UNet calls (batch 2:
  unconditional + conditional) with ELITE's processors, with and without 256 local tokens on the
  conditional row (the local branch's extra attention is the same per pixel at any resolution).

Medians of interleaved repeats; prints one JSON object with both ratios.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from elite_tutorial import load_components
from elite_tutorial.attention import LocalTokens, elite_attention
from elite_tutorial.components import ASSETS_DIR, sd14_architecture
from elite_tutorial.mappers import GlobalMapper, LocalMapper
from elite_tutorial.pipeline import ELITEPipeline
from elite_tutorial.toyworld.concepts import CONCEPTS, concept_views


def interleaved(runs: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each callable, run in turn `repeats` times (after one warm-up each)."""
    for run in runs.values():
        run()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def toy(repeats: int) -> dict:
    components = load_components("toy")
    global_mapper = GlobalMapper.from_pretrained(ASSETS_DIR / "toy-global-mapper")
    local_mapper = LocalMapper.from_pretrained(ASSETS_DIR / "toy-local-mapper")
    global_pipe, local_pipe = ELITEPipeline(components, global_mapper), ELITEPipeline(components, global_mapper, local_mapper)
    image, mask = concept_views(CONCEPTS[0])[0]
    concepts = {"global": global_pipe.encode(image, mask), "local": local_pipe.encode(image, mask)}
    for pipe in (global_pipe, local_pipe):
        pipe.sd_pipeline.set_progress_bar_config(disable=True)

    def generate(pipe, concept):
        return lambda: pipe("a photo of a S on the left", concept, generator=torch.Generator().manual_seed(0), output_type="np")
    seconds = interleaved({"global": generate(global_pipe, concepts["global"]),
                           "global+local": generate(local_pipe, concepts["local"])}, repeats)
    return {"toy_generation_s": {k: round(v, 3) for k, v in seconds.items()},
            "toy_ratio_local_over_global": round(seconds["global+local"] / seconds["global"], 3)}


@torch.no_grad()
def sd14(resolution: int, repeats: int) -> dict:
    models = sd14_architecture()

    global_mapper, local_mapper = GlobalMapper.from_components(models), LocalMapper.from_components(models)
    latents, context = torch.randn(2, 4, resolution // 8, resolution // 8), torch.randn(2, 77, 768)
    patches = (224 // 14) ** 2
    local = LocalTokens(torch.randn(1, patches, 768), rows=torch.tensor([1]), primary_index=torch.tensor([5]), scale=0.8)

    def call(with_local: bool):
        def run():
            with elite_attention(models.unet, global_mapper, local_mapper=local_mapper if with_local else None,
                                 local=local if with_local else None):
                models.unet(latents, 500, encoder_hidden_states=context)
        return run
    seconds = interleaved({"global": call(False), "global+local": call(True)}, repeats)
    return {"sd14_unet_call_s": {k: round(v, 3) for k, v in seconds.items()}, "sd14_resolution": resolution,
            "sd14_ratio_local_over_global": round(seconds["global+local"] / seconds["global"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--resolution", type=int, default=256, help="sd14 image side (latents are 1/8 of it)")
    args = parser.parse_args()
    report = toy(args.repeats)
    report.update(sd14(args.resolution, args.repeats))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
