"""The gates' bookkeeping and the evaluation's intervals."""
import json

import numpy as np
import pytest

from elite_tutorial.evaluation import bootstrap_interval
from elite_tutorial.toyworld.gates import TARGETS, record_gate, record_method, verdicts


def test_bootstrap_intervals_on_known_cases():
    assert bootstrap_interval([0.7] * 16) == [0.7, 0.7]  # no spread, no uncertainty
    low, high = bootstrap_interval([0.0, 1.0] * 8)
    # the mean of 16 fair coin flips: standard error 0.125, so the 95 % interval is about 0.5 +- 0.245
    assert low == pytest.approx(0.25, abs=0.04) and high == pytest.approx(0.75, abs=0.04)
    values = np.random.default_rng(0).random(16)
    narrow, wide = bootstrap_interval(values, confidence=0.5), bootstrap_interval(values, confidence=0.99)
    assert wide[0] < narrow[0] < values.mean() < narrow[1] < wide[1]
    assert bootstrap_interval(values) == bootstrap_interval(values)  # seeded


def test_a_gate_passes_only_when_every_figure_meets_its_target(tmp_path):
    figures = {"said in words: fidelity": 0.9, "said in words: editability": 0.8,
               "Textual Inversion: fidelity": 0.81, "class word: fidelity": 0.5}
    assert all(check["met"] for check in verdicts("drawable", figures).values())
    entry = record_gate(tmp_path, "drawable", figures, {"note": 1}, "cmd", 1.23)
    assert entry["passed"] and entry["seconds"] == 1.2
    too_sayable = {**figures, "class word: fidelity": 0.51}  # a maximum: above it fails
    assert not record_gate(tmp_path, "drawable", too_sayable, {}, "cmd", 1)["passed"]
    record_gate(tmp_path, "judge", {key: 0.97 for key, _, _ in TARGETS["judge"]}, {}, "cmd", 1)
    saved = json.loads((tmp_path / "toy_gates.json").read_text())
    assert set(saved) == {"drawable", "judge"} and not saved["judge"]["passed"]  # both kept, each its own
    assert saved["drawable"]["targets"]["class word: fidelity"] == {"figure": 0.51, "target": "<= 0.5", "met": False}
    path = record_method(tmp_path, "said in words", {"summary": {"fidelity": 0.9}}, "cmd", seed=0)
    assert path.name == "said_in_words.json" and json.loads(path.read_text())["summary"] == {"fidelity": 0.9}
