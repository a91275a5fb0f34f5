"""The two editions of the course: the solved chapters (the repository's notebooks) and the student
edition, made from them by nbgrader's preprocessors; and the autograder's score per exercise.

The chapters mark their exercises the nbgrader way (cell metadata `nbgrader.solution`/`grade`, code
between `### BEGIN SOLUTION` and `### END SOLUTION`), so a teacher who runs an nbgrader course can
also take them into `nbgrader generate_assignment` unchanged. The commands here need no course
directory and no gradebook: the student edition is nbgrader's `ClearSolutions`, `ClearOutput` and
`LockCells` applied to each chapter, and grading executes a notebook with nbclient and reads each
check cell's points with nbgrader's own rule (`nbgrader.utils.determine_grade`: no error, full points).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import nbformat
from nbgrader.preprocessors import ClearOutput, ClearSolutions, LockCells
from nbgrader.utils import determine_grade, is_grade, is_solution

NOTEBOOKS_DIR = Path(__file__).resolve().parents[2] / "notebooks"
CHAPTERS = ("00", "01", "02", "03", "04", "05")  # the chapters with exercises (06 needs data and a GPU)


def chapter_notebooks(folder: Path = NOTEBOOKS_DIR) -> list[Path]:
    """The chapters with exercises, in order."""
    return sorted(path for path in Path(folder).glob("*.ipynb") if path.name[:2] in CHAPTERS)


def solution_cells(notebook: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    """The cells a student writes in (nbgrader `solution` cells)."""
    return [cell for cell in notebook.cells if is_solution(cell)]


def check_cells(notebook: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    """The autograded cells (nbgrader `grade` code cells), one per exercise."""
    return [cell for cell in notebook.cells if is_grade(cell) and cell.cell_type == "code"]


def student_notebook(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The student's copy of a solved chapter: each solution replaced by nbgrader's stub
    (`raise NotImplementedError()`), outputs cleared, check cells locked."""
    notebook = copy.deepcopy(notebook)
    for preprocessor in (ClearSolutions(), ClearOutput(), LockCells()):
        notebook, _ = preprocessor.preprocess(notebook, {})
    return notebook


def student_edition(out: Path, notebooks: list[Path] | None = None) -> list[Path]:
    """Write the student edition of `notebooks` (default: every chapter with exercises) into `out`,
    a folder outside the solved chapters' one. Returns the files written."""
    notebooks = chapter_notebooks() if notebooks is None else [Path(path) for path in notebooks]
    out = Path(out)
    for folder in {path.resolve().parent for path in notebooks}:
        if out.resolve() == folder or folder in out.resolve().parents:
            raise ValueError(f"--out {out} is inside the solved chapters' folder {folder}: the stubs would replace the "
                             "solutions or be run as chapters. Choose a folder outside it.")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in notebooks:
        target = out / path.name
        nbformat.write(student_notebook(nbformat.read(path, as_version=4)), target)
        written.append(target)
    return written


@dataclass(frozen=True)
class ExerciseScore:
    exercise: str  # the check cell's nbgrader grade_id
    points: float
    max_points: float
    feedback: str  # the check's message: what is wrong, or what it printed when right


def _feedback(cell: nbformat.NotebookNode) -> str:
    for output in cell.get("outputs", []):
        if output.output_type == "error":
            return f"{output.ename}: {output.evalue}"
    return "".join(output.get("text", "") for output in cell.get("outputs", []) if output.output_type == "stream").strip()


def grade(path: Path, timeout: int = 1200) -> list[ExerciseScore]:
    """Run a student's notebook top to bottom (errors do not stop it) and score each exercise by
    nbgrader's rule: its check cell ran without an error."""
    from nbclient import NotebookClient  # noqa: PLC0415 (only grading starts a kernel)

    path = Path(path)
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=timeout, allow_errors=True, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    scores = []
    for cell in check_cells(notebook):
        points, max_points = determine_grade(cell)
        scores.append(ExerciseScore(cell.metadata.nbgrader["grade_id"], points or 0.0, max_points, _feedback(cell)))
    return scores
