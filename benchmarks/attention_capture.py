"""What capturing cross-attention costs, and how fast the explorer answers.

    python benchmarks/attention_capture.py

On the toy preset with the shipped global mapper (25 steps, guidance, batch 1, CPU):
- generation time with an aggregated capture of all tokens / without one (median of interleaved repeats);
- the memory a 25-step capture of all tokens holds, aggregated and with every step kept (measured as
  the bytes of its tensors, and by calculation), and the process's peak-RSS growth while capturing;
- the explorer: `render` of a stored generation (median), and `generate` (capture included).
On the sd14 architecture (random weights) at 512 px: the memory an aggregated capture of all tokens
holds after one guided UNet call, by calculation and by measurement.
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

from elite_tutorial import load_components
from elite_tutorial.attention_maps import capture_cross_attention, cross_attention_layers, layer_resolution
from elite_tutorial.components import ASSETS_DIR, sd14_architecture
from elite_tutorial.explorer import View, generate, render
from elite_tutorial.mappers import GlobalMapper
from elite_tutorial.pipeline import ELITEPipeline
from elite_tutorial.toyworld.concepts import CONCEPTS, concept_views

PROMPT = "a photo of a S on the left"


def seconds(function, repeats: int = 1) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def capture_bytes_by_calculation(unet, rows: int, tokens: int, bytes_per_value: int) -> int:
    """Sum over attn2 layers of rows x heads x pixels x tokens values, at the UNet's sample size."""
    return sum(rows * unet.get_submodule(name.removesuffix(".processor")).heads * layer_resolution(unet, name) ** 2
               * tokens * bytes_per_value for name in cross_attention_layers(unet))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def toy_figures(repeats: int) -> dict:
    pipe = ELITEPipeline(load_components("toy"), GlobalMapper.from_pretrained(ASSETS_DIR / "toy-global-mapper"))
    pipe.sd_pipeline.set_progress_bar_config(disable=True)
    image, mask = concept_views(CONCEPTS[0])[0]
    concept = pipe.encode(image, mask)

    def run():
        return pipe(PROMPT, concept, generator=torch.Generator().manual_seed(0), output_type="np")

    def run_captured(keep_steps=False):
        with capture_cross_attention(pipe, keep_steps=keep_steps) as capture:
            run()
        return capture

    run(), run_captured()  # warm-up
    off, on = [], []
    for _ in range(repeats):  # interleaved, so drifts in machine load hit both sides alike
        off.append(seconds(run))
        on.append(seconds(run_captured))
    unet = pipe.components.unet
    rss_before = peak_rss_mib()
    aggregated, every_step = run_captured(), run_captured(keep_steps=True)
    rss_growth = peak_rss_mib() - rss_before
    steps = every_step.num_steps
    generation = generate(pipe, concept, PROMPT)
    view = View(word="w0", steps=(5, 20))
    return {
        "toy_generation_s": {"capture_off": round(statistics.median(off), 3), "capture_on": round(statistics.median(on), 3),
                             "ratio_on_over_off": round(statistics.median(on) / statistics.median(off), 3)},
        "toy_capture_all_tokens_MiB": {
            "aggregated_measured": round(aggregated.nbytes() / 2**20, 2),
            "aggregated_calculated": round(capture_bytes_by_calculation(unet, 2, 77, 4) / 2**20, 2),
            "every_step_measured": round(every_step.nbytes() / 2**20, 2),
            "every_step_calculated": round((capture_bytes_by_calculation(unet, 2, 77, 4)
                                            + capture_bytes_by_calculation(unet, 2, 77, 2) * steps) / 2**20, 2),
            "steps": steps,
            "peak_rss_growth_while_capturing": round(rss_growth, 1),
        },
        "explorer_s": {"render_median": round(seconds(lambda: render(view, generation), repeats=20), 4),
                       "generate": round(seconds(lambda: generate(pipe, concept, PROMPT), repeats=3), 3)},
    }


@torch.no_grad()
def sd14_figures() -> dict:
    unet = sd14_architecture().unet
    latents, context = torch.randn(2, 4, 64, 64), torch.randn(2, 77, 768)
    with capture_cross_attention(unet, guided=True) as capture:
        unet(latents, 500, encoder_hidden_states=context)
    return {"sd14_512px_aggregated_capture_MiB": {
        "measured": round(capture.nbytes() / 2**20, 1),
        "calculated": round(capture_bytes_by_calculation(unet, 2, 77, 4) / 2**20, 1),
        "layers": len(capture.layers), "rows": 2, "tokens": 77}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-sd14", action="store_true")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    report = toy_figures(args.repeats)
    if not args.skip_sd14:
        report.update(sd14_figures())
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
