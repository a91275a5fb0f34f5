"""The gates' bookkeeping, the evaluation's intervals and gate 3's map."""
import json

import numpy as np
import pytest
import torch

from elite_tutorial.components import load_components
from elite_tutorial.evaluation import bootstrap_interval
from elite_tutorial.studies.gates import TARGETS, main, method_file, record_gate, record_method, verdicts
from elite_tutorial.studies.mappable import every_identity, fit_word_map, mapped_concept_words, nearest_identities
from elite_tutorial.toyworld.concepts import CONCEPTS, HELD_OUT_IDENTITIES, training_twins
from elite_tutorial.words import compound_embeddings


def test_bootstrap_intervals_on_known_cases():
    assert bootstrap_interval([0.7] * 16) == [0.7, 0.7]  # no spread, no uncertainty
    low, high = bootstrap_interval([0.0, 1.0] * 8)
    # the mean of 16 fair coin flips: standard error 0.125, so the 95 % interval is about 0.5 +- 0.245
    assert low == pytest.approx(0.25, abs=0.04) and high == pytest.approx(0.75, abs=0.04)
    values = np.random.default_rng(0).random(16)
    narrow, wide = bootstrap_interval(values, confidence=0.5), bootstrap_interval(values, confidence=0.99)
    assert wide[0] < narrow[0] < values.mean() < narrow[1] < wide[1]
    assert bootstrap_interval(values) == bootstrap_interval(values)  # seeded


@pytest.mark.research
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
    other = record_gate(tmp_path, "judge", {key: 1.0 for key, _, _ in TARGETS["judge"]}, {}, "cmd", 1, entry="judge: other")
    assert other["passed"] and not json.loads((tmp_path / "toy_gates.json").read_text())["judge"]["passed"]  # kept apart
    path = record_method(tmp_path, "said in words", {"summary": {"fidelity": 0.9}}, "cmd", seed=0)
    assert path.name == "said_in_words.json" and json.loads(path.read_text())["summary"] == {"fidelity": 0.9}
    assert method_file(tmp_path, "fitted map (training identities)").name == "fitted_map_training_identities.json"


@pytest.mark.research
def test_the_ridge_map_recovers_a_linear_map_and_picks_its_penalty_on_held_back_rows():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(400, 6, generator=generator) * torch.tensor([1.0, 2, 3, 4, 5, 6]) + 7
    weight, bias = torch.randn(6, 3, generator=generator), torch.randn(3, generator=generator)
    targets = features @ weight + bias
    word_map, report = fit_word_map(features, targets, alphas=(1e-6, 1e3))
    assert torch.allclose(word_map(features).float(), targets, atol=1e-3)
    assert report["alpha"] == 1e-6  # noise-free: the least penalty predicts the held-back rows best
    assert report["validation_mse"]["1e-06"] < 1e-8 < report["validation_mse"]["1000.0"]
    assert report["target_variance"] == pytest.approx(float(targets[320:].double().var(0).mean()), rel=1e-3)
    unrelated = torch.randn(40, 3, generator=generator)  # targets the features say nothing of
    assert fit_word_map(features[:40], unrelated, alphas=(1e-6, 1e3))[1]["alpha"] == 1e3  # the mean word wins


@pytest.mark.research
def test_a_fitted_map_writes_unseen_concepts_words_closer_than_a_constant_word():
    toy = load_components("toy", device="cpu")
    words, report = mapped_concept_words(toy, toy.image_encoder, training=300, concepts=CONCEPTS[:2])
    assert words.shape == (2, toy.text_encoder.config.hidden_size) and torch.isfinite(words).all()
    assert report["scenes_fitted"] == 300
    assert report["validation_mse"][str(report["alpha"])] < report["target_variance"]
    # the shipped encoder reads colour and pattern, so even on unseen identities the map beats the targets' mean
    assert report["concept_mse"] < report["target_variance"]
    assert len(report["distance_to_own"]) == len(report["own_to_nearest_other"]) == 2
    assert report["nearest_is_own_identity"] in (0.0, 0.5, 1.0)


@pytest.mark.research
def test_a_word_near_a_compound_is_read_as_its_identity_and_a_compound_as_its_nearest_other():
    toy = load_components("toy", device="cpu")
    assert len(every_identity()) == len(set(every_identity())) == 8 * 4 * 5
    exact = compound_embeddings(toy, ["red dotted heart", "blue star"])
    near = exact + 1e-3 * torch.randn(exact.shape, generator=torch.Generator().manual_seed(0))
    assert nearest_identities(toy, near)[0] == ["red dotted heart", "blue star"]
    others, distances = nearest_identities(toy, exact)  # its exact match left out: the nearest other identity
    assert "red dotted heart" not in others[0] and (distances > 0).all()
    assert torch.allclose(distances[1], (exact[1] - compound_embeddings(toy, [others[1]])[0]).norm().double())


@pytest.mark.research
def test_the_mappable_gate_asks_for_the_taught_components():
    with pytest.raises(SystemExit):
        main(["mappable"])


@pytest.mark.research
def test_each_concepts_training_twin_is_its_shape_and_colour_in_a_pattern_the_streams_show():
    twins = training_twins()
    assert len(twins) == len(CONCEPTS) == len({twin.name for twin in twins})
    for concept, twin in zip(CONCEPTS, twins):
        assert (twin.shape, twin.colour) == (concept.shape, concept.colour) and twin.pattern not in (concept.pattern, "solid")
        assert (twin.shape, twin.colour, twin.pattern) not in HELD_OUT_IDENTITIES
