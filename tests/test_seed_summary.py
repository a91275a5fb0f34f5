import json

import pytest

from elite_tutorial.evaluation import bootstrap_interval
from elite_tutorial.seed_summary import FIGURES, main, summarise_seeds


def report(values, names=("a", "b", "c")):
    """An evaluation report whose every figure is `values` (one per concept)."""
    return {"concepts": [{"concept": name, **{figure: value for figure in FIGURES}} for name, value in zip(names, values)]}


def test_a_summary_averages_over_seeds_per_concept_and_gives_the_seeds_spread():
    summary = summarise_seeds([report([0.2, 0.4, 0.9]), report([0.4, 0.6, 0.5])])
    assert summary["seeds"] == 2 and summary["concepts"] == ["a", "b", "c"]
    assert summary["fidelity"] == 0.5
    assert summary["fidelity_per_seed"] == [0.5, 0.5]
    assert summary["fidelity_seed_sd"] == 0.0
    assert summary["fidelity_interval"] == bootstrap_interval([0.3, 0.5, 0.7])  # over the per-concept means
    spread = summarise_seeds([report([0.2, 0.2, 0.2]), report([0.6, 0.6, 0.6])])
    assert spread["editability_seed_sd"] == pytest.approx(0.283, abs=1e-3)  # sample sd of 0.2 and 0.6


def test_reports_on_other_concepts_or_one_seed_alone_are_refused():
    with pytest.raises(ValueError, match="different concepts"):
        summarise_seeds([report([0.1, 0.2, 0.3]), report([0.1, 0.2, 0.3], names=("a", "c", "b"))])
    with pytest.raises(ValueError, match="at least two"):
        summarise_seeds([report([0.1, 0.2, 0.3])])


def test_the_command_writes_the_summary_with_its_command(tmp_path, capsys):
    paths = []
    for seed, values in enumerate(([0.2, 0.4, 0.9], [0.4, 0.6, 0.5])):
        paths.append(tmp_path / f"seed{seed}.json")
        paths[-1].write_text(json.dumps(report(values)))
    out = tmp_path / "summary.json"
    main([str(p) for p in paths] + ["--out", str(out)])
    written = json.loads(out.read_text())
    assert written["command"].startswith("python -m elite_tutorial.seed_summary ")
    assert written["fidelity"] == 0.5 and written["reports"] == [p.as_posix() for p in paths]
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing.json"), str(paths[0]), "--out", str(out)])
    assert "no such report" in capsys.readouterr().err


def test_minus_gives_the_paired_difference_concept_by_concept(tmp_path):
    reports = [report([0.5, 0.7, 0.9]), report([0.6, 0.6, 1.0])]
    partners = [report([0.4, 0.7, 0.7]), report([0.6, 0.5, 0.8])]
    paired = summarise_seeds(reports, minus=partners)
    assert paired["fidelity"] == pytest.approx(0.1)
    assert paired["fidelity_per_seed"] == [0.1, 0.1]
    assert paired["fidelity_interval"] == bootstrap_interval([0.05, 0.05, 0.2])  # the differences, averaged over seeds
    with pytest.raises(ValueError, match="one report per seed"):
        summarise_seeds(reports, minus=partners[:1])
    with pytest.raises(ValueError, match="different concepts"):
        summarise_seeds(reports, minus=[report([0.1, 0.2, 0.3], names=("a", "c", "b"))] * 2)
    paths = {}
    for name, r in {"r0": reports[0], "r1": reports[1], "m0": partners[0], "m1": partners[1]}.items():
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(r))
    out = tmp_path / "gain.json"
    main([str(paths["r0"]), str(paths["r1"]), "--minus", str(paths["m0"]), str(paths["m1"]), "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["minus"] == [paths["m0"].as_posix(), paths["m1"].as_posix()]
    assert written["fidelity"] == pytest.approx(0.1)
