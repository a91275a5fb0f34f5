"""The toy comparison table: every method scored on the same protocol, reproducible from its seed."""
from elite_tutorial import load_components
from elite_tutorial.comparison import METHODS, compare, table
from elite_tutorial.components import ASSETS_DIR
from elite_tutorial.mappers import GlobalMapper, LocalMapper
from elite_tutorial.toyworld.concepts import CONCEPTS


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
