"""The second reader of the toy world's attributes, and the study that checks the judge with it."""
import json

import numpy as np
import pytest
import torch

from elite_tutorial.studies.judge_check import SECOND_READER_FOLDER, agreement_table, cohen_kappa, contact_sheet, pick_disagreements, tally
from elite_tutorial.toyworld.judge import ResidualReader, ToyJudge, accuracy
from elite_tutorial.toyworld.render import ATTRIBUTES, exact_scene, random_spec


def test_the_second_reader_has_the_judges_interface(tmp_path):
    torch.manual_seed(0)
    reader = ResidualReader(width=8)
    logits = reader(torch.rand(3, 3, 64, 64))
    assert {name: tuple(x.shape) for name, x in logits.items()} == {name: (3, len(v)) for name, v in ATTRIBUTES.items()}
    reader.train()
    images = np.random.default_rng(0).integers(0, 256, size=(5, 64, 64, 3), dtype=np.uint8)
    read = reader.predict(images, batch_size=2)
    assert reader.training  # predict reads in eval mode (BatchNorm's running statistics), then leaves the mode as it was
    assert all(len(read[name]) == 5 and set(read[name]) <= set(values) for name, values in ATTRIBUTES.items())
    assert read == reader.predict(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)  # uint8 or [0, 1] floats
    assert set(ToyJudge().predict(images)) == set(read)  # the same answer's shape as the judge's
    reader.save_pretrained(tmp_path / "reader")  # BatchNorm's 0-d step count is saved and checksummed too
    again = ResidualReader.from_pretrained(tmp_path / "reader")
    assert again.predict(images) == reader.predict(images)


@pytest.mark.research
def test_cohen_kappa_on_known_cases():
    labels = np.array(["a", "b", "c", "a", "b"])
    assert cohen_kappa(labels, labels) == pytest.approx(1.0)
    rng = np.random.default_rng(0)  # two raters who ignore each other: kappa near 0
    assert abs(cohen_kappa(rng.integers(0, 4, 20_000), rng.integers(0, 4, 20_000))) < 0.02
    # a worked example: 50 items, yes/yes 20, yes/no 5, no/yes 10, no/no 15. p_o = 35/50 = 0.7; the first says
    # yes 25 times, the second 30, so p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.5 and kappa = (0.7 - 0.5) / (1 - 0.5) = 0.4
    first = ["yes"] * 25 + ["no"] * 25
    second = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(first, second) == pytest.approx(0.4)
    assert cohen_kappa(first, second, classes=["yes", "no", "maybe"]) == pytest.approx(0.4)  # unused classes add nothing
    # always disagreeing, each rater balanced: kappa -1
    assert cohen_kappa(["x", "y"] * 10, ["y", "x"] * 10) == pytest.approx(-1.0)
    assert np.isnan(cohen_kappa(["x"] * 4, ["x"] * 4))  # one label for everything: chance agreement 1, kappa undefined
    with pytest.raises(ValueError, match="one length"):
        cohen_kappa(["x"], ["x", "y"])


def _reads(rng, n):
    return {name: rng.choice(values, size=n) for name, values in ATTRIBUTES.items()}


@pytest.mark.research
def test_disagreements_are_picked_drawn_and_tallied(tmp_path):
    rng = np.random.default_rng(0)
    judge = _reads(rng, 40)
    second = {name: values.copy() for name, values in judge.items()}
    second["shape"][:3] = np.where(judge["shape"][:3] == "circle", "star", "circle")  # 3 identity disagreements
    second["size"][10:15] = np.where(judge["size"][10:15] == "small", "large", "small")  # 5 others
    table = agreement_table(judge, second)
    assert table["shape"]["agreement"] == pytest.approx(37 / 40, abs=1e-3) and table["shape"]["meets_target"]
    assert table["colour"] == {"agreement": 1.0, "kappa": 1.0, "meets_target": True, "disagreements": {}}
    picks = pick_disagreements(judge, second, count=6)
    assert [p["attribute"] for p in picks].count("shape") == 3 and len(picks) == 6  # identity first, then filled
    assert all(p["judge"] != p["second_reader"] for p in picks) and picks == pick_disagreements(judge, second, count=6)
    images = rng.integers(0, 256, size=(40, 64, 64, 3), dtype=np.uint8)
    contact_sheet(images, picks, {"method": np.array(["ELITE global"] * 40)}, tmp_path / "sheet.png", columns=3)
    assert (tmp_path / "sheet.png").is_file() and not list(tmp_path.glob("*partial*"))
    labels = {"figure": "sheet.png", "labels": [{"pick": p["pick"], "image": p["image"], "attribute": p["attribute"],
                                                 "verdict": "judge" if p["pick"] % 2 else "unclear"} for p in picks]}
    (tmp_path / "eye.json").write_text(json.dumps(labels))
    counted = tally(picks, tmp_path / "eye.json")
    assert counted["verdicts"] == {"judge": 3, "second reader": 0, "neither": 0, "unclear": 3}
    labels["labels"][0]["image"] += 1  # labels of another figure's picks
    (tmp_path / "eye.json").write_text(json.dumps(labels))
    with pytest.raises(ValueError, match="label the new figure"):
        tally(picks, tmp_path / "eye.json")


@pytest.mark.research
def test_shipped_second_reader_reads_fresh_renders():
    reader = ResidualReader.from_pretrained(SECOND_READER_FOLDER)
    assert sum(p.numel() for p in reader.parameters()) < 300_000
    specs = [random_spec(np.random.default_rng(7_000_000 + i), 0.0) for i in range(300)]
    scores = accuracy(reader, np.stack([exact_scene(s).image for s in specs]), [s.labels() for s in specs])
    assert min(scores.values()) >= 0.95, scores
