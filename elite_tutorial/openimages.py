"""Preparing OpenImages V6 in the authors' layout for full-size training, and checking a prepared folder.

What to download (the OpenImages V6 *test* split, as the authors): the images, the segmentation
annotation table and the mask PNGs (from storage.googleapis.com/openimages/v5/test-masks/, 16 zip
files), into

    <root>/annotations/test-annotations-object-segmentation.csv
    <root>/masks/test/<MaskPath>.png      (white = object)
    <root>/images/test/<ImageID>.jpg

Stage 1 reads object boxes (`data.OpenImagesSource`); they come from the segmentation table, whose
rows carry each mask's box (`BoxXMin`..`BoxYMax`), so that both stages see the same objects:

    python -m elite_tutorial.openimages boxes /data/openimages     # writes annotations/test-annotations-bbox.csv
    python -m elite_tutorial.openimages check /data/openimages     # says what is missing or broken
"""
from __future__ import annotations

import argparse
import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .data import OpenImagesMaskSource, load_image, load_mask

SEGMENTATION_COLUMNS = ("MaskPath", "ImageID", "BoxXMin", "BoxXMax", "BoxYMin", "BoxYMax")
BOX_COLUMNS = ("ImageID", "XMin", "XMax", "YMin", "YMax")


def _tables(root: Path, split: str) -> tuple[Path, Path]:
    annotations = root / "annotations"
    return annotations / f"{split}-annotations-object-segmentation.csv", annotations / f"{split}-annotations-bbox.csv"


def boxes_from_segmentation(root: str | os.PathLike, split: str = "test") -> Path:
    """Write stage 1's box table from the segmentation table (one box per mask); returns its path."""
    segmentation, boxes = _tables(Path(root), split)
    with open(segmentation, newline="") as f:
        rows = list(csv.DictReader(f))
    staging = boxes.with_name(boxes.name + ".partial")
    with open(staging, "w", newline="") as f:  # renamed when complete: no half-written table on a crash
        writer = csv.writer(f)
        writer.writerow(BOX_COLUMNS)
        writer.writerows([row["ImageID"], row["BoxXMin"], row["BoxXMax"], row["BoxYMin"], row["BoxYMax"]] for row in rows)
    staging.replace(boxes)
    return boxes


@dataclass
class FolderReport:
    """What `check_folder` found. `problems` is empty when both stages can train on the folder."""

    root: Path
    segmentation_rows: int = 0
    kept_objects: int = 0
    box_rows: int = 0
    images_missing: list[str] = field(default_factory=list)
    masks_missing: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    checked_files: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        lines = [f"OpenImages folder {self.root}: " + ("ready for both stages" if self.ok else f"{len(self.problems)} problem(s)"),
                 f"  segmentation rows {self.segmentation_rows}, boxes of 2 %..80 % of their image {self.kept_objects}; "
                 f"box rows {self.box_rows}; files opened {self.checked_files}"]
        lines += [f"  - {problem}" for problem in self.problems]
        return "\n".join(lines)


def _first(names: list[str], count: int = 5) -> str:
    return ", ".join(names[:count]) + (f" and {len(names) - count} more" if len(names) > count else "")


def check_folder(root: str | os.PathLike, split: str = "test", open_files: int = 200, seed: int = 0,
                 progress: bool = True) -> FolderReport:
    """Check a prepared folder: both tables, every referenced image and mask present, and `open_files`
    of them (drawn at random; all if fewer) readable. Returns a report whose `problems` say what to fix."""
    root = Path(root)
    report = FolderReport(root)
    segmentation, boxes = _tables(root, split)
    for folder in (root / "images" / split, root / "masks" / split):
        if not folder.is_dir():
            report.problems.append(f"no folder {folder}")
    if not segmentation.is_file():
        report.problems.append(f"no segmentation table {segmentation} (download the {split} split's "
                               "object-segmentation annotations)")
        return report
    with open(segmentation, newline="") as f:
        rows = list(csv.DictReader(f))
    missing_columns = [c for c in SEGMENTATION_COLUMNS if rows and c not in rows[0]]
    if not rows or missing_columns:
        report.problems.append(f"{segmentation} has no rows" if not rows else
                               f"{segmentation} lacks the columns {', '.join(missing_columns)}")
        return report
    report.segmentation_rows = len(rows)
    report.kept_objects = sum(OpenImagesMaskSource.keeps(row) for row in rows)
    if not boxes.is_file():
        report.problems.append(f"no box table {boxes}: run `python -m elite_tutorial.openimages boxes {root}`")
    else:
        with open(boxes, newline="") as f:
            report.box_rows = sum(1 for _ in csv.DictReader(f))
    images = {row["ImageID"]: root / "images" / split / f"{row['ImageID']}.jpg" for row in rows}
    masks = {row["MaskPath"]: root / "masks" / split / row["MaskPath"] for row in rows}
    report.images_missing = sorted(name for name, path in images.items() if not path.is_file())
    report.masks_missing = sorted(name for name, path in masks.items() if not path.is_file())
    present = [(path, load_image) for path in images.values() if path.is_file()]
    present += [(path, load_mask) for path in masks.values() if path.is_file()]
    chosen = np.random.default_rng(seed).permutation(len(present))[:open_files]
    for index in tqdm(chosen, desc="opening files", disable=not progress):
        path, reader = present[index]
        try:
            reader(path)
        except (OSError, ValueError):
            report.unreadable.append(path.name)
    report.checked_files = len(chosen)
    for what, names in (("missing images", report.images_missing), ("missing masks", report.masks_missing),
                        ("unreadable files (training skips them)", report.unreadable)):
        if names:
            report.problems.append(f"{what}: {len(names)} ({_first(names)})")
    if report.kept_objects == 0:
        report.problems.append("no object that the stages keep (boxes of 2 %..80 % of the image)")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m elite_tutorial.openimages", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["boxes", "check"])
    parser.add_argument("root", type=Path)
    parser.add_argument("--split", default="test")
    parser.add_argument("--open-files", type=int, default=200, help="how many images and masks to open (check)")
    args = parser.parse_args(argv)
    if args.action == "boxes":
        print(f"wrote {boxes_from_segmentation(args.root, args.split)}")
        return
    report = check_folder(args.root, args.split, args.open_files)
    print(report)
    raise SystemExit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
