"""Measuring ELITE on the toy world, where the toy judge reads every attribute of an image.

- A concept's *identity* is what the judge sees in its own reference views: the majority vote of
  its shape, colour and pattern predictions over the views (a teal heart may read as a green or a
  blue heart; whichever it reads as, generated images should read the same).
- *Fidelity*: the mean agreement of generated images with that identity (3 attributes), for
  "a photo of a S" with w0 injected. The class-word baseline generates "a photo of a <shape>"
  with the plain model and is scored the same way.
- *Editability*: for each edit prompt ("a photo of a S on the left", "... on a grass background",
  "a photo of a small S"), the fraction of images that show the edit and keep the identity
  (at least 2 of its 3 attributes).

    python -m elite_tutorial.evaluation --mapper assets/toy-global-mapper
    python -m elite_tutorial.evaluation --local-mapper assets/toy-local-mapper --local-scale 0.8
"""
from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from .components import ASSETS_DIR, load_components
from .mappers import GlobalMapper, LocalMapper
from .pipeline import ELITEPipeline
from .toyworld.concepts import CONCEPTS, PersonalConcept, concept_views
from .toyworld.judge import ToyJudge

IDENTITY = ("shape", "colour", "pattern")
EDITS = {  # attribute -> (prompt, the value it asks for)
    "position": ("a photo of a S on the left", "left"),
    "background": ("a photo of a S, on a grass background", "grass"),
    "size": ("a photo of a small S", "small"),
}
JUDGE_FOLDER = ASSETS_DIR / "toy-eval" / "judge"


def concept_identity(judge: ToyJudge, concept: PersonalConcept) -> dict[str, str]:
    """The judge's majority reading of the concept's shape, colour and pattern over its views."""
    predictions = judge.predict(np.stack([image for image, _ in concept_views(concept)]))
    return {name: Counter(predictions[name]).most_common(1)[0][0] for name in IDENTITY}


def _agreement(predictions: dict[str, list[str]], identity: dict[str, str]) -> np.ndarray:
    """Per image: the fraction of identity attributes the judge reads as the concept's."""
    return np.mean([[p == identity[name] for p in predictions[name]] for name in IDENTITY], axis=0)


def _images(output) -> np.ndarray:
    return (output.images * 255).round().astype(np.uint8)


@torch.no_grad()
def fidelity_and_editability(pipe: ELITEPipeline, judge: ToyJudge, concepts=CONCEPTS, samples: int = 4,
                             seed: int = 0, local_scale: float = 0.8) -> dict:
    """ELITE (w0) fidelity and editability vs the class-word baseline, over `concepts` (see module doc).

    Each concept is encoded from its first view and that view's mask (the mask only feeds a local
    mapper, when the pipeline has one, at λ = `local_scale`). Each prompt is generated for all
    concepts in one batched call (`samples` images per concept).
    """
    plain = pipe.components.text_to_image_pipeline()
    for p in (plain, pipe.sd_pipeline):
        p.set_progress_bar_config(disable=True)
    steps, guidance = pipe.defaults.num_inference_steps, pipe.defaults.guidance_scale
    identities = [concept_identity(judge, c) for c in concepts]
    encoded = [pipe.encode(*concept_views(c)[0]) for c in concepts]

    def per_concept(predictions: dict[str, list[str]]) -> list[dict[str, list[str]]]:
        """Split batched predictions (concept-major, `samples` each) by concept."""
        return [{k: v[i * samples:(i + 1) * samples] for k, v in predictions.items()} for i in range(len(concepts))]

    def elite(prompt: str) -> list[dict[str, list[str]]]:
        out = pipe([prompt] * len(concepts), encoded, generator=torch.Generator().manual_seed(seed),
                   num_images_per_prompt=samples, output_type="np", local_scale=local_scale)
        return per_concept(judge.predict(_images(out)))

    baseline = per_concept(judge.predict(_images(plain(
        [f"a photo of a {c.class_word}" for c in concepts], num_inference_steps=steps, guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed), num_images_per_prompt=samples, output_type="np"))))
    inverted = elite("a photo of a S")
    edits = {attribute: elite(prompt) for attribute, (prompt, _) in EDITS.items()}
    rows = []
    for index, (concept, identity) in enumerate(zip(concepts, identities)):
        row = {"concept": concept.name, "identity": identity,
               "fidelity": float(_agreement(inverted[index], identity).mean()),
               "baseline_fidelity": float(_agreement(baseline[index], identity).mean())}
        for attribute, (_, wanted) in EDITS.items():
            predictions = edits[attribute][index]
            edited = np.array([p == wanted for p in predictions[attribute]])
            kept = _agreement(predictions, identity) >= 2 / 3
            row[f"edit_{attribute}"] = float((edited & kept).mean())
        rows.append(row)
    mean = lambda key: round(float(np.mean([r[key] for r in rows])), 3)  # noqa: E731
    summary = {"fidelity": mean("fidelity"), "baseline_fidelity": mean("baseline_fidelity")}
    summary.update({f"edit_{a}": mean(f"edit_{a}") for a in EDITS})
    summary["editability"] = round(float(np.mean([summary[f"edit_{a}"] for a in EDITS])), 3)
    summary["fidelity_gain_over_baseline"] = round(summary["fidelity"] - summary["baseline_fidelity"], 3)
    return {"summary": summary, "concepts": rows, "samples_per_prompt": samples, "steps": steps,
            "guidance_scale": guidance, "local_scale": local_scale if pipe.local_mapper is not None else None}


def encode_milliseconds(pipe: ELITEPipeline, repeats: int = 20) -> float:
    """Median wall time of `encode` on one concept view and its mask (after one warm-up call)."""
    image, mask = concept_views(CONCEPTS[0])[0]
    pipe.encode(image, mask)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        pipe.encode(image, mask)
        times.append(time.perf_counter() - start)
    return round(1000 * float(np.median(times)), 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="ELITE's fidelity and editability on the toy world (JSON).")
    parser.add_argument("--mapper", type=Path, default=ASSETS_DIR / "toy-global-mapper")
    parser.add_argument("--local-mapper", type=Path, help="also run ELITE's local branch with this LocalMapper")
    parser.add_argument("--local-scale", type=float, default=0.8, help="λ of the local branch")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    components = load_components("toy", device="cpu")
    local_mapper = LocalMapper.from_pretrained(args.local_mapper) if args.local_mapper else None
    pipe = ELITEPipeline(components, GlobalMapper.from_pretrained(args.mapper), local_mapper)
    judge = ToyJudge.from_pretrained(JUDGE_FOLDER).eval()
    report = fidelity_and_editability(pipe, judge, samples=args.samples, seed=args.seed, local_scale=args.local_scale)
    report["encode_ms_cpu"] = encode_milliseconds(pipe)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
