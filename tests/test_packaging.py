"""environment.yml (conda) and pyproject.toml (pip) must install the same packages; the code stays ruff-clean."""
import re
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def pyproject_requirements() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return set(project["dependencies"]) | set(project["optional-dependencies"]["dev"])


def environment_pip_requirements() -> set[str]:
    text = (ROOT / "environment.yml").read_text()
    pip_section = text.split("- pip:", 1)[1]
    return set(re.findall(r"^\s+-\s+(\S+)\s*$", pip_section, flags=re.M))


def test_environment_yml_matches_pyproject():
    conda, pip = environment_pip_requirements(), pyproject_requirements()
    assert conda == pip, f"only in environment.yml: {sorted(conda - pip)}; only in pyproject.toml: {sorted(pip - conda)}"


def test_both_lists_are_read_in_full():
    # guards the test above against passing on two empty (mis-parsed) lists
    for requirements in (environment_pip_requirements(), pyproject_requirements()):
        assert {"torch", "diffusers", "transformers", "pytest", "nbval"} <= {re.split(r"[<>=!~ ]", r)[0] for r in requirements}


def test_the_code_is_ruff_clean():
    # the rules are pyproject.toml's [tool.ruff]
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
