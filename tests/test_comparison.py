"""The toy comparison table: every method scored on the same protocol, reproducible from its seed; the
reference that describes each concept in words, plain and through a mapper's k/v copies."""
import json

import numpy as np
import pytest
import torch

from elite_tutorial import evaluation, load_components
from elite_tutorial.comparison import (
    METHODS,
    cached_inversions,
    compare,
    components_fingerprint,
    load,
    record,
    speedup,
    table,
)
from elite_tutorial.components import ASSETS_DIR
from elite_tutorial.evaluation import (
    JUDGE_FOLDER,
    class_word_generator,
    concept_identity,
    described,
    described_generator,
    edit_success,
    fidelity_and_editability,
    method_file,
    score,
    through_key_values,
    word_norms,
)
from elite_tutorial.mappers import GlobalMapper, LocalMapper
from elite_tutorial.pipeline import ELITEPipeline
from elite_tutorial.toyworld.concepts import CONCEPTS, concept_by_name, concept_views
from elite_tutorial.toyworld.judge import ToyJudge


def test_a_rerun_on_two_concepts_and_one_sample_gives_the_same_rows(tmp_path):
    """The second run reads the first's Textual Inversion words back from the cache: every row is the same,
    and each method's file is written, read back and tabled."""
    components = load_components("toy", device="cpu")
    global_mapper = GlobalMapper.from_pretrained(ASSETS_DIR / "toy-global-mapper")
    local_mapper = LocalMapper.from_pretrained(ASSETS_DIR / "toy-local-mapper")
    cache = tmp_path / "words.json"
    runs = [compare(components, global_mapper, local_mapper, CONCEPTS[:2], samples=1, ti_profile="smoke", ti_cache=cache,
                    progress=False) for _ in range(2)]
    assert list(runs[0]["methods"]) == list(METHODS)
    for method in METHODS:
        first, second = (run["methods"][method] for run in runs)
        assert first["summary"] == second["summary"] and first["concepts"] == second["concepts"]
        assert {"fidelity", "editability", "clip_t", "clip_i", "dino_i", "dino_i_interval"} <= set(first["summary"])
    words = json.loads(cache.read_text())
    assert set(words["words"]) == {c.name for c in CONCEPTS[:2]} and words["profile"] == "smoke"
    fitted = runs[0]["methods"]["Textual Inversion"]["seconds_per_concept"]
    encode = runs[0]["methods"]["ELITE global"]["seconds_per_concept"]
    assert fitted == runs[1]["methods"]["Textual Inversion"]["seconds_per_concept"] > encode > 0
    paths = record(runs[0], tmp_path / "methods", "python -m elite_tutorial.comparison")
    assert sorted(p.name for p in paths) == sorted(method_file(tmp_path, m).name for m in METHODS)
    saved = load(tmp_path / "methods")
    assert list(saved) == list(METHODS) and saved["ELITE global"]["concepts"] == runs[0]["methods"]["ELITE global"]["concepts"]
    assert saved["class word"]["samples_per_prompt"] == 1 and table(saved).count("\n") == len(METHODS) + 1
    assert speedup(saved) == fitted / saved["ELITE global + local"]["seconds_per_concept"]


def test_the_words_cache_is_refused_when_made_with_other_settings(tmp_path):
    components = load_components("toy", device="cpu")
    cache = tmp_path / "words.json"
    cache.write_text(json.dumps({"profile": "toy", "seed": 0, "components": components_fingerprint(components), "words": {}}))
    with pytest.raises(ValueError, match="other settings"):
        cached_inversions(components, CONCEPTS[:1], "smoke", 0, cache, progress=False)
    unoptimised = {"profile": "smoke", "seed": 0, "components": components_fingerprint(components),
                   "words": {CONCEPTS[0].name: {"embedding": [0.5] * components.text_encoder.config.hidden_size, "seconds": 7.0}}}
    cache.write_text(json.dumps(unoptimised))
    words, seconds = cached_inversions(components, CONCEPTS[:1], "smoke", 0, cache, progress=False)
    assert seconds == [7.0] and torch.equal(words, torch.full((1, components.text_encoder.config.hidden_size), 0.5))


def test_the_concept_described_in_words_beats_its_class_word():
    """The reference reads the judge's answer, so where the class word misses (a cyan plus sign is no
    square to the judge) the description must land."""
    components = load_components("toy", device="cpu")
    judge = ToyJudge.from_pretrained(JUDGE_FOLDER).eval()
    cross = [concept_by_name("cyan_cross")]
    identity = concept_identity(judge, cross[0])
    assert described(identity).split()[-1] == identity["shape"] and identity["shape"] != "square"
    scores = {name: score(make(components, **extra, concepts=cross, samples=2), judge, cross, samples=2)["summary"]
              for name, make, extra in (("described", described_generator, {"judge": judge}),
                                        ("class word", class_word_generator, {}))}
    assert scores["described"]["fidelity"] > scores["class word"]["fidelity"] + 0.3


def test_description_follows_the_training_captions():
    assert described({"colour": "green", "pattern": "dotted", "shape": "circle"}) == "green dotted circle"
    assert described({"colour": "red", "pattern": "solid", "shape": "heart"}) == "red heart"


def test_words_drawn_through_the_mapper_key_values_change_only_with_the_copies():
    """Copies equal to the UNet's own draw what the plain model draws; changed copies draw otherwise."""
    components = load_components("toy", device="cpu")
    plain = class_word_generator(components, CONCEPTS[:2], samples=1)
    mapper = GlobalMapper.from_components(components)
    reference = plain("a photo of a S").astype(int)
    assert np.abs(through_key_values(plain, components, mapper)("a photo of a S") - reference).max() <= 1
    with torch.no_grad():
        for to_v in mapper.to_v_global.values():
            to_v.weight.mul_(0.5)
    assert np.abs(through_key_values(plain, components, mapper)("a photo of a S") - reference).mean() > 5


def test_an_edit_counts_only_where_it_shows_and_the_concept_keeps_two_of_its_three_attributes():
    identity = {"shape": "heart", "colour": "red", "pattern": "dotted"}
    predictions = {"position": ["left", "left", "left", "right"],
                   "shape": ["heart", "star", "star", "heart"],   # image 0 keeps 3, image 1 keeps 2,
                   "colour": ["red", "red", "blue", "red"],       # image 2 keeps 1, image 3 keeps 3
                   "pattern": ["dotted", "dotted", "solid", "dotted"]}
    assert edit_success(predictions, identity, "position", "left") == 0.5  # images 0 and 1; 2 lost it, 3 is not left
    assert edit_success(predictions, identity, "position", "right") == 0.25


def test_word_norms_measure_each_word_beside_the_vocabulary():
    components = load_components("toy", device="cpu")
    pipe = ELITEPipeline(components, GlobalMapper.from_pretrained(ASSETS_DIR / "toy-global-mapper"))
    norms = word_norms(pipe, CONCEPTS[:2])
    words = torch.stack([pipe.encode(*concept_views(c)[0]).words for c in CONCEPTS[:2]])
    assert norms["words"][0] == round(float(words[:, 0].norm(dim=-1).mean()), 3) and len(norms["words"]) == 5
    embeddings = components.text_encoder.get_input_embeddings().weight.norm(dim=-1)
    assert norms["vocabulary_mean"] == round(float(embeddings.mean()), 3) > 0
    assert norms["vocabulary_max"] == round(float(embeddings.max()), 3) >= norms["vocabulary_mean"]


def test_concepts_are_scored_against_their_true_labels_and_the_baseline_can_be_left_out():
    components = load_components("toy", device="cpu")
    judge = ToyJudge.from_pretrained(JUDGE_FOLDER).eval()
    assert concept_identity(judge, CONCEPTS[0]) == {"shape": "heart", "colour": "red", "pattern": "dotted"}
    pipe = ELITEPipeline(components, GlobalMapper.from_pretrained(ASSETS_DIR / "toy-global-mapper"))
    both = fidelity_and_editability(pipe, judge, CONCEPTS[:1], samples=1)
    alone = fidelity_and_editability(pipe, judge, CONCEPTS[:1], samples=1, with_baseline=False)
    assert "baseline_fidelity" not in alone["summary"] and "baseline_fidelity" in both["summary"]
    assert alone["summary"]["fidelity"] == both["summary"]["fidelity"]  # seeded: the same images
    low, high = both["summary"]["fidelity_interval"]
    assert low <= both["summary"]["fidelity"] <= high


def test_the_evaluation_command_can_leave_the_class_word_out(monkeypatch, tmp_path):
    """A sweep over mappers scores the class word once: `--without-class-word` passes that on."""
    seen = {}

    def fake_scores(pipe, judge, concepts, samples, seed, local_scale, with_baseline):
        seen["with_baseline"] = with_baseline
        raise SystemExit(0)  # stop before anything is generated

    monkeypatch.setattr(evaluation, "fidelity_and_editability", fake_scores)
    for arguments, expected in (([], True), (["--without-class-word"], False)):
        with pytest.raises(SystemExit):
            evaluation.main(arguments)
        assert seen.pop("with_baseline") is expected
