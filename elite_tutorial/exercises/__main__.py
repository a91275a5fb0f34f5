"""`python -m elite_tutorial.exercises student-edition --out DIR` and `... grade NOTEBOOK...`."""
from __future__ import annotations

import argparse
from pathlib import Path

from .editions import chapter_notebooks, grade, student_edition


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m elite_tutorial.exercises",
                                     description="The course's student edition, and grading a student's chapters.")
    commands = parser.add_subparsers(dest="command", required=True)
    edition = commands.add_parser("student-edition", help="write the chapters with their solutions replaced by stubs")
    edition.add_argument("--out", type=Path, required=True, help="a folder outside notebooks/ (created if missing)")
    edition.add_argument("notebooks", nargs="*", type=Path, help="chapters to convert (default: 00 to 05)")
    marking = commands.add_parser("grade", help="run a student's chapters and score each exercise")
    marking.add_argument("notebooks", nargs="+", type=Path)
    marking.add_argument("--timeout", type=int, default=1200, help="seconds per cell")
    args = parser.parse_args(argv)
    if args.command == "student-edition":
        for path in student_edition(args.out, args.notebooks or chapter_notebooks()):
            print("wrote", path)
        return
    total = maximum = 0.0
    for path in args.notebooks:
        if not path.is_file():
            parser.error(f"{path} is not a notebook file.")
        for score in grade(path, args.timeout):
            total, maximum = total + score.points, maximum + score.max_points
            first_line = score.feedback.splitlines()[0] if score.feedback else ""
            print(f"{path.name}  {score.exercise:<32} {score.points:g}/{score.max_points:g}  {first_line}")
    print(f"total {total:g}/{maximum:g}")


if __name__ == "__main__":
    main()
