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


def _package_imports() -> dict[str, set[str]]:
    """Each module of the package -> the package's modules it imports, lazy imports inside functions included."""
    import ast

    root = Path(__file__).resolve().parents[1]
    files = {".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): path
             for path in (root / "elite_tutorial").rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]) if node.level else ""
                target = ".".join(part for part in (base, node.module) if part)
                imported |= {f"{target}.{alias.name}" if f"{target}.{alias.name}" in files else target for alias in node.names}
        graph[name] = {module for module in imported if module in files and module != name}
    return graph


def test_the_package_has_no_import_cycle():
    graph = _package_imports()
    assert graph["elite_tutorial.attention_maps"] >= {"elite_tutorial.attention"}  # the capture reads the processors
    state = {}

    def visit(module, path):
        state[module] = "open"
        for imported in sorted(graph[module]):
            assert state.get(imported) != "open", "import cycle: " + " -> ".join([*path, imported])
            if imported not in state:
                visit(imported, [*path, imported])
        state[module] = "done"
    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
