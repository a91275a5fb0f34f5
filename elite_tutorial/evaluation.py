"""Measuring ELITE on the toy world, where the toy judge reads every attribute of an image.

- A concept's *identity* is its true shape, colour and pattern (`PersonalConcept.labels()`, written
  to `assets/concepts/labels.json`). For the out-of-span concepts, which have no such labels, it is
  what the judge sees in their own reference views (the majority vote over the views).
- *Fidelity*: the mean agreement of generated images with that identity (3 attributes), for
  "a photo of a S" with w0 injected. The class-word baseline generates "a photo of a <shape>"
  with the plain model and is scored the same way.
- *Editability*: for each edit prompt ("a photo of a S on the left", "... on a grass background",
  "a photo of a small S"), the fraction of images that show the edit and keep the identity
  (at least 2 of its 3 attributes).
- Both come with 95 % bootstrap intervals over concepts (`bootstrap_interval`): with sixteen
  concepts, which concepts happen to be chosen moves a mean more than anything else.

    python -m elite_tutorial.evaluation --mapper assets/toy-global-mapper
    python -m elite_tutorial.evaluation --mapper runs/a/mapper --concepts validation   # choosing a recipe
    python -m elite_tutorial.evaluation --local-mapper assets/toy-local-mapper --local-scale 0.8
    python -m elite_tutorial.evaluation --described   # with the reference described in words, plain
                                                      # and through the mapper's k/v copies
    python -m elite_tutorial.evaluation --components toy-sd-compound --mapper <run>/mapper   # other toy components
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .arguments import finite_number, whole_number, writable_file
from .attention import elite_attention
from .components import ASSETS_DIR, load_components
from .mappers import GlobalMapper, LocalMapper
from .metrics import MetricModels, clip_i, clip_t, dino_i, with_class_word
from .pipeline import DEFAULT_LOCAL_SCALE, TOY_DEFAULTS, ELITEPipeline, SamplingDefaults
from .storage import write_json_atomic
from .toyworld.concepts import CONCEPT_SETS, CONCEPTS, Concept, PersonalConcept, concept_views
from .toyworld.judge import ToyJudge
from .toyworld.render import described
from .words import compound_embeddings, encode_prompts_with_words

IDENTITY = ("shape", "colour", "pattern")
EDITS = {  # attribute -> (prompt, the value it asks for)
    "position": ("a photo of a S on the left", "left"),
    "background": ("a photo of a S, on a grass background", "grass"),
    "size": ("a photo of a small S", "small"),
}
JUDGE_FOLDER = ASSETS_DIR / "toy-eval" / "judge"


def concept_identity(judge: ToyJudge, concept: Concept) -> dict[str, str]:
    """The concept's shape, colour and pattern: its true labels, or for an out-of-span concept (which
    the toy vocabulary cannot label) the judge's majority reading of them over its views."""
    if isinstance(concept, PersonalConcept):
        return concept.labels()
    predictions = judge.predict(np.stack([image for image, _ in concept_views(concept)]))
    return {name: Counter(predictions[name]).most_common(1)[0][0] for name in IDENTITY}


def _agreement(predictions: dict[str, list[str]], identity: dict[str, str]) -> np.ndarray:
    """Per image: the fraction of identity attributes the judge reads as the concept's."""
    return np.mean([[p == identity[name] for p in predictions[name]] for name in IDENTITY], axis=0)


def edit_success(predictions: dict[str, list[str]], identity: dict[str, str], attribute: str, wanted: str) -> float:
    """The share of images that show an edit and keep the concept: the judge reads `attribute` as
    `wanted` and at least 2 of the concept's 3 identity attributes as the concept's."""
    edited = np.array([p == wanted for p in predictions[attribute]])
    return float((edited & (_agreement(predictions, identity) >= 2 / 3)).mean())


def _images(output) -> np.ndarray:
    return (output.images * 255).round().astype(np.uint8)


# A method under evaluation: a prompt with the placeholder S -> uint8 images (concepts x samples, H, W, 3),
# concept-major, one batch for all concepts, seeded.
Generate = Callable[[str], np.ndarray]


def elite_generator(pipe: ELITEPipeline, concepts=CONCEPTS, samples: int = 8, seed: int = 0,
                    local_scale: float | None = None) -> Generate:
    """ELITE (w0; the local branch at λ = `local_scale`, default 0.8, if the pipeline has a local mapper), each
    concept encoded once from its first view and that view's mask."""
    pipe.sd_pipeline.set_progress_bar_config(disable=True)
    encoded = [pipe.encode(*concept_views(c)[0]) for c in concepts]
    return lambda prompt: _images(pipe([prompt] * len(concepts), encoded, generator=torch.Generator().manual_seed(seed),
                                       num_images_per_prompt=samples, output_type="np", local_scale=local_scale))


def prompt_embeds_generator(components, embeds: Callable[[str], torch.Tensor], samples: int, seed: int,
                            defaults: SamplingDefaults) -> Generate:
    """The plain text-to-image pipeline on prompt embeddings `embeds(prompt)` (concepts, 77, width)."""
    plain = components.text_to_image_pipeline()
    plain.set_progress_bar_config(disable=True)
    return lambda prompt: _images(plain(
        prompt_embeds=embeds(prompt), num_inference_steps=defaults.num_inference_steps,
        guidance_scale=defaults.guidance_scale, generator=torch.Generator().manual_seed(seed),
        num_images_per_prompt=samples, output_type="np"))


def words_generator(components, words: list[str], samples: int = 8, seed: int = 0,
                    defaults: SamplingDefaults = TOY_DEFAULTS) -> Generate:
    """The plain model with `words[i]` written where S was, for concept i."""
    c = components

    @torch.no_grad()
    def embeds(prompt: str) -> torch.Tensor:
        ids = c.tokenizer([with_class_word(prompt, phrase) for phrase in words], padding="max_length",
                          max_length=c.tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        return c.text_encoder(ids.to(c.device))[0]

    return prompt_embeds_generator(c, embeds, samples, seed, defaults)


def textual_inversion_generator(components, embeddings: torch.Tensor, samples: int, seed: int, defaults):
    """One word per concept (concepts, width) at S, through the plain pipeline: Textual Inversion's, or
    any other single token (a compound word, `compound_generator`)."""
    c = components

    @torch.no_grad()
    def embeds(prompt: str) -> torch.Tensor:
        words = embeddings.to(c.device, c.text_encoder.dtype)[:, None]
        return encode_prompts_with_words([prompt] * len(embeddings), words, c.tokenizer, c.text_encoder)

    return prompt_embeds_generator(c, embeds, samples, seed, defaults)


def class_word_generator(components, concepts=CONCEPTS, samples: int = 8, seed: int = 0,
                         defaults: SamplingDefaults = TOY_DEFAULTS) -> Generate:
    """The lower bound: the plain model with each concept's class word where S was ("a photo of a heart")."""
    return words_generator(components, [concept.class_word for concept in concepts], samples, seed, defaults)


def described_generator(components, judge: ToyJudge, concepts=CONCEPTS, samples: int = 8, seed: int = 0,
                        defaults: SamplingDefaults = TOY_DEFAULTS) -> Generate:
    """A reference, not a method: the plain model with S replaced by each concept's identity in words
    ("a photo of a red dotted heart": its true labels, or the judge's reading of an out-of-span
    concept). It is told the answer, so it shows what the toy model can draw from the toy language's
    words, the room a method that turns a concept into word embeddings has to work in."""
    words = [described(concept_identity(judge, concept)) for concept in concepts]
    return words_generator(components, words, samples, seed, defaults)


def compound_generator(components, judge: ToyJudge, concepts=CONCEPTS, samples: int = 8, seed: int = 0,
                       defaults: SamplingDefaults = TOY_DEFAULTS) -> Generate:
    """The same reference said as one token: each concept's identity fused into a compound
    word (`words.compound_embeddings`: the sum of its words' embeddings) at S. One token is all w0 is, so
    this is what w0 could draw if it wrote the identity in the text encoder's own terms."""
    phrases = [described(concept_identity(judge, concept)) for concept in concepts]
    return textual_inversion_generator(components, compound_embeddings(components, phrases), samples, seed, defaults)


def through_key_values(generate: Generate, components, mapper: GlobalMapper) -> Generate:
    """`generate` with `mapper`'s k/v copies in place of the UNet's own in every cross-attention layer.

    ELITE reads *all* text context through the copies it trains, the words of the prompt included, so
    how far training moves them decides how well "on the left" is still followed. Scoring the
    described-in-words reference through them measures that, apart from what the mapper's words say."""
    def generate_through_copies(prompt: str) -> np.ndarray:
        with elite_attention(components.unet, mapper):
            return generate(prompt)
    return generate_through_copies


def method_file(folder: str | Path, method: str) -> Path:
    """Where `method`'s results file lives in `folder`: "Textual Inversion" -> textual_inversion.json,
    "fitted map (training identities)" -> fitted_map_training_identities.json."""
    return Path(folder) / f"{re.sub(r'[^a-z0-9]+', '_', method.lower()).strip('_')}.json"


def record_method(folder: str | Path, method: str, scores: dict, command: str, **settings) -> Path:
    """One method's scores (`score`'s summary and rows) as `folder/<method>.json`, with the command that
    made them and its settings: the file every table and chapter reads."""
    path = method_file(folder, method)
    write_json_atomic(path, {"method": method, "command": command, **settings, **scores})
    return path


def bootstrap_interval(values, confidence: float = 0.95, resamples: int = 10_000, seed: int = 0) -> list[float]:
    """The percentile bootstrap interval of the mean of `values` (one per concept): [low, high]."""
    values = np.asarray(values, dtype=np.float64)
    picks = np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))
    means = values[picks].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    return [round(float(np.percentile(means, tail)), 3), round(float(np.percentile(means, 100 - tail)), 3)]



def with_interval(summary: dict, figure: str, interval_digits: int = 3) -> str:
    """A figure of a summary and its interval as one string, "0.806 [0.767, 0.844]": the way every
    table here prints it (`summary[figure]` and `summary[figure + "_interval"]`)."""
    low, high = summary[f"{figure}_interval"]
    return f"{summary[figure]:.3f} [{low:.{interval_digits}f}, {high:.{interval_digits}f}]"

def score(generate: Generate, judge: ToyJudge, concepts=CONCEPTS, samples: int = 8,
          metrics: MetricModels | None = None, progress: bool = False) -> dict:
    """The toy judge's fidelity and editability of a method (see the module doc), and with `metrics`
    the paper's CLIP-T (all four prompts, the class word read in place of S), CLIP-I and DINO-I (all
    generated images against the concept's four views). Returns {"summary": means, with 95 % bootstrap
    intervals over concepts for fidelity, editability and the metrics, "concepts": rows}."""
    prompts = {"fidelity": "a photo of a S", **{attribute: prompt for attribute, (prompt, _) in EDITS.items()}}
    generated = {key: generate(prompt) for key, prompt in tqdm(prompts.items(), desc="prompts", leave=False,
                                                                  disable=not progress)}
    rows = []
    for index, concept in enumerate(concepts):
        views = [image for image, _ in concept_views(concept)]
        identity = concept_identity(judge, concept)
        mine = {key: images[index * samples:(index + 1) * samples] for key, images in generated.items()}
        row = {"concept": concept.name, "identity": identity,
               "fidelity": float(_agreement(judge.predict(mine["fidelity"]), identity).mean())}
        for attribute, (_, wanted) in EDITS.items():
            row[f"edit_{attribute}"] = edit_success(judge.predict(mine[attribute]), identity, attribute, wanted)
        row["editability"] = float(np.mean([row[f"edit_{attribute}"] for attribute in EDITS]))
        if metrics is not None:
            everything = np.concatenate(list(mine.values()))
            texts = [with_class_word(prompts[key], concept.class_word) for key in mine for _ in range(samples)]
            row["clip_t"] = float(clip_t(metrics, everything, texts).mean())
            row["clip_i"] = float(clip_i(metrics, everything, views).mean())
            row["dino_i"] = float(dino_i(metrics, everything, views).mean())
        rows.append(row)
    summary = {key: round(float(np.mean([r[key] for r in rows])), 3) for key in rows[0] if key not in ("concept", "identity")}
    for key in ("fidelity", "editability", "clip_t", "clip_i", "dino_i"):
        if key in rows[0]:
            summary[f"{key}_interval"] = bootstrap_interval([r[key] for r in rows])
    return {"summary": summary, "concepts": rows}


@torch.no_grad()
def fidelity_and_editability(pipe: ELITEPipeline, judge: ToyJudge, concepts=CONCEPTS, samples: int = 8,
                             seed: int = 0, local_scale: float | None = None, with_baseline: bool = True) -> dict:
    """ELITE (w0) fidelity and editability vs the class-word baseline, over `concepts` (see module doc).

    Each concept is encoded from its first view and that view's mask (the mask feeds a global mapper
    that reads the object alone, and a local mapper, when the pipeline has one, at λ =
    `local_scale`). Each prompt is generated for all concepts in one batched call (`samples` images
    per concept). `with_baseline=False` leaves the class word out (it does not depend on the mapper,
    so a sweep over mappers or λ needs it once).
    """
    elite = score(elite_generator(pipe, concepts, samples, seed, local_scale), judge, concepts, samples)
    summary = {"fidelity": elite["summary"]["fidelity"], "fidelity_interval": elite["summary"]["fidelity_interval"]}
    rows = elite["concepts"]
    if with_baseline:
        baseline = score(class_word_generator(pipe.components, concepts, samples, seed, pipe.defaults), judge, concepts, samples)
        rows = [{**row, "baseline_fidelity": base["fidelity"]} for row, base in zip(rows, baseline["concepts"])]
        summary["baseline_fidelity"] = baseline["summary"]["fidelity"]
        summary["fidelity_gain_over_baseline"] = round(summary["fidelity"] - summary["baseline_fidelity"], 3)
    summary.update({key: value for key, value in elite["summary"].items() if key.startswith("edit")})
    return {"summary": summary, "concepts": rows, "samples_per_prompt": samples, "steps": pipe.defaults.num_inference_steps,
            "guidance_scale": pipe.defaults.guidance_scale,
            "local_scale": None if pipe.local_mapper is None else DEFAULT_LOCAL_SCALE if local_scale is None else local_scale}


@torch.no_grad()
def word_norms(pipe: ELITEPipeline, concepts=CONCEPTS) -> dict[str, list[float] | float]:
    """The mean L2 norm of each word w0..w4 over the concepts (first views), beside the mean and the
    largest norm of the text encoder's token embeddings: how far from the vocabulary the words sit."""
    words = torch.stack([pipe.encode(*concept_views(c)[0]).words for c in concepts])  # (concepts, 5, width)
    vocabulary = pipe.components.text_encoder.get_input_embeddings().weight.norm(dim=-1)
    return {"words": [round(float(n), 3) for n in words.norm(dim=-1).mean(dim=0)],
            "vocabulary_mean": round(float(vocabulary.mean()), 3), "vocabulary_max": round(float(vocabulary.max()), 3)}


def encode_seconds(pipe: ELITEPipeline, views: list[tuple]) -> list[float]:
    """Wall time of `pipe.encode(image, mask)` for each (image, mask) of `views`, after one warm-up call."""
    pipe.encode(*views[0])
    times = []
    for image, mask in views:
        start = time.perf_counter()
        pipe.encode(image, mask)
        times.append(time.perf_counter() - start)
    return times


def encode_milliseconds(pipe: ELITEPipeline, repeats: int = 20) -> float:
    """Median wall time of `encode` on one concept view and its mask, in milliseconds."""
    return round(1000 * float(np.median(encode_seconds(pipe, [concept_views(CONCEPTS[0])[0]] * repeats))), 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="ELITE's fidelity and editability on the toy world (JSON).")
    parser.add_argument("--mapper", type=Path, default=ASSETS_DIR / "toy-global-mapper")
    parser.add_argument("--components", default="toy",
                        help="the toy preset, or a toy components folder (e.g. one taught compound words)")
    parser.add_argument("--local-mapper", type=Path, help="also run ELITE's local branch with this LocalMapper")
    parser.add_argument("--local-scale", type=finite_number(), help="λ of the local branch (default 0.8; needs --local-mapper)")
    parser.add_argument("--concepts", choices=sorted(CONCEPT_SETS), default="test",
                        help="score the sixteen test concepts, the sixteen validation ones (held out alike) on "
                             "which recipes and checkpoints are chosen, or the test concepts' training twins "
                             "(identities seen in training: generalisation)")
    parser.add_argument("--samples", type=whole_number(1), default=8, help="images per concept and prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=writable_file, help="also write the report, with this command, to this JSON file")
    parser.add_argument("--device", default="cpu", help="the README's figures are from the CPU (fp32 either way)")
    parser.add_argument("--without-class-word", action="store_true",
                        help="leave the class-word baseline out (it does not depend on the mapper: a sweep over "
                             "mappers needs it once)")
    parser.add_argument("--described", action="store_true",
                        help="also score the reference that writes the judge's reading of each concept in words "
                             "(and as one compound word)")
    args = parser.parse_args(argv)
    if args.local_scale and not args.local_mapper:
        parser.error("--local-scale scales the local branch: give --local-mapper too.")
    components = load_components(args.components, device=args.device, dtype=torch.float32)
    local_mapper = LocalMapper.from_pretrained(args.local_mapper) if args.local_mapper else None
    pipe = ELITEPipeline(components, GlobalMapper.from_pretrained(args.mapper), local_mapper)
    judge = ToyJudge.from_pretrained(JUDGE_FOLDER).eval()
    report = fidelity_and_editability(pipe, judge, CONCEPT_SETS[args.concepts], samples=args.samples, seed=args.seed,
                                      local_scale=args.local_scale, with_baseline=not args.without_class_word)
    report["concept_set"] = args.concepts
    report["encode_ms_cpu"] = encode_milliseconds(pipe)
    report["word_norms"] = word_norms(pipe)
    with torch.no_grad():  # how far training moved the k/v copies from the UNet's own (0: not at all)
        report["key_value_drift"] = round(float(pipe.global_mapper.key_value_drift(components.unet)), 4)
    if args.described:
        reference = described_generator(components, judge, samples=args.samples, seed=args.seed)  # seeded per call
        report["described_in_words"] = score(reference, judge, samples=args.samples)["summary"]
        compound = compound_generator(components, judge, samples=args.samples, seed=args.seed)
        report["described_as_one_compound_word"] = score(compound, judge, samples=args.samples)["summary"]
        through = through_key_values(reference, components, pipe.global_mapper)
        report["described_in_words_through_the_mapper_key_values"] = score(through, judge, samples=args.samples)["summary"]
    if args.out:
        command = " ".join(["python -m elite_tutorial.evaluation", *(sys.argv[1:] if argv is None else argv)])
        write_json_atomic(args.out, {"command": command, **report})
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
