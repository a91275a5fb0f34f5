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


def _imported_names() -> dict[str, set[str]]:
    """Each module of the package -> what it imports, as dotted names (`from .data import load_image` ->
    `elite_tutorial.data`; `from .. import evaluation` -> `elite_tutorial.evaluation`), lazy imports inside
    functions included."""
    import ast

    root = Path(__file__).resolve().parents[1]
    files = {".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): path
             for path in (root / "elite_tutorial").rglob("*.py")}
    names = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]) if node.level else ""
                target = ".".join(part for part in (base, node.module) if part)
                imported |= {f"{target}.{alias.name}" if f"{target}.{alias.name}" in files else target for alias in node.names}
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
        names[name] = imported
    return names


def _package_imports() -> dict[str, set[str]]:
    """Each module of the package -> the package's modules it imports, lazy imports inside functions included."""
    names = _imported_names()
    return {name: {module for module in imported if module in names and module != name} for name, imported in names.items()}


def test_every_import_of_the_package_names_one_of_its_modules():
    names = _imported_names()
    missing = sorted(f"{name} imports {module}" for name, imported in names.items() for module in imported
                     if module.partition(".")[0] == "elite_tutorial" and module not in names)
    assert not missing, "\n".join(missing)


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


# The layers, bottom to top (docs/layers.md): a module imports only from its own layer or below (and no cycle,
# above). `toyworld.*` is the world; `studies.*` are the studies made on it; the exercises check the notebooks'
# solutions and may use anything. A new module needs a line here.
LAYERS = {
    1: {"arguments", "storage"},
    2: {"", "components", "words", "train_loop", "step_speed"},  # "": the package's __init__, which every import of the package runs
    3: {"data"},
    4: {"toyworld", "toyworld.concepts", "toyworld.judge", "toyworld.models", "toyworld.render", "toyworld.sources",
        "toyworld.tokenizer", "mappers", "attention", "openimages"},
    5: {"attention_maps", "attention_plots", "pipeline"},
    6: {"training"},
    7: {"evaluation", "baselines", "explorer", "metrics"},
    8: {"studies", "studies.compounds", "studies.encoder", "studies.gates", "studies.mappable", "studies.pretrain",
        "studies.report", "studies.loss_study", "studies.judge_check", "cli", "comparison", "seed_summary",
        "attention_on_object"},
    9: {"exercises", "exercises.__main__", "exercises.editions", "exercises.feedback", "exercises.inputs", "exercises.chapter00",
        "exercises.chapter01", "exercises.chapter02", "exercises.chapter03", "exercises.chapter04", "exercises.chapter05"},
}


def _layer_of() -> dict[str, int]:
    return {f"elite_tutorial.{name}".rstrip("."): layer for layer, names in LAYERS.items() for name in names}


def _short(module: str) -> str:
    return module.removeprefix("elite_tutorial").removeprefix(".")


def test_every_module_has_a_layer():
    graph, layer_of = _package_imports(), _layer_of()
    assert not (unplaced := sorted(set(graph) - set(layer_of))), f"modules with no layer in LAYERS: {unplaced}"
    assert not (gone := sorted(set(layer_of) - set(graph))), f"LAYERS names modules that do not exist: {gone}"


def test_no_module_imports_from_a_layer_above_its_own():
    graph, layer_of = _package_imports(), _layer_of()
    upward = [f"{_short(module)} (layer {layer_of[module]}) imports {_short(imported)} (layer {layer_of[imported]})"
              for module in sorted(graph) for imported in sorted(graph[module]) if layer_of[imported] > layer_of[module]]
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def test_the_world_the_core_and_evaluation_import_no_study():
    graph = _package_imports()
    world = {m for m in graph if m.startswith("elite_tutorial.toyworld")}
    studies = {m for m in graph if m.startswith("elite_tutorial.studies")}
    # the world reads only what lies below it: storage, data, and components (sd14's scheduler configuration,
    # and `Components` to save the tiny-random folder)
    below_the_world = {"elite_tutorial", "elite_tutorial.arguments", "elite_tutorial.storage", "elite_tutorial.components",
                       "elite_tutorial.data"}
    for module in sorted(world):
        assert graph[module] <= world | below_the_world, f"{module} imports {sorted(graph[module] - world - below_the_world)}"
    low = {f"elite_tutorial.{m}" for m in ("storage", "arguments", "components", "words", "data", "mappers")}
    for module in sorted(low):
        assert not graph[module] & (world | studies), f"{module} imports {sorted(graph[module] & (world | studies))}"
    core = {f"elite_tutorial.{m}" for m in ("attention", "attention_maps", "pipeline", "training", "evaluation", "baselines",
                                            "explorer", "metrics")}
    for module in sorted(core | world):
        assert not graph[module] & studies, f"{module} imports the studies' {sorted(graph[module] & studies)}"


def test_no_markdown_cell_of_a_chapter_is_over_250_words():
    """A chapter's readings stay short: each markdown cell at most 250 words (split on whitespace)."""
    import nbformat

    long_cells = [(path.name, index, len(cell.source.split()))
                  for path in sorted((ROOT / "notebooks").glob("*.ipynb"))
                  for index, cell in enumerate(nbformat.read(path, as_version=4).cells)
                  if cell.cell_type == "markdown" and len(cell.source.split()) > 250]
    assert not long_cells, f"markdown cells over 250 words (notebook, cell, words): {long_cells}"


def test_the_shipped_assets_stay_within_40_mb():
    """Every weight a chapter or figure uses is committed under assets/; the folder stays small enough to clone."""
    from elite_tutorial.components import ASSETS_DIR

    total = sum(path.stat().st_size for path in ASSETS_DIR.rglob("*") if path.is_file())
    assert 0 < total <= 40e6, f"assets/ holds {total / 1e6:.1f} MB"
