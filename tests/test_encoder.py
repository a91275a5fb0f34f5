"""The retrained toy image encoder: its batches, its loss, the command and the identity probe (gate 2)."""
import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
from transformers import CLIPVisionModel
from transformers.models.clip.modeling_clip import image_text_contrastive_loss

from elite_tutorial.storage import write_json_atomic
from elite_tutorial.studies.encoder import (
    PROFILES,
    contrast_group,
    encoder_batch,
    encoder_samples,
    identity_probe,
    load_encoder,
    main,
    multi_positive_contrastive_loss,
    probe_specs,
    train_encoder,
    training_spec,
)
from elite_tutorial.studies.pretrain import tokenize
from elite_tutorial.toyworld.concepts import CONCEPTS, is_held_out
from elite_tutorial.toyworld.models import toy_clip, toy_tokenizer
from elite_tutorial.toyworld.render import ATTRIBUTES

pytestmark = pytest.mark.research  # the encoder study: `make test-research`


def test_with_one_positive_each_the_loss_is_clips():
    logits = torch.randn(6, 6)
    assert torch.allclose(multi_positive_contrastive_loss(logits, torch.eye(6, dtype=torch.bool)), image_text_contrastive_loss(logits.T))


def test_a_caption_matches_every_image_with_the_attributes_it_names():
    tokenizer, recipe = toy_tokenizer(), PROFILES["smoke"]
    samples = encoder_samples(np.random.default_rng(0), recipe)
    batch = encoder_batch(np.random.default_rng(0), recipe, tokenizer)
    positives = batch["positives"]
    assert batch["pixel_values"].shape == (recipe.batch, 3, 64, 64) and positives.shape == (recipe.batch,) * 2
    assert torch.equal(batch["input_ids"], tokenize(tokenizer, [text for *_, text in samples], padding="longest"))
    for j, (spec, _, named, text) in enumerate(samples):
        said = [word for word in text.split() if any(word in ATTRIBUTES[a] for a in ("shape", "colour", "pattern"))]
        assert sorted(said) == sorted(spec.labels()[a] for a in named)  # the caption says what it names
        for i, (other, *_) in enumerate(samples):
            assert positives[i, j] == all(other.labels()[a] == spec.labels()[a] for a in named)
    assert positives.diagonal().all() and positives.sum() > recipe.batch  # partial captions match other images
    assert any(len(named) == 3 for _, _, named, _ in samples) and any(len(named) < 3 for _, _, named, _ in samples)


def test_no_encoder_image_shows_a_personal_concept_and_groups_change_one_attribute():
    rng = np.random.default_rng(1)
    assert not any(is_held_out(training_spec(rng).objects[0]) for _ in range(500))
    for attribute in ("shape", "colour", "pattern"):
        group = contrast_group(rng, attribute)
        labels = [spec.labels() for spec in group]
        assert len({label[attribute] for label in labels}) == len(group) >= 3
        assert all({k: v for k, v in label.items() if k != attribute} == {k: v for k, v in labels[0].items() if k != attribute}
                   for label in labels)
        assert not any(is_held_out(spec.objects[0]) for spec in group)


def test_the_probe_fits_on_training_identities_and_scores_the_concepts():
    fitted, held_out = probe_specs(training=40, per_concept=2)
    assert len(held_out) == 2 * len(CONCEPTS) and not any(is_held_out(s.objects[0]) for s in fitted)
    assert all(is_held_out(s.objects[0]) for s in held_out)
    torch.manual_seed(0)
    encoder = CLIPVisionModel(toy_clip(toy_tokenizer()).config.vision_config).eval()  # random weights
    probe = identity_probe(encoder, training=300, per_concept=4)
    assert probe["held_out_scenes"] == 4 * len(CONCEPTS) and probe["scenes_fitted"] == 240
    for attribute, result in probe["attributes"].items():
        assert 0 <= result["held_out_identities"] <= 1 and result["chance"] == round(1 / len(ATTRIBUTES[attribute]), 3)
    # even random features carry an object's colour (mean pixel values survive them); not its shape
    assert probe["attributes"]["colour"]["held_out_identities"] > 0.5


def test_the_command_writes_a_vision_tower_that_loads_and_resumes_an_interrupted_run(tmp_path):
    out = tmp_path / "encoder"
    main(["train", "--out", str(out), "--profile", "smoke"])
    encoder = load_encoder(out)
    record = json.loads((out / "record.json").read_text())
    assert isinstance(encoder, CLIPVisionModel) and record["recipe"]["steps"] == PROFILES["smoke"].steps
    assert not (tmp_path / "encoder.work").exists()
    # an interrupted run's checkpoint is an encoder too, and the same command finishes the run from it
    work = tmp_path / "again.work"
    train_encoder(PROFILES["smoke"], work, "cpu", stop_after=2)
    from_checkpoint = load_encoder(work / "encoder.checkpoint.safetensors")
    assert from_checkpoint.config.patch_size == encoder.config.patch_size
    write_json_atomic(work / "recipe.json", asdict(PROFILES["smoke"]))
    main(["train", "--out", str(tmp_path / "again"), "--profile", "smoke"])
    finished = load_encoder(tmp_path / "again")
    for name, tensor in encoder.state_dict().items():  # the same steps, so the same weights
        torch.testing.assert_close(finished.state_dict()[name], tensor)
