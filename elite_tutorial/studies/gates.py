"""The toy world's gates: the cheapest measurements that could prove the world unfit for ELITE.

ELITE turns an image into a word that redraws the object. For that to be possible in the toy world,
three things must hold of its personal concepts (`concepts.CONCEPTS`) before any mapper is trained,
each cheaper to check than the last is to train:

| gate | the figure, on the held-out personal concepts | target |
|---|---|---|
| 1 drawable | the concept said in words: fidelity / editability | >= 0.85 / >= 0.75 |
| 1 drawable | Textual Inversion, one word, the UNet's own k/v: fidelity | >= 0.80 |
| 1 not sayable in one word | the class word: fidelity | <= 0.50 |
| 2 readable | a linear probe on the mapper's view, fitted on training identities: each attribute | >= 0.95 |
| 3 mappable | a ridge map from the mapper's view to a compound word, fitted on training identities, decoded at S: fidelity | >= 0.80 |
| judge | the toy judge on renders of the concepts, each identity attribute | >= 0.98 |
| prompts | plain prompt adherence (mean; position alone) | >= 0.85; >= 0.85 |

Run them in this order and stop at the first that fails: a failed gate changes the world, not a
mapper's recipe. Each gate writes its entry of `results/toy_gates.json` (figures, targets, whether
each is met, the command, seconds); gate 1 also writes one results file per method,
`results/gates/<method>.json` (summary with 95 % bootstrap intervals over concepts, and rows).

    python -m elite_tutorial.studies.gates drawable
    python -m elite_tutorial.studies.gates readable [--encoder FOLDER]
    python -m elite_tutorial.studies.gates mappable --components FOLDER [--encoder FOLDER] [--twins]   # mappable.py
    python -m elite_tutorial.studies.gates judge
    python -m elite_tutorial.studies.gates prompts
    python -m elite_tutorial.studies.gates out-of-span   # not a gate: the lesson on what no word draws
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import evaluation
from ..baselines import TI_PROFILES, textual_inversion
from ..components import ASSETS_DIR, load_components
from ..evaluation import JUDGE_FOLDER, class_word_generator, compound_generator, described_generator, score, textual_inversion_generator
from ..pipeline import TOY_DEFAULTS
from ..storage import write_json_atomic
from ..toyworld.concepts import CONCEPTS, IDENTITY, OUT_OF_SPAN, concept_views, training_twins
from ..toyworld.judge import ToyJudge, accuracy
from ..toyworld.render import exact_scene
from .encoder import identity_probe, load_encoder, probe_specs
from .mappable import mapped_concept_words

RESULTS = Path("results")
GATES_FILE = "toy_gates.json"

# (figure key, "min" or "max", target): a figure meets its target when it is at least (min) or at
# most (max) the target
TARGETS = {
    "drawable": [("said in words: fidelity", "min", 0.85), ("said in words: editability", "min", 0.75),
                 ("Textual Inversion: fidelity", "min", 0.80), ("class word: fidelity", "max", 0.50)],
    "readable": [(f"{attribute}: held-out identities", "min", 0.95) for attribute in IDENTITY],
    "mappable": [("fitted map: fidelity", "min", 0.80)],
    "judge": [(f"{attribute}: concept renders", "min", 0.98) for attribute in IDENTITY],
    "prompts": [("adherence: mean", "min", 0.85), ("adherence: position", "min", 0.85)],
}


def verdicts(gate: str, figures: dict[str, float]) -> dict[str, dict]:
    """Each target of `gate` with its figure and whether it is met."""
    return {key: {"figure": figures[key], "target": f"{'>=' if kind == 'min' else '<='} {target}",
                  "met": bool(figures[key] >= target if kind == "min" else figures[key] <= target)}
            for key, kind, target in TARGETS[gate]}


def record_gate(results: Path, gate: str, figures: dict[str, float], details: dict, command: str, seconds: float,
                entry: str | None = None) -> dict:
    """Write `gate`'s entry of `results/toy_gates.json` (other entries are kept; `entry` names it, default
    the gate's name) and return it."""
    path = results / GATES_FILE
    gates = json.loads(path.read_text()) if path.exists() else {}
    checks = verdicts(gate, figures)
    entry = entry or gate
    gates[entry] = {"passed": all(check["met"] for check in checks.values()), "targets": checks,
                   "details": details, "command": command, "seconds": round(seconds, 1)}
    write_json_atomic(path, gates)
    return gates[entry]


def method_file(results: Path, method: str) -> Path:
    """Where a gate's method file lives: `results/gates/<method>.json` (`evaluation.method_file`)."""
    return evaluation.method_file(results / "gates", method)


def record_method(results: Path, method: str, scores: dict, command: str, **settings) -> Path:
    """A gate's method scores as `results/gates/<method>.json` (`evaluation.record_method`)."""
    return evaluation.record_method(results / "gates", method, scores, command, **settings)


def _inversions(components, concepts, samples: int, seed: int, ti_profile: str):
    """One Textual Inversion word per concept (fitted to its four views from its class word) and the
    generator that reads them at S; with what the method's results file keeps of them (their words)."""
    fitted = [textual_inversion(components, [image for image, _ in concept_views(concept)], concept.class_word,
                                TI_PROFILES[ti_profile], seed=seed, progress=False)
              for concept in tqdm(concepts, desc="textual inversion")]
    words = torch.stack([inversion.embedding for inversion in fitted])
    kept = {"textual_inversion": {
        "profile": ti_profile, "seconds_per_concept": round(float(np.mean([inversion.seconds for inversion in fitted])), 1),
        "words": {c.name: [round(v, 5) for v in inversion.embedding.tolist()] for c, inversion in zip(concepts, fitted)}}}
    return textual_inversion_generator(components, words, samples, seed, TOY_DEFAULTS), kept


def _score_methods(results: Path, command: str, methods: dict, judge: ToyJudge, samples: int, seed: int) -> dict:
    """Score each method (name -> (generator, what its file keeps, concepts)), write its results file,
    and return {"methods": each one's summary, and the sampling settings}."""
    settings = dict(samples_per_prompt=samples, seed=seed, steps=TOY_DEFAULTS.num_inference_steps,
                    guidance_scale=TOY_DEFAULTS.guidance_scale)
    summaries = {}
    for method, (generate, kept, concepts) in methods.items():
        with torch.no_grad():
            scores = score(generate, judge, concepts, samples=samples, progress=True)
        record_method(results, method, scores, command, **settings, **kept)
        summaries[method] = scores["summary"]
    return {"methods": summaries, **settings}


DRAWABLE_METHODS = ("said in words", "class word", "Textual Inversion")


def gate_drawable(results: Path, command: str, samples: int = 8, seed: int = 0, ti_profile: str = "toy",
                  methods: tuple[str, ...] = DRAWABLE_METHODS) -> tuple[dict, dict] | None:
    """Gate 1: the concepts said in words, by their class word, and by one Textual Inversion word each
    (read through the UNet's own k/v). Scores `methods` (each into its results file; separate
    processes may score different ones at once), then, once all three files exist, the gate's figures."""
    components = load_components("toy", device="cpu", dtype=torch.float32)
    judge = ToyJudge.from_pretrained(JUDGE_FOLDER).eval()
    makers = {  # name -> () -> (generator, what its results file keeps besides the scores)
        "said in words": lambda: (described_generator(components, judge, samples=samples, seed=seed), {}),
        "class word": lambda: (class_word_generator(components, samples=samples, seed=seed), {}),
        "Textual Inversion": lambda: _inversions(components, CONCEPTS, samples, seed, ti_profile),
    }
    _score_methods(results, command, {m: (*makers[m](), CONCEPTS) for m in methods}, judge, samples, seed)
    if missing := [m for m in DRAWABLE_METHODS if not method_file(results, m).exists()]:
        print(f"gate 1 waits for {', '.join(missing)}: score them with --methods")
        return None
    summaries = {m: json.loads(method_file(results, m).read_text())["summary"] for m in DRAWABLE_METHODS}
    figures = {"said in words: fidelity": summaries["said in words"]["fidelity"],
               "said in words: editability": summaries["said in words"]["editability"],
               "Textual Inversion: fidelity": summaries["Textual Inversion"]["fidelity"],
               "class word: fidelity": summaries["class word"]["fidelity"]}
    return figures, {"methods": summaries, "files": [str(method_file(results, m)) for m in DRAWABLE_METHODS]}


def out_of_span(results: Path, command: str, samples: int = 8, seed: int = 0, ti_profile: str = "toy") -> dict:
    """Not a gate, a lesson: Textual Inversion and the class word on the out-of-span concepts, scored
    against the judge's reading of them (they have no labels in the toy vocabulary)."""
    components = load_components("toy", device="cpu", dtype=torch.float32)
    judge = ToyJudge.from_pretrained(JUDGE_FOLDER).eval()
    methods = {
        "class word out of span": (class_word_generator(components, OUT_OF_SPAN, samples, seed), {}, OUT_OF_SPAN),
        "Textual Inversion out of span": (*_inversions(components, OUT_OF_SPAN, samples, seed, ti_profile), OUT_OF_SPAN),
    }
    return _score_methods(results, command, methods, judge, samples, seed)


def _encoder_and_record(encoder_folder: Path | None) -> tuple[Path, dict | None]:
    """An image encoder's folder (default: the toy preset's) and the record `encoder.py` writes beside a
    retrained one (its command and recipe), if there is one."""
    folder = Path(encoder_folder or ASSETS_DIR / "toy-sd" / "image_encoder")
    made_by = folder / "record.json"
    return folder, json.loads(made_by.read_text()) if made_by.is_file() else None


def gate_readable(encoder_folder: Path | None) -> tuple[dict, dict]:
    """Gate 2 (`encoder.identity_probe`) on an image encoder (default: the toy preset's)."""
    folder, record = _encoder_and_record(encoder_folder)
    probe = identity_probe(load_encoder(folder))
    figures = {f"{a}: held-out identities": probe["attributes"][a]["held_out_identities"] for a in IDENTITY}
    return figures, {"encoder": str(folder), "encoder_record": record, **probe}


def gate_mappable(results: Path, command: str, components_folder: str, encoder_folder: Path | None,
                  samples: int = 8, seed: int = 0, training: int = 6000, twins: bool = False) -> tuple[dict, dict]:
    """Gate 3 (`mappable.py`): the concepts' words mapped from their first views, read at S by
    `components`' text encoder (one taught compound words), scored into `results/gates/fitted_map.json`;
    beside them the concepts' own compound words (what a perfect map would write). With `twins`, the
    same on the concepts' training twins (`concepts.training_twins`), into "... (training identities)"."""
    components = load_components(components_folder, device="cpu", dtype=torch.float32)
    judge = ToyJudge.from_pretrained(JUDGE_FOLDER).eval()
    folder, record = _encoder_and_record(encoder_folder)
    concepts, suffix = (training_twins(), " (training identities)") if twins else (CONCEPTS, "")
    words, fit = mapped_concept_words(components, load_encoder(folder), training, concepts)
    kept = {"components": str(components_folder), "encoder": str(folder)}
    methods = {
        f"fitted map{suffix}": (textual_inversion_generator(components, words, samples, seed, TOY_DEFAULTS),
                                {**kept, "fit": fit}, concepts),
        f"compound word{suffix}": (compound_generator(components, judge, concepts, samples, seed), kept, concepts),
    }
    scored = _score_methods(results, command, methods, judge, samples, seed)
    figures = {"fitted map: fidelity": scored["methods"][f"fitted map{suffix}"]["fidelity"]}
    return figures, {**scored, **kept, "encoder_record": record, "fit": fit}


def gate_judge() -> tuple[dict, dict]:
    """The judge's accuracy on renders of the personal concepts in random settings (what it scores)."""
    judge = ToyJudge.from_pretrained(JUDGE_FOLDER).eval()
    _, held_out = probe_specs(training=0)
    images = np.stack([exact_scene(spec).image for spec in held_out])
    scores = accuracy(judge, images, [spec.labels() for spec in held_out])
    figures = {f"{a}: concept renders": round(scores[a], 4) for a in IDENTITY}
    return figures, {"renders": len(held_out), "accuracy": {k: round(v, 4) for k, v in scores.items()}}


def gate_prompts(count: int, components_folder: str = "toy") -> tuple[dict, dict]:
    """Plain prompt adherence (`report.prompt_adherence`) of the shipped components, or of another
    components folder (one whose text encoder was taught compound words must keep it)."""
    from .report import prompt_adherence  # noqa: PLC0415

    components = load_components(components_folder, device="cpu", dtype=torch.float32)
    judge = ToyJudge.from_pretrained(JUDGE_FOLDER).eval()
    adherence = prompt_adherence(components, judge, count=count)
    adherence.pop("examples")
    figures = {"adherence: mean": adherence["mean_over_prompted_attributes"],
               "adherence: position": adherence["per_attribute"]["position"]}
    return figures, {"components": components_folder, **adherence}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m elite_tutorial.studies.gates", description=__doc__.splitlines()[0])
    parser.add_argument("gate", choices=[*sorted(TARGETS), "out-of-span"],
                        help="a gate, or out-of-span: the lesson's figures (Textual Inversion on what the model never learned)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the results files")
    parser.add_argument("--encoder", type=Path, default=None,
                        help="readable, mappable: an image encoder folder, or an encoder training checkpoint file")
    parser.add_argument("--components", default=None,
                        help="mappable (required), prompts: a components folder; for mappable one whose text encoder "
                             "reads compound words (compounds.py teach)")
    parser.add_argument("--training", type=int, default=6000, help="mappable: scenes the map is fitted on")
    parser.add_argument("--twins", action="store_true",
                        help="mappable: score the concepts' training twins instead (not the gate: its comparison)")
    parser.add_argument("--samples", type=int, default=8, help="drawable, mappable: images per concept and prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ti-profile", choices=sorted(TI_PROFILES), default="toy")
    parser.add_argument("--prompts", type=int, default=500, help="prompts: how many held-out prompts")
    parser.add_argument("--methods", default=",".join(DRAWABLE_METHODS),
                        help="drawable: which of its methods to score now (comma-separated; default all)")
    args = parser.parse_args(argv)
    command = " ".join(["python -m elite_tutorial.studies.gates", *(sys.argv[1:] if argv is None else argv)])
    started = time.perf_counter()
    if args.gate == "out-of-span":
        summaries = out_of_span(args.results, command, args.samples, args.seed, args.ti_profile)["methods"]
        print(json.dumps(summaries, indent=1))
        return
    if args.gate == "drawable":
        methods = tuple(args.methods.split(","))
        if unknown := set(methods) - set(DRAWABLE_METHODS):
            parser.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(DRAWABLE_METHODS)}")
        measured = gate_drawable(args.results, command, args.samples, args.seed, args.ti_profile, methods)
        if measured is None:
            return
        figures, details = measured
    elif args.gate == "readable":
        figures, details = gate_readable(args.encoder)
    elif args.gate == "mappable":
        if args.components is None:
            parser.error("mappable needs --components: a folder from `python -m elite_tutorial.studies.compounds teach`")
        figures, details = gate_mappable(args.results, command, args.components, args.encoder, args.samples,
                                         args.seed, args.training, args.twins)
        if args.twins:  # the comparison, not the gate: its figures are in the two method files
            print(json.dumps(details["methods"], indent=1))
            return
    elif args.gate == "judge":
        figures, details = gate_judge()
    else:
        figures, details = gate_prompts(args.prompts, args.components or "toy")
    # the prompts gate is the shipped components'; another folder's adherence is kept beside it
    name = f"prompts: {args.components}" if args.gate == "prompts" and args.components else args.gate
    entry = record_gate(args.results, args.gate, figures, details, command, time.perf_counter() - started, name)
    print(json.dumps({args.gate: {"passed": entry["passed"], **entry["targets"]}}, indent=1))


if __name__ == "__main__":
    main()
