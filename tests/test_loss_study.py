"""The loss study: wrong captions differ in one attribute; a mapper's untrained copies are the UNet's."""
import numpy as np
import pytest
import torch

from elite_tutorial import load_components
from elite_tutorial.mappers import GlobalMapper
from elite_tutorial.studies.loss_study import WRONG, _with_another, loss_by_caption
from elite_tutorial.toyworld.render import random_spec

pytestmark = pytest.mark.research  # the loss study: `make test-research`


def test_a_wrong_caption_changes_one_attribute_of_the_object():
    rng = np.random.default_rng(0)
    for _ in range(20):
        spec = random_spec(rng, 0.0)
        for field, values in WRONG.values():
            changed = _with_another(spec, field, values, rng)
            before, after = spec.labels(), changed.labels()
            assert before[field] != after[field] and after[field] in values
            assert {k: v for k, v in before.items() if k != field} == {k: v for k, v in after.items() if k != field}


@pytest.fixture(scope="module")
def toy():
    return load_components("toy", device="cpu", dtype=torch.float32)


def test_the_toy_loss_punishes_a_wrong_shape_and_fresh_copies_change_nothing(toy):
    torch.manual_seed(0)
    fresh = GlobalMapper.from_components(toy).eval()  # its k/v copies are the UNet's own
    report = loss_by_caption(toy, {"fresh": fresh}, count=64, batch_size=32)["errors"]
    assert report["fresh: right caption, through its k/v copies"] == report["right caption"]
    assert report["wrong shape"]["object"] > report["right caption"]["object"] + 0.02
    assert len(report["right caption"]["object by timestep band"]) == 4
    again = loss_by_caption(toy, {}, count=64, batch_size=32)["errors"]
    assert again["wrong colour"] == report["wrong colour"]  # seeded
