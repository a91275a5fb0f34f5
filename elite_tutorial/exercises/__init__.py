"""The course's exercises: a check per exercise, one module per chapter, and the student edition.

Each chapter's exercises are functions the student writes in the notebook (the solution sits between
nbgrader's `### BEGIN SOLUTION` and `### END SOLUTION` marks), each followed by a locked cell that
calls its check, e.g. `check.guided_noise(guided_noise)`. A check builds its own inputs with a fixed
seed, compares the student's answer with what the package computes, and says what is wrong: which
shape, which value and by how much, with a hint (`feedback.ExerciseFailed`).

    python -m elite_tutorial.exercises student-edition --out handout/   # solutions replaced by stubs
    python -m elite_tutorial.exercises grade handout/01_global_mapper.ipynb   # a score per exercise
"""
