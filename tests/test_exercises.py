"""The exercises: every check passes the chapter's solution and fails the stub and a typical mistake with
a message; the student edition holds stubs only; grading scores each exercise."""
import importlib
import re
import subprocess
import sys

import nbformat
import pytest

from elite_tutorial.exercises import feedback
from elite_tutorial.exercises.editions import (
    CHAPTERS,
    chapter_notebooks,
    check_cells,
    grade,
    solution_cells,
    student_edition,
    student_notebook,
)

CHECK_CALL = re.compile(r"^check\.(\w+)\((\w+)\)$")


def _exercises():
    """(chapter, check name, solution source, stub source) of every exercise, in the chapters' order."""
    found = []
    for path in chapter_notebooks():
        notebook = nbformat.read(path, as_version=4)
        stubs = {cell.metadata.nbgrader["grade_id"]: cell.source for cell in solution_cells(student_notebook(notebook))}
        solutions = {cell.metadata.nbgrader["grade_id"]: cell.source for cell in solution_cells(notebook)}
        for cell in check_cells(notebook):
            name, function = CHECK_CALL.match(cell.source.strip()).groups()
            solution_id = cell.metadata.nbgrader["grade_id"].removesuffix("-check")
            found.append((path.name[:2], name, function, solutions[solution_id], stubs[solution_id]))
    return found


EXERCISES = _exercises()


def _run(chapter: str, name: str, function: str, source: str) -> None:
    namespace = {}
    exec(source, namespace)  # noqa: S102 (the chapter's own cell)
    getattr(importlib.import_module(f"elite_tutorial.exercises.chapter{chapter}"), name)(namespace[function])


def test_every_chapter_has_three_exercises_and_the_course_twenty():
    per_chapter = {chapter: sum(e[0] == chapter for e in EXERCISES) for chapter in CHAPTERS}
    assert all(count >= 3 for count in per_chapter.values()), per_chapter
    assert len(EXERCISES) >= 20


def test_every_check_cell_follows_its_solution_cell_and_is_locked():
    for path in chapter_notebooks():
        cells = nbformat.read(path, as_version=4).cells
        for index, cell in enumerate(cells):
            if cell.metadata.get("nbgrader", {}).get("grade"):
                assert cell.metadata.nbgrader["locked"] and cell.metadata.nbgrader["points"] == 1
                before = cells[index - 1].metadata.get("nbgrader", {})
                assert before.get("solution") and before["grade_id"] + "-check" == cell.metadata.nbgrader["grade_id"], path.name


@pytest.mark.parametrize("chapter,name,function,solution,stub", EXERCISES, ids=[e[1] for e in EXERCISES])
def test_the_check_passes_the_solution_only(chapter, name, function, solution, stub, capsys):
    _run(chapter, name, function, solution)
    assert capsys.readouterr().out.startswith(f"✓ {name}: correct")
    with pytest.raises(feedback.ExerciseFailed, match="not written yet"):
        _run(chapter, name, function, stub)
    mistakes = importlib.import_module(f"exercise_mistakes.chapter{chapter}").MISTAKES
    assert name in mistakes, f"no typical mistake for {name} in tests/exercise_mistakes/chapter{chapter}.py"
    with pytest.raises(feedback.ExerciseFailed, match=f"^{name}: ") as failure:
        _run(chapter, name, function, mistakes[name])
    assert "Hint:" in str(failure.value) or "raised" in str(failure.value)


def test_feedback_names_the_shape_the_nan_and_the_missing_return():
    import torch
    with pytest.raises(feedback.ExerciseFailed, match=r"has shape \(2, 3\), expected \(3, 2\)"):
        feedback.expect_close("x", torch.zeros(2, 3), torch.zeros(3, 2), hint="h")
    with pytest.raises(feedback.ExerciseFailed, match="NaN or inf"):
        feedback.expect_close("x", torch.tensor([1.0, float("nan")]), torch.ones(2), hint="h")
    with pytest.raises(feedback.ExerciseFailed, match="without `return`"):
        feedback.expect_close("x", None, torch.ones(2), hint="h")
    with pytest.raises(feedback.ExerciseFailed, match=r"1 of 2 values .* at index \(1,\) \(yours 3, expected 1\)"):
        feedback.expect_close("x", torch.tensor([1.0, 3.0]), torch.ones(2), hint="h")


def test_the_student_edition_holds_stubs_and_no_solution_or_output(tmp_path):
    written = student_edition(tmp_path / "handout")
    assert [path.name for path in written] == [path.name for path in chapter_notebooks()]
    for solved, handout in zip(chapter_notebooks(), written):
        notebook = nbformat.read(handout, as_version=4)
        assert len(notebook.cells) == len(nbformat.read(solved, as_version=4).cells)
        assert not any("BEGIN SOLUTION" in cell.source for cell in notebook.cells)
        assert all("raise NotImplementedError()" in cell.source for cell in solution_cells(notebook))
        assert not any(cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")
        assert all(cell.metadata.get("editable") is False for cell in check_cells(notebook))


def test_the_student_edition_refuses_to_write_into_the_solved_chapters_folder():
    solved = chapter_notebooks()[0].parent
    for out in (solved, solved / "handout"):  # overwritten, or collected by nbval as chapters
        with pytest.raises(ValueError, match="inside the solved chapters' folder"):
            student_edition(out)
    assert not (solved / "handout").exists()


def test_grading_scores_each_exercise_from_its_check_cell(tmp_path):
    """A one-exercise notebook (chapter 00's first), solved and as handed out: 1 of 1, then 0 of 1 with the check's words."""
    import nbgrader.utils
    solved = nbformat.read(chapter_notebooks()[0], as_version=4)
    exercise = [cell for cell in solved.cells if nbgrader.utils.is_solution(cell)][0]
    exercise_id = exercise.metadata.nbgrader["grade_id"]
    check = next(cell for cell in check_cells(solved) if cell.metadata.nbgrader["grade_id"] == exercise_id + "-check")
    imports = nbformat.v4.new_code_cell("from elite_tutorial.exercises import chapter00 as check")
    notebook = nbformat.v4.new_notebook(cells=[imports, exercise, check], metadata=solved.metadata)
    nbformat.write(notebook, tmp_path / "solved.ipynb")
    nbformat.write(student_notebook(notebook), tmp_path / "handout.ipynb")
    [right] = grade(tmp_path / "solved.ipynb", timeout=120)
    assert (right.points, right.max_points) == (1, 1) and right.feedback.startswith("✓ cross_attention: correct")
    [wrong] = grade(tmp_path / "handout.ipynb", timeout=120)
    assert (wrong.points, wrong.max_points) == (0, 1) and "not written yet" in wrong.feedback


def test_the_command_writes_the_student_edition(tmp_path):
    result = subprocess.run([sys.executable, "-m", "elite_tutorial.exercises", "student-edition", "--out", str(tmp_path),
                             str(chapter_notebooks()[0])], capture_output=True, text=True, check=True)
    assert "wrote" in result.stdout and (tmp_path / chapter_notebooks()[0].name).is_file()
