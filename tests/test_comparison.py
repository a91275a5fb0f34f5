"""The toy comparison table: every method scored on the same protocol, reproducible from its seed; the
reference that describes each concept in words, plain and through a mapper's k/v copies."""

import numpy as np
import torch

from elite_tutorial import load_components
from elite_tutorial.comparison import METHODS, compare, table
from elite_tutorial.components import ASSETS_DIR
from elite_tutorial.evaluation import (
    JUDGE_FOLDER,
    class_word_generator,
    concept_identity,
    described,
    described_generator,
    edit_success,
    fidelity_and_editability,
    score,
    through_key_values,
    word_norms,
)
from elite_tutorial.mappers import GlobalMapper, LocalMapper
from elite_tutorial.pipeline import ELITEPipeline
from elite_tutorial.toyworld.concepts import CONCEPTS, concept_by_name, concept_views
from elite_tutorial.toyworld.judge import ToyJudge


def test_a_rerun_with_the_same_seed_gives_the_same_table():
    components = load_components("toy", device="cpu")
    global_mapper = GlobalMapper.from_pretrained(ASSETS_DIR / "toy-global-mapper")
    local_mapper = LocalMapper.from_pretrained(ASSETS_DIR / "toy-local-mapper")
    runs = [compare(components, global_mapper, local_mapper, CONCEPTS[:1], samples=1, ti_profile="smoke", progress=False)
            for _ in range(2)]
    assert list(runs[0]["methods"]) == list(METHODS)
    for method in METHODS:
        first, second = (run["methods"][method] for run in runs)
        assert first["summary"] == second["summary"] and first["concepts"] == second["concepts"]
        assert {"fidelity", "editability", "clip_t", "clip_i", "dino_i"} <= set(first["summary"])
    assert runs[0]["methods"]["Textual Inversion"]["seconds_per_concept"] > runs[0]["methods"]["ELITE global"]["seconds_per_concept"] > 0
    assert table(runs[0]).count("\n") == len(METHODS) + 1


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
