"""The paper's main comparison rebuilt on the toy world (notebook 05): four methods, one protocol.

- **class word**: the plain model, "a photo of a heart" (the lower bound);
- **Textual Inversion**: one word optimised per concept on its four views (`baselines.textual_inversion`,
  initialised from the class word), used with the UNet's own cross-attention;
- **ELITE global**: w0 of the shipped global mapper;
- **ELITE global + local**: with the shipped local mapper at λ = 0.8.

Each is scored by `evaluation.score` (the toy judge's fidelity and editability; CLIP-T, CLIP-I, DINO-I
from `metrics`) on the same seeds. The time each needs to learn a concept is measured in the same run:
Textual Inversion's optimisation against ELITE's `encode` (global + local, one forward pass).

    python -m elite_tutorial.comparison --out results/toy_comparison.json

Everything but the timings is a function of `--seed`: a rerun prints the same table.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .arguments import whole_number, writable_file
from .baselines import TI_PROFILES, textual_inversion
from .components import ASSETS_DIR, load_components
from .evaluation import JUDGE_FOLDER, class_word_generator, elite_generator, encode_seconds, score, textual_inversion_generator
from .mappers import GlobalMapper, LocalMapper
from .metrics import load_metric_models
from .pipeline import DEFAULT_LOCAL_SCALE, ELITEPipeline
from .storage import write_json_atomic
from .toyworld.concepts import CONCEPTS, concept_views
from .toyworld.judge import ToyJudge

METHODS = ("class word", "Textual Inversion", "ELITE global", "ELITE global + local")
COLUMNS = ("fidelity", "editability", "clip_t", "clip_i", "dino_i")


def compare(components, global_mapper: GlobalMapper, local_mapper: LocalMapper, concepts=CONCEPTS,
            samples: int = 4, seed: int = 0, ti_profile: str = "toy", progress: bool = True) -> dict:
    """The four methods' scores (`evaluation.score` summaries and per-concept rows) and the seconds each
    needs per concept to learn it (0 for the class word)."""
    judge = ToyJudge.from_pretrained(JUDGE_FOLDER).eval()
    metrics = load_metric_models("toy", components.device)
    global_pipe = ELITEPipeline(components, global_mapper)
    local_pipe = ELITEPipeline(components, global_mapper, local_mapper)
    seconds_to_encode = encode_seconds(local_pipe, [concept_views(concept)[0] for concept in concepts])
    inversions = [textual_inversion(components, [image for image, _ in concept_views(concept)], concept.class_word,
                                    TI_PROFILES[ti_profile], seed=seed, progress=False)
                  for concept in tqdm(concepts, desc="textual inversion", disable=not progress)]
    defaults = global_pipe.defaults
    generators = {
        "class word": class_word_generator(components, concepts, samples, seed, defaults),
        "Textual Inversion": textual_inversion_generator(
            components, torch.stack([ti.embedding for ti in inversions]), samples, seed, defaults),
        "ELITE global": elite_generator(global_pipe, concepts, samples, seed),
        "ELITE global + local": elite_generator(local_pipe, concepts, samples, seed, local_scale=DEFAULT_LOCAL_SCALE),
    }
    seconds = {"class word": 0.0, "Textual Inversion": float(np.mean([ti.seconds for ti in inversions])),
               "ELITE global": float(np.mean(seconds_to_encode)), "ELITE global + local": float(np.mean(seconds_to_encode))}
    results = {}
    for method in tqdm(METHODS, desc="methods", disable=not progress):
        results[method] = {**score(generators[method], judge, concepts, samples, metrics, progress),
                           "seconds_per_concept": round(seconds[method], 4)}
    return {"methods": results, "concepts": [c.name for c in concepts], "samples_per_prompt": samples, "seed": seed,
            "textual_inversion": {"profile": ti_profile, **TI_PROFILES[ti_profile].__dict__},
            "speedup_textual_inversion_over_elite": round(seconds["Textual Inversion"] / seconds["ELITE global + local"], 1)}


def table(results: dict) -> str:
    """The comparison as a Markdown table."""
    lines = ["| method | " + " | ".join(COLUMNS) + " | seconds per concept |", "|---" * (len(COLUMNS) + 2) + "|"]
    for method, result in results["methods"].items():
        values = [f"{result['summary'][column]:.3f}" for column in COLUMNS]
        lines.append(f"| {method} | " + " | ".join(values) + f" | {result['seconds_per_concept']:.4g} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The paper's main comparison on the toy world.")
    parser.add_argument("--global-mapper", type=Path, default=ASSETS_DIR / "toy-global-mapper")
    parser.add_argument("--local-mapper", type=Path, default=ASSETS_DIR / "toy-local-mapper")
    parser.add_argument("--samples", type=whole_number(1), default=4, help="images per concept and prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concepts", type=whole_number(1), default=len(CONCEPTS), help="the first N personal concepts")
    parser.add_argument("--ti-profile", default="toy", choices=sorted(TI_PROFILES))
    parser.add_argument("--out", type=writable_file, help="also write the results here (JSON)")
    args = parser.parse_args(argv)
    if args.concepts > len(CONCEPTS):
        parser.error(f"argument --concepts: there are {len(CONCEPTS)} personal concepts, not {args.concepts}")
    components = load_components("toy", device="cpu", dtype=torch.float32)
    results = compare(components, GlobalMapper.from_pretrained(args.global_mapper), LocalMapper.from_pretrained(args.local_mapper),
                      CONCEPTS[:args.concepts], args.samples, args.seed, args.ti_profile)
    results["command"] = " ".join(["python -m elite_tutorial.comparison", *(sys.argv[1:] if argv is None else argv)])
    print(table(results))
    print(f"Textual Inversion / ELITE encoding time: {results['speedup_textual_inversion_over_elite']} x")
    if args.out:
        write_json_atomic(args.out, results)


if __name__ == "__main__":
    main()
