"""A judge checked on what it scores: a second reader of the toy world's attributes, compared with the
toy judge on generated images.

The toy judge (`toyworld.judge.ToyJudge`) is validated on clean renders, yet every fidelity figure rests
on its reading of *generated* images, which are blurrier and stranger. A second reader, another
architecture (`ResidualReader`: residual blocks, BatchNorm, max-pooling) trained the same way on its
own scenes with its own seed, reads the same images. Where the two agree (per attribute: agreement
and Cohen's kappa, target agreement >= 0.9) the figures do not hang on one network's quirks; where they
disagree, a person looks (50 images, labelled by eye) and says which was right.

    python -m elite_tutorial.studies.judge_check train --out assets/toy-eval/second-reader --seed 1
    python -m elite_tutorial.studies.judge_check compare --out results/judge_check.json \\
        --figure docs/figures/judge_disagreements.png
    python -m elite_tutorial.studies.judge_check tally --out results/judge_check.json \\
        --eye-labels results/judge_check/eye_labels.json

`compare` generates 3 methods x 16 test concepts x 4 prompts x `--samples` images (cached as an .npz
under runs/, not committed), has both readers read all six attributes of each, and draws the
disagreements to label. `tally` reads the by-eye labels of those images and counts who was right.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..arguments import whole_number, writable_file
from ..components import ASSETS_DIR, load_components
from ..evaluation import (
    EDITS,
    IDENTITY,
    JUDGE_FOLDER,
    bootstrap_interval,
    class_word_generator,
    concept_identity,
    described_generator,
    edit_success,
    elite_generator,
)
from ..mappers import GlobalMapper
from ..pipeline import ELITEPipeline
from ..storage import write_json_atomic
from ..toyworld.concepts import CONCEPT_SETS
from ..toyworld.judge import AttributeReader, ResidualReader, ToyJudge, accuracy
from ..toyworld.render import ATTRIBUTES, exact_scene, random_spec
from .pretrain import HELD_OUT_SEED, Recipe, train_judge

SECOND_READER_FOLDER = ASSETS_DIR / "toy-eval" / "second-reader"
IMAGES_FILE = Path("runs/judge_check/generated.npz")
TARGET_AGREEMENT = 0.9
PROMPTS = {"fidelity": "a photo of a S", **{attribute: prompt for attribute, (prompt, _) in EDITS.items()}}
METHODS = {"class word": "C", "said in words": "W", "ELITE global": "E"}  # method: its letter in the figure
EYE_VERDICTS = ("judge", "second reader", "neither", "unclear")
# The recipe of the shipped second reader, sized for about ten minutes on one core of the 2-core CPU
# (the judge's: 1000 steps of 256 on a GPU). Its pool is its own: scenes from seed * 1e6 + 5e5 on.
SECOND_READER_RECIPE = Recipe(seed=1, pool_size=40_000, judge_steps=1800, judge_batch=64, judge_lr=2e-3,
                              warmup_steps=100, checkpoint_every=500)
HELD_OUT_RENDERS = 1000


# --------------------------------------------------------------------------------------------------
# The second reader.

def clean_accuracy(reader: AttributeReader, renders: int = HELD_OUT_RENDERS) -> dict[str, float]:
    """Per-attribute accuracy on `renders` clean single-object scenes from the held-out seeds (no
    training pool reaches them)."""
    specs = [random_spec(np.random.default_rng(HELD_OUT_SEED + i), 0.0) for i in range(renders)]
    images = np.stack([exact_scene(spec).image for spec in specs])
    return {name: round(value, 4) for name, value in accuracy(reader, images, [s.labels() for s in specs]).items()}


def train_second_reader(out: Path, recipe: Recipe, work: Path, command: str, width: int = 24) -> dict:
    """Train a `ResidualReader` as the judge is trained (`pretrain.train_judge`: its own pool, blur and
    noise), save it in fp16 to `out` with a record.json, and return the record. The folder is written
    whole (a staging folder, then a rename) or not at all."""
    started = time.perf_counter()
    reader, history = train_judge(recipe, work, torch.device("cpu"), make_reader=lambda: ResidualReader(width))
    seconds = time.perf_counter() - started
    staging = out.with_name(f"{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    reader.to(torch.float16).save_pretrained(staging)
    shipped = ResidualReader.from_pretrained(staging).eval()  # scored as it ships: fp16 weights, fp32 compute
    record = {"command": command, "seed": recipe.seed, "architecture": "ResidualReader",
              "width": width, "parameters": sum(p.numel() for p in shipped.parameters()),
              "recipe": {key: value for key, value in asdict(recipe).items()
                         if key in ("seed", "pool_size", "judge_steps", "judge_batch", "judge_lr", "warmup_steps")},
              "pool": f"{recipe.pool_size // 2} single-object scenes from seed {recipe.seed * 1_000_000 + 500_000} on",
              "device": f"cpu ({torch.get_num_threads()} threads)", "train_seconds": round(seconds, 1),
              "final_losses": history[-1] if history else None,
              "clean_accuracy": {"renders": HELD_OUT_RENDERS, "seeds": f"{HELD_OUT_SEED} on",
                                 "second_reader": clean_accuracy(shipped),
                                 "judge": clean_accuracy(ToyJudge.from_pretrained(JUDGE_FOLDER).eval())}}
    write_json_atomic(staging / "record.json", record)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return record


# --------------------------------------------------------------------------------------------------
# Agreement.

def cohen_kappa(first, second, classes=None) -> float:
    """Cohen's kappa of two raters' labels of the same items: (p_o - p_e) / (1 - p_e), with p_o their
    agreement and p_e the agreement expected by chance from each rater's own label frequencies. NaN
    when p_e = 1 (both give one and the same label to every item: kappa is undefined)."""
    first, second = np.asarray(first), np.asarray(second)
    if first.shape != second.shape or first.ndim != 1 or len(first) == 0:
        raise ValueError(f"two non-empty 1-d label sequences of one length are needed, got {first.shape} and {second.shape}")
    classes = np.union1d(first, second) if classes is None else np.asarray(classes)
    observed = float(np.mean(first == second))
    expected = float(sum(np.mean(first == c) * np.mean(second == c) for c in classes))
    if expected >= 1.0:
        return float("nan")
    return (observed - expected) / (1.0 - expected)


def _rounded(value: float) -> float | None:
    return None if np.isnan(value) else round(float(value), 3)


def agreement_table(judge: dict[str, np.ndarray], second: dict[str, np.ndarray], keep: np.ndarray | None = None) -> dict:
    """Per attribute: agreement, Cohen's kappa, whether agreement meets the target, and the commonest
    disagreements ("judge -> second reader": count), over the images where `keep` is true."""
    keep = np.ones(len(judge["shape"]), bool) if keep is None else keep
    table = {}
    for name, values in ATTRIBUTES.items():
        a, b = judge[name][keep], second[name][keep]
        agreement = float(np.mean(a == b))
        table[name] = {"agreement": round(agreement, 3), "kappa": _rounded(cohen_kappa(a, b, values)),
                       "meets_target": agreement >= TARGET_AGREEMENT,
                       "disagreements": {f"{x} -> {y}": n for (x, y), n in Counter(zip(a[a != b], b[a != b])).most_common(4)}}
    return table


# --------------------------------------------------------------------------------------------------
# The generated images.

def generate_images(samples: int, seed: int, concept_set: str = "test") -> dict[str, np.ndarray]:
    """All methods x prompts x concepts x samples, as arrays: images (n, 64, 64, 3) uint8, and per image
    its method, prompt key, concept index and sample index."""
    concepts = CONCEPT_SETS[concept_set]
    components = load_components("toy", device="cpu", dtype=torch.float32)
    pipe = ELITEPipeline(components, GlobalMapper.from_pretrained(ASSETS_DIR / "toy-global-mapper"))
    judge = ToyJudge.from_pretrained(JUDGE_FOLDER).eval()  # names the said-in-words identities (true labels here)
    generators = {"class word": class_word_generator(components, concepts, samples, seed, pipe.defaults),
                  "said in words": described_generator(components, judge, concepts, samples, seed, pipe.defaults),
                  "ELITE global": elite_generator(pipe, concepts, samples, seed)}
    columns: dict[str, list] = {"images": [], "method": [], "prompt": [], "concept": [], "sample": []}
    with torch.no_grad():
        for method, generate in generators.items():
            for key, prompt in PROMPTS.items():
                print(f"generating: {method}, {prompt!r}", file=sys.stderr)
                images = generate(prompt)
                columns["images"].append(images)
                columns["method"] += [method] * len(images)
                columns["prompt"] += [key] * len(images)
                columns["concept"] += [i // samples for i in range(len(images))]
                columns["sample"] += [i % samples for i in range(len(images))]
    return {"images": np.concatenate(columns.pop("images")), **{k: np.asarray(v) for k, v in columns.items()}}


def load_or_generate(path: Path, samples: int, seed: int) -> dict[str, np.ndarray]:
    """The generated images at `path` if they were made with these settings, else generate and save them."""
    if path.is_file():
        with np.load(path) as saved:
            generated = {key: saved[key] for key in saved.files}
        if int(generated.pop("samples")) == samples and int(generated.pop("seed")) == seed:
            return generated
    started = time.perf_counter()
    generated = generate_images(samples, seed)
    generated["seconds"] = np.asarray(round(time.perf_counter() - started, 1))  # kept with the images
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.stem}.partial.npz")
    np.savez_compressed(partial, samples=samples, seed=seed, **generated)
    partial.rename(path)
    return generated


def read_all(reader: AttributeReader, images: np.ndarray) -> dict[str, np.ndarray]:
    return {name: np.asarray(values) for name, values in reader.predict(images).items()}


def fidelity_under(reads: dict[str, np.ndarray], generated: dict[str, np.ndarray], method: str,
                   identities: list[dict[str, str]]) -> dict:
    """Fidelity (identity agreement on "a photo of a S"; and per identity attribute) and editability (`evaluation.edit_success`) of
    one method as one reader reads it, per concept and averaged, scored as `evaluation.score` scores."""
    rows = []
    for index, identity in enumerate(identities):
        mine = (generated["method"] == method) & (generated["concept"] == index)
        picked = {key: {name: list(values[mine & (generated["prompt"] == key)]) for name, values in reads.items()}
                  for key in PROMPTS}
        read_as_identity = {name: float(np.mean([p == identity[name] for p in picked["fidelity"][name]])) for name in IDENTITY}
        row = {"fidelity": float(np.mean(list(read_as_identity.values()))),
               **{f"fidelity_{name}": value for name, value in read_as_identity.items()}}
        row.update({f"edit_{a}": edit_success(picked[a], identity, a, wanted) for a, (_, wanted) in EDITS.items()})
        row["editability"] = float(np.mean([row[f"edit_{a}"] for a in EDITS]))
        rows.append(row)
    return {"summary": {key: round(float(np.mean([r[key] for r in rows])), 3) for key in rows[0]}, "concepts": rows}


# --------------------------------------------------------------------------------------------------
# The disagreements, labelled by eye.

def pick_disagreements(judge: dict[str, np.ndarray], second: dict[str, np.ndarray], count: int = 50,
                       seed: int = 0) -> list[dict]:
    """`count` (image, attribute) pairs where the readers disagree, drawn at random (seeded) from those on
    an identity attribute (shape, colour, pattern), filled from the other attributes if there are too
    few; sorted by image. Each: image index, attribute, the judge's and the second reader's reading."""
    rng = np.random.default_rng(seed)
    picks: list[tuple[int, str]] = []
    for attributes in (IDENTITY, tuple(a for a in ATTRIBUTES if a not in IDENTITY)):
        pairs = [(int(i), a) for a in attributes for i in np.flatnonzero(judge[a] != second[a])]
        need = min(count - len(picks), len(pairs))
        picks += [pairs[k] for k in sorted(rng.choice(len(pairs), size=need, replace=False))] if need > 0 else []
    picks.sort()
    return [{"pick": n + 1, "image": i, "attribute": a, "judge": str(judge[a][i]), "second_reader": str(second[a][i])}
            for n, (i, a) in enumerate(picks)]


def contact_sheet(images: np.ndarray, picks: list[dict], generated: dict[str, np.ndarray], path: Path,
                  columns: int = 10, scale: int = 2) -> None:
    """The picked images, upscaled `scale` times (nearest), each captioned with its pick number, method
    (C class word, W said in words, E ELITE), the disputed attribute, and both readings."""
    side, caption = 64 * scale, 40
    rows = -(-len(picks) // columns)
    sheet = Image.new("RGB", (columns * (side + 6) + 6, rows * (side + caption + 6) + 6), "white")
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default(size=11)
    for k, pick in enumerate(picks):
        x, y = 6 + (k % columns) * (side + 6), 6 + (k // columns) * (side + caption + 6)
        sheet.paste(Image.fromarray(images[pick["image"]]).resize((side, side), Image.NEAREST), (x, y))
        method = METHODS[str(generated["method"][pick["image"]])]
        draw.text((x, y + side + 1), f"#{pick['pick']} {method} {pick['attribute']}", fill="black", font=font)
        draw.text((x, y + side + 13), f"J: {pick['judge']}", fill=(0, 0, 160), font=font)
        draw.text((x, y + side + 25), f"R: {pick['second_reader']}", fill=(160, 0, 0), font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.stem}.partial.png")
    sheet.quantize(256).save(partial, optimize=True)  # a palette keeps the sheet small
    partial.rename(path)


def tally(picks: list[dict], eye_labels_file: Path) -> dict:
    """Who was right on the picked disagreements, from the by-eye labels (checked against the picks: the
    same image and attribute under each pick number, so labels of an older figure are refused)."""
    labelled = json.loads(eye_labels_file.read_text())
    labels = {entry["pick"]: entry for entry in labelled["labels"]}
    stale = [p["pick"] for p in picks if p["pick"] not in labels
             or (labels[p["pick"]]["image"], labels[p["pick"]]["attribute"]) != (p["image"], p["attribute"])]
    if stale:
        raise ValueError(f"{eye_labels_file} does not label the current figure's picks {stale[:5]}...: the images "
                         "were picked again; label the new figure by eye.")
    if bad := sorted({entry["verdict"] for entry in labels.values()} - set(EYE_VERDICTS)):
        raise ValueError(f"{eye_labels_file}: unknown verdicts {bad}; use one of {', '.join(EYE_VERDICTS)}.")
    verdicts = [labels[p["pick"]]["verdict"] for p in picks]
    def counts(key) -> dict[str, dict[str, int]]:
        return {group: dict(Counter(labels[p["pick"]]["verdict"] for p in picks if key(p) == group))
                for group in dict.fromkeys(key(p) for p in picks)}
    return {"labelled": len(verdicts), "verdicts": {v: verdicts.count(v) for v in EYE_VERDICTS},
            "by_attribute": counts(lambda p: p["attribute"]),
            "by_readings": counts(lambda p: f"{p['attribute']}: {p['judge']} -> {p['second_reader']}"),
            "by_method": counts(lambda p: p.get("method", "unknown")), "figure": labelled.get("figure")}


# --------------------------------------------------------------------------------------------------

def compare(args, command: str) -> dict:
    started = time.perf_counter()
    generated = load_or_generate(args.images, args.samples, args.seed)
    judge = ToyJudge.from_pretrained(JUDGE_FOLDER).eval()
    second = ResidualReader.from_pretrained(args.second_reader).eval()
    judge_reads, second_reads = read_all(judge, generated["images"]), read_all(second, generated["images"])
    concepts = CONCEPT_SETS["test"]
    identities = [concept_identity(judge, c) for c in concepts]
    fidelity = {}
    for method in METHODS:
        under = {"judge": fidelity_under(judge_reads, generated, method, identities),
                 "second reader": fidelity_under(second_reads, generated, method, identities)}
        difference = [j["fidelity"] - s["fidelity"] for j, s in zip(under["judge"]["concepts"], under["second reader"]["concepts"])]
        fidelity[method] = {"judge": under["judge"]["summary"], "second reader": under["second reader"]["summary"],
                            "fidelity_difference": round(float(np.mean(difference)), 3),
                            "fidelity_difference_interval": bootstrap_interval(difference)}
    picks = [{**pick, "method": str(generated["method"][pick["image"]]), "prompt": str(generated["prompt"][pick["image"]])}
             for pick in pick_disagreements(judge_reads, second_reads, args.picks, args.seed)]
    contact_sheet(generated["images"], picks, generated, args.figure)
    record = json.loads((Path(args.second_reader) / "record.json").read_text())
    identity_disagreements = int(sum(np.sum(judge_reads[a] != second_reads[a]) for a in IDENTITY))
    # on an identity attribute the concept's own value is what a method aims at: whose reading is it?
    matching = Counter()
    for a in IDENTITY:
        wanted = np.array([identities[c][a] for c in generated["concept"]])
        differ = judge_reads[a] != second_reads[a]
        matching["judge"] += int(np.sum(differ & (judge_reads[a] == wanted)))
        matching["second reader"] += int(np.sum(differ & (second_reads[a] == wanted)))
        matching["neither"] += int(np.sum(differ & (judge_reads[a] != wanted) & (second_reads[a] != wanted)))
    report = {
        "command": command,
        "images": {"count": len(generated["images"]), "methods": list(METHODS), "prompts": PROMPTS,
                   "concepts": "test (16)", "samples_per_prompt": args.samples, "seed": args.seed,
                   "generation_seconds": float(generated["seconds"]), "file": _relative(args.images) + " (not committed)"},
        "readers": {"judge": "ToyJudge, assets/toy-eval/judge",
                    "second reader": f"ResidualReader, {_relative(args.second_reader)}, seed {record['seed']}"},
        "second_reader_clean_accuracy": record["clean_accuracy"],
        "target_agreement": TARGET_AGREEMENT,
        "agreement": agreement_table(judge_reads, second_reads),
        "agreement_by_method": {m: {a: {k: v for k, v in row.items() if k in ("agreement", "kappa")}
                                    for a, row in agreement_table(judge_reads, second_reads, generated["method"] == m).items()}
                                for m in METHODS},
        "fidelity_by_reader": fidelity,
        "disagreements": {"identity_attribute_pairs": identity_disagreements,
                          "images_with_any_identity_disagreement": int(np.sum(np.any(
                              [judge_reads[a] != second_reads[a] for a in IDENTITY], axis=0))),
                          "whose_reading_is_the_concepts_value": dict(matching),
                          "figure": _relative(args.figure), "picked": picks},
        "seconds": round(time.perf_counter() - started, 1),  # this run (the images may have been read back)
    }
    if args.eye_labels.is_file():
        report["eye_labels"] = {"file": _relative(args.eye_labels), **tally(picks, args.eye_labels)}
    return report


def _relative(path: Path) -> str:
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path.name


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m elite_tutorial.studies.judge_check", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train the second reader and save it with its record")
    train.add_argument("--out", type=Path, default=SECOND_READER_FOLDER)
    train.add_argument("--seed", type=int, default=SECOND_READER_RECIPE.seed)
    train.add_argument("--steps", type=whole_number(1), default=SECOND_READER_RECIPE.judge_steps)
    train.add_argument("--batch", type=whole_number(1), default=SECOND_READER_RECIPE.judge_batch)
    train.add_argument("--work", type=Path, default=Path("runs/judge_check/second-reader.work"),
                       help="checkpoints and the rendered pool (a rerun resumes from here)")
    for name, help_text in (("compare", "generate, read with both readers, draw the disagreements"),
                            ("tally", "count the by-eye labels into the results file")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--out", type=writable_file, default=Path("results/judge_check.json"))
        sub.add_argument("--eye-labels", type=Path, default=Path("results/judge_check/eye_labels.json"))
        if name == "compare":
            sub.add_argument("--figure", type=Path, default=Path("docs/figures/judge_disagreements.png"))
            sub.add_argument("--second-reader", type=Path, default=SECOND_READER_FOLDER)
            sub.add_argument("--images", type=Path, default=IMAGES_FILE, help="generated images (made if missing)")
            sub.add_argument("--samples", type=whole_number(1), default=2, help="images per concept and prompt")
            sub.add_argument("--seed", type=int, default=0)
            sub.add_argument("--picks", type=whole_number(1), default=50, help="disagreements to draw for labelling")
    args = parser.parse_args(argv)
    command = " ".join(["python -m elite_tutorial.studies.judge_check", *(sys.argv[1:] if argv is None else argv)])
    if args.command == "train":
        recipe = Recipe(**{**asdict(SECOND_READER_RECIPE), "seed": args.seed, "judge_steps": args.steps,
                           "judge_batch": args.batch})
        record = train_second_reader(args.out, recipe, args.work, command)
        print(json.dumps(record["clean_accuracy"], indent=1))
    elif args.command == "compare":
        report = compare(args, command)
        write_json_atomic(args.out, report)
        print(json.dumps({k: report[k] for k in ("agreement", "fidelity_by_reader")}, indent=1))
    else:
        report = json.loads(args.out.read_text())
        report["eye_labels"] = {"file": _relative(args.eye_labels), "command": command,
                                **tally(report["disagreements"]["picked"], args.eye_labels)}
        write_json_atomic(args.out, report)
        print(json.dumps(report["eye_labels"], indent=1))


if __name__ == "__main__":
    main()
