"""The toy comparison table: every method scored on the same protocol, reproducible from its seed; the
reference that describes each concept in words."""
from elite_tutorial import load_components
from elite_tutorial.comparison import METHODS, compare, table
from elite_tutorial.components import ASSETS_DIR
from elite_tutorial.evaluation import (JUDGE_FOLDER, class_word_generator, concept_identity, described,
                                       described_generator, score)
from elite_tutorial.mappers import GlobalMapper, LocalMapper
from elite_tutorial.toyworld.concepts import CONCEPTS, concept_by_name
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
