"""The paper's main comparison rebuilt on the toy world (chapter 05): five rows, one protocol.

- **class word**: the plain model, "a photo of a heart" (the lower bound);
- **said in words**: the plain model told each concept in the toy language ("a photo of a red dotted
  heart"). A reference, not a method: no user has their object's description in the words the model
  and the judge share;
- **Textual Inversion**: one word optimised per concept on its four views (`baselines.textual_inversion`,
  initialised from the class word, one seed), used with the UNet's own cross-attention;
- **ELITE global**: w0 of the shipped global mapper;
- **ELITE global + local**: with the shipped local mapper at λ = 0.8.

Each is scored by `evaluation.score` on the same seeds: the toy judge's fidelity and editability, and
the paper's CLIP-T, CLIP-I and DINO-I, each with a 95 % bootstrap interval over concepts. On the toy
preset DINO-I is computed from the judge's own features, so it is not independent of fidelity. Each
method's scores go to `results/methods/<method>.json`, with the seconds it needs to learn a concept:
Textual Inversion's optimisation against ELITE's `encode` (global + local, one forward pass).

Textual Inversion takes minutes per concept on a CPU, so each concept's word is kept, as soon as it is
fitted, in `results/methods/textual_inversion_words.json` with the seconds it took and the settings
that made it (profile, seed, a fingerprint of the components): an interrupted run resumes where it
stopped, and a rerun scores the same words.

    python -m elite_tutorial.comparison                       # every method, the sixteen test concepts
    python -m elite_tutorial.comparison --methods "ELITE global" "class word"

Everything but the timings is a function of `--seed`: a rerun writes the same rows.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .arguments import whole_number
from .baselines import TI_PROFILES, textual_inversion
from .components import ASSETS_DIR, load_components
from .evaluation import (
    JUDGE_FOLDER,
    class_word_generator,
    described_generator,
    elite_generator,
    encode_seconds,
    method_file,
    record_method,
    score,
    textual_inversion_generator,
    with_interval,
)
from .mappers import GlobalMapper, LocalMapper
from .metrics import load_metric_models
from .pipeline import DEFAULT_LOCAL_SCALE, ELITEPipeline
from .storage import tensors_digest, write_json_atomic
from .toyworld.concepts import CONCEPTS, concept_views
from .toyworld.judge import ToyJudge

METHODS = ("class word", "said in words", "Textual Inversion", "ELITE global", "ELITE global + local")
COLUMNS = ("fidelity", "editability", "clip_t", "clip_i", "dino_i")
RESULTS = Path("results") / "methods"
WORDS_FILE = "textual_inversion_words.json"


def components_fingerprint(components) -> str:
    """A short hash of the weights Textual Inversion optimises through (text encoder, UNet, VAE;
    `storage.tensors_digest`): a cached word is reused only with the components that made it."""
    models = {"text_encoder": components.text_encoder, "unet": components.unet, "vae": components.vae}
    return tensors_digest({f"{name}.{key}": value for name, model in models.items()
                           for key, value in model.state_dict().items()})[:16]


def cached_inversions(components, concepts, ti_profile: str = "toy", seed: int = 0, cache: Path | None = None,
                      progress: bool = True) -> tuple[torch.Tensor, list[float]]:
    """One Textual Inversion word per concept, and the seconds each took to fit: (len(concepts), width), [s].

    With `cache` (a JSON file), words fitted earlier with the same profile, seed and components are read
    back, and each new one is written there as soon as it is fitted. A cache made with other settings
    is refused rather than overwritten."""
    settings = {"profile": ti_profile, "seed": seed, "components": components_fingerprint(components)}
    stored = json.loads(cache.read_text()) if cache is not None and cache.exists() else {**settings, "words": {}}
    if {key: stored.get(key) for key in settings} != settings:
        raise ValueError(f"{cache} holds Textual Inversion words made with other settings "
                         f"({ {key: stored.get(key) for key in settings} }, not {settings}); "
                         "move it away or give another --ti-cache.")
    for concept in tqdm(concepts, desc="textual inversion", disable=not progress):
        if concept.name in stored["words"]:
            continue
        fitted = textual_inversion(components, [image for image, _ in concept_views(concept)], concept.class_word,
                                   TI_PROFILES[ti_profile], seed=seed, progress=False)
        # float32 values as Python floats: exact in JSON, so a word read back is the word fitted
        stored["words"][concept.name] = {"embedding": fitted.embedding.detach().float().cpu().tolist(),
                                         "seconds": round(fitted.seconds, 2)}
        if cache is not None:
            write_json_atomic(cache, stored)
    rows = [stored["words"][concept.name] for concept in concepts]
    return torch.tensor([row["embedding"] for row in rows]), [row["seconds"] for row in rows]


def compare(components, global_mapper: GlobalMapper, local_mapper: LocalMapper, concepts=CONCEPTS, samples: int = 8,
            seed: int = 0, ti_profile: str = "toy", ti_cache: Path | None = None, methods=METHODS,
            progress: bool = True) -> dict:
    """`methods`' scores (`evaluation.score` summaries with intervals, and per-concept rows), each with the
    seconds it needs per concept to learn a concept (0 for the class word and the words)."""
    judge = ToyJudge.from_pretrained(JUDGE_FOLDER).eval()
    metrics = load_metric_models("toy", components.device)
    global_pipe = ELITEPipeline(components, global_mapper)
    local_pipe = ELITEPipeline(components, global_mapper, local_mapper)
    seconds_to_encode = float(np.mean(encode_seconds(local_pipe, [concept_views(concept)[0] for concept in concepts])))
    defaults = global_pipe.defaults

    def inversion():
        words, seconds = cached_inversions(components, concepts, ti_profile, seed, ti_cache, progress)
        return textual_inversion_generator(components, words, samples, seed, defaults), float(np.mean(seconds))

    makers = {  # method -> () -> (generator, seconds per concept)
        "class word": lambda: (class_word_generator(components, concepts, samples, seed, defaults), 0.0),
        "said in words": lambda: (described_generator(components, judge, concepts, samples, seed, defaults), 0.0),
        "Textual Inversion": inversion,
        "ELITE global": lambda: (elite_generator(global_pipe, concepts, samples, seed), seconds_to_encode),
        "ELITE global + local": lambda: (elite_generator(local_pipe, concepts, samples, seed,
                                                         local_scale=DEFAULT_LOCAL_SCALE), seconds_to_encode),
    }
    results = {}
    for method in tqdm(methods, desc="methods", disable=not progress):
        generate, seconds = makers[method]()
        with torch.no_grad():
            scores = score(generate, judge, concepts, samples, metrics, progress)
        results[method] = {**scores, "seconds_per_concept": round(seconds, 4)}
    return {"methods": results, "concepts": [c.name for c in concepts], "samples_per_prompt": samples, "seed": seed,
            "steps": defaults.num_inference_steps, "guidance_scale": defaults.guidance_scale,
            "textual_inversion": {"profile": ti_profile, **TI_PROFILES[ti_profile].__dict__}}


def record(results: dict, folder: Path, command: str) -> list[Path]:
    """Write each method of `compare`'s results to `folder/<method>.json`."""
    settings = {key: value for key, value in results.items() if key not in ("methods", "concepts")}  # rows name them
    return [record_method(folder, method, scores, command, **settings) for method, scores in results["methods"].items()]


def load(folder: Path = RESULTS, methods=METHODS) -> dict:
    """The methods' results files in `folder` that exist, as {method: contents}, in `methods`' order."""
    return {method: json.loads(method_file(folder, method).read_text())
            for method in methods if method_file(folder, method).exists()}


def table(methods: dict) -> str:
    """{method: results} (as `load` or `compare(...)["methods"]` give) as a Markdown table, each figure with
    its 95 % interval over concepts."""
    lines = ["| method | " + " | ".join(COLUMNS) + " | seconds per concept |", "|---" * (len(COLUMNS) + 2) + "|"]
    for method, result in methods.items():
        summary = result["summary"]
        values = [with_interval(summary, c) for c in COLUMNS]
        lines.append(f"| {method} | " + " | ".join(values) + f" | {result['seconds_per_concept']:.4g} |")
    return "\n".join(lines)


def speedup(methods: dict) -> float | None:
    """Textual Inversion's seconds per concept over ELITE's (None unless both were measured)."""
    if "Textual Inversion" not in methods or "ELITE global + local" not in methods:
        return None
    return methods["Textual Inversion"]["seconds_per_concept"] / methods["ELITE global + local"]["seconds_per_concept"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The paper's main comparison on the toy world.")
    parser.add_argument("--global-mapper", type=Path, default=ASSETS_DIR / "toy-global-mapper")
    parser.add_argument("--local-mapper", type=Path, default=ASSETS_DIR / "toy-local-mapper")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), metavar="METHOD",
                        help=f"which rows to score (default: all: {', '.join(METHODS)})")
    parser.add_argument("--samples", type=whole_number(1), default=8, help="images per concept and prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concepts", type=whole_number(1), default=len(CONCEPTS), help="the first N test concepts")
    parser.add_argument("--ti-profile", default="toy", choices=sorted(TI_PROFILES))
    parser.add_argument("--results", type=Path, default=RESULTS, help="the folder of the methods' results files")
    parser.add_argument("--ti-cache", type=Path, help=f"the Textual Inversion words' file (default: RESULTS/{WORDS_FILE})")
    args = parser.parse_args(argv)
    if args.concepts > len(CONCEPTS):
        parser.error(f"argument --concepts: there are {len(CONCEPTS)} test concepts, not {args.concepts}")
    components = load_components("toy", device="cpu", dtype=torch.float32)
    results = compare(components, GlobalMapper.from_pretrained(args.global_mapper), LocalMapper.from_pretrained(args.local_mapper),
                      CONCEPTS[:args.concepts], args.samples, args.seed, args.ti_profile,
                      args.ti_cache or args.results / WORDS_FILE, [m for m in METHODS if m in args.methods])
    command = shlex.join(["python", "-m", "elite_tutorial.comparison", *(sys.argv[1:] if argv is None else argv)])
    record(results, args.results, command)
    print(table(results["methods"]))
    if (ratio := speedup(results["methods"])) is not None:
        print(f"Textual Inversion / ELITE encoding time: {ratio:.0f} x")


if __name__ == "__main__":
    main()
