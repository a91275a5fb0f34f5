"""One recipe over several seeds, as one figure.

Seeds move the toy figures by up to 0.2, so a trained method is reported over three of them: for each
concept, the mean of its figure over the seeds; the method's figure, the mean of those over the
concepts, with a 95 % bootstrap interval over concepts (`evaluation.bootstrap_interval`); and the
seeds' spread, the standard deviation of the per-seed means. The inputs are the reports that
`python -m elite_tutorial.evaluation --out` writes, one per seed, on the same concepts.

    python -m elite_tutorial.seed_summary results/elite_v2/global_seed0.json results/elite_v2/global_seed1.json \\
        results/elite_v2/global_seed2.json --out results/elite_v2/global.json

With `--minus`, one more report per seed (the same seeds in the same order), the figure is a paired
difference: each seed's report minus its partner, concept by concept, before the averages. That is how
a change to one recipe is read (the local branch added to a global mapper of the same seed): the
concepts' own difficulty cancels, and the interval is the difference's, not two overlapping ones.

    python -m elite_tutorial.seed_summary results/elite_v2/global_local_seed{0,1,2}.json \\
        --minus results/elite_v2/global_seed{0,1,2}.json --out results/elite_v2/local_gain.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from .arguments import writable_file
from .evaluation import bootstrap_interval
from .storage import write_json_atomic

FIGURES = ("fidelity", "edit_position", "edit_background", "edit_size", "editability")


def summarise_seeds(reports: list[dict], minus: list[dict] | None = None) -> dict:
    """reports: one `evaluation` report per seed, each with "concepts" rows on the same concepts in the
    same order; minus: optional, one partner report per seed, subtracted concept by concept (a paired
    difference). Returns {"seeds": n, "concepts": names, "<figure>": mean over seeds and concepts,
    "<figure>_interval": [low, high] over concepts, "<figure>_seed_sd": spread of the per-seed means,
    "<figure>_per_seed": the per-seed means} for fidelity, the three edits and editability."""
    if len(reports) < 2:
        raise ValueError(f"A seed summary needs at least two reports, got {len(reports)}.")
    if minus is not None and len(minus) != len(reports):
        raise ValueError(f"--minus needs one report per seed: {len(reports)} reports, {len(minus)} to subtract.")
    names = [[row["concept"] for row in report["concepts"]] for report in [*reports, *(minus or [])]]
    if any(other != names[0] for other in names[1:]):
        raise ValueError("The reports score different concepts (or in another order); "
                         "summarise runs of one --concepts set only.")
    summary: dict = {"seeds": len(reports), "concepts": names[0]}

    def figures(group: list[dict], figure: str) -> np.ndarray:  # (seeds, concepts)
        return np.array([[row[figure] for row in report["concepts"]] for report in group])

    for figure in FIGURES:
        values = figures(reports, figure) - (figures(minus, figure) if minus is not None else 0)
        per_seed = values.mean(axis=1)
        summary[figure] = round(float(values.mean()), 3)
        summary[f"{figure}_interval"] = bootstrap_interval(values.mean(axis=0))
        summary[f"{figure}_seed_sd"] = round(float(per_seed.std(ddof=1)), 3)
        summary[f"{figure}_per_seed"] = [round(float(v), 3) for v in per_seed]
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m elite_tutorial.seed_summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", type=Path, help="one evaluation report (JSON) per seed")
    parser.add_argument("--minus", nargs="+", type=Path, default=None,
                        help="one report per seed, in the same order, subtracted concept by concept (a paired difference)")
    parser.add_argument("--out", type=writable_file, required=True)
    args = parser.parse_args(argv)
    missing = [str(path) for path in [*args.reports, *(args.minus or [])] if not path.is_file()]
    if missing:
        parser.error(f"no such report: {', '.join(missing)}")
    try:
        summary = summarise_seeds([json.loads(path.read_text()) for path in args.reports],
                                  [json.loads(path.read_text()) for path in args.minus] if args.minus else None)
    except (ValueError, KeyError, json.JSONDecodeError) as error:
        parser.error(f"cannot summarise these reports: {error!r}")
    command = " ".join(["python -m elite_tutorial.seed_summary", *(sys.argv[1:] if argv is None else argv)])
    summary = {"command": command, "reports": [path.as_posix() for path in args.reports],
               **({"minus": [path.as_posix() for path in args.minus]} if args.minus else {}), **summary}
    write_json_atomic(args.out, summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "concepts"}, indent=1))


if __name__ == "__main__":
    main()
