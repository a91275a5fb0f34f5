"""Stage-1 trainer: logs both losses, checkpoints atomically, keeps the last K, resumes exactly."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from diffusers import DDPMScheduler
from test_data import make_openimages_folder

from elite_tutorial.attention import elite_attention
from elite_tutorial.cli import main as elite_train
from elite_tutorial.data import OpenImagesSource, clip_normalise
from elite_tutorial.mappers import GlobalMapper, clip_feature_levels, cross_attention_modules
from elite_tutorial.toyworld.sources import ToyWorldSource
from elite_tutorial.training import (
    PROFILES,
    _fresh_mapper,
    _noised_latents,
    _parameter_groups,
    learning_rate_factor,
    train_global,
    training_step_losses,
)
from elite_tutorial.words import encode_prompts_with_words

RECIPE = replace(PROFILES["smoke"], steps=4, checkpoint_every=1, keep_checkpoints=2, validate_every=4)


def source():
    return ToyWorldSource(clip_size=32, image_size=32)  # the tiny components read 32 px


def state(mapper):
    return {k: v.clone() for k, v in mapper.state_dict().items()}


def test_a_short_run_logs_checkpoints_and_validates(tiny, tmp_path):
    mapper = train_global(tiny, source(), tmp_path / "run", RECIPE)
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert len(log["history"]) == 4 and set(log["history"][0]) == {"loss_mle", "loss_reg"}
    assert all(np.isfinite(h["loss_mle"]) and h["loss_reg"] > 0 for h in log["history"])
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000003", "step-000004"]
    assert (tmp_path / "run" / "validation" / "step-000004.png").is_file()
    loaded, trained = state(GlobalMapper.from_pretrained(tmp_path / "run" / "mapper")), state(mapper)
    assert loaded.keys() == trained.keys() and all(torch.equal(loaded[k], trained[k]) for k in trained)
    fresh = state(GlobalMapper.from_components(tiny))
    assert any(not torch.equal(fresh[k], trained[k]) for k in trained)
    # the frozen models stayed frozen and unchanged
    assert not any(p.requires_grad for model in tiny.models().values() for p in model.parameters())


def test_resume_latest_reaches_the_weights_of_an_uninterrupted_run(tiny, tmp_path):
    # a falling rate: the resumed run must pick the schedule up at the step it resumes from
    recipe = replace(RECIPE, gradient_accumulation=2, lr_schedule="linear")
    straight = state(train_global(tiny, source(), tmp_path / "straight", recipe))
    train_global(tiny, source(), tmp_path / "resumed", recipe, stop_after=2)
    assert not (tmp_path / "resumed" / "mapper").exists()  # interrupted: no final mapper yet
    # a checkpoint written before a recipe field existed resumes: the field's default is the old behaviour
    for log_path in (tmp_path / "resumed" / "checkpoints").glob("*/log.json"):
        log = json.loads(log_path.read_text())
        del log["recipe"]["snr_gamma"], log["recipe"]["key_value_anchor"]
        log_path.write_text(json.dumps(log))
    resumed = state(train_global(tiny, source(), tmp_path / "resumed", recipe, resume=True))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    log = json.loads((tmp_path / "resumed" / "log.json").read_text())
    assert log["history"] == json.loads((tmp_path / "straight" / "log.json").read_text())["history"]


@pytest.mark.research
def test_learning_rate_schedules_fall_from_the_recipes_rate_to_zero():
    steps = 10
    assert [learning_rate_factor("constant", step, steps) for step in (0, 9)] == [1.0, 1.0]
    assert [learning_rate_factor("linear", step, steps) for step in (0, 5, 9)] == pytest.approx([1.0, 0.5, 0.1])
    assert [learning_rate_factor("cosine", step, steps) for step in (0, 5)] == pytest.approx([1.0, 0.5])
    assert 0 < learning_rate_factor("cosine", 9, steps) < 0.05
    with pytest.raises(ValueError, match="constant, linear, cosine"):
        learning_rate_factor("step", 0, steps)
    with pytest.raises(ValueError, match="'step'"):
        replace(RECIPE, lr_schedule="step")


@pytest.mark.research
def test_a_falling_rate_makes_the_last_update_smaller_than_a_constant_rate_does(tiny, tmp_path):
    recipe = replace(RECIPE, steps=3, checkpoint_every=1, keep_checkpoints=3)
    train_global(tiny, source(), tmp_path / "constant", recipe)
    train_global(tiny, source(), tmp_path / "linear", replace(recipe, lr_schedule="linear"))

    def last_update(run):  # how far the mapping MLPs moved in the last step
        before, after = (GlobalMapper.from_pretrained(tmp_path / run / "checkpoints" / f"step-00000{s}" / "mapper")
                         for s in (2, 3))
        return float(sum((a.weight - b.weight).norm() for a, b in zip(after.mapping[0], before.mapping[0])
                         if isinstance(a, torch.nn.Linear)))

    # the linear schedule's third of three steps runs at a third of the rate
    assert 0 < last_update("linear") < 0.5 * last_update("constant")


def test_resume_refuses_another_recipe_and_a_fresh_run_refuses_a_used_folder(tiny, tmp_path):
    train_global(tiny, source(), tmp_path / "run", RECIPE, stop_after=1)
    with pytest.raises(ValueError, match="another recipe"):
        train_global(tiny, source(), tmp_path / "run", replace(RECIPE, reg_weight=0.0), resume=True)
    with pytest.raises(FileExistsError, match="--resume latest"):
        train_global(tiny, source(), tmp_path / "run", RECIPE)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train_global(tiny, source(), tmp_path / "empty", RECIPE, resume=True)


def test_one_word_ablation_trains_only_w0(tiny, tmp_path):
    mapper = train_global(tiny, source(), tmp_path / "run", replace(RECIPE, num_words=1, reg_weight=0.0))
    fresh = GlobalMapper.from_components(tiny)  # same seed: the same initial weights
    assert not torch.equal(mapper.mapping[0][0].weight, fresh.mapping[0][0].weight)
    assert torch.equal(mapper.mapping[3][0].weight, fresh.mapping[3][0].weight)


def test_key_value_lr_scale_sets_the_copies_rate_and_zero_keeps_them_the_unets(tiny, tmp_path):
    fresh = state(_fresh_mapper(GlobalMapper, tiny, RECIPE.seed))  # the run's initial weights
    frozen = state(train_global(tiny, source(), tmp_path / "frozen", replace(RECIPE, key_value_lr_scale=0.0)))
    copies = [k for k in fresh if k.startswith(("to_k_global", "to_v_global"))]
    assert copies and all(torch.equal(frozen[k], fresh[k]) for k in copies)
    assert any(not torch.equal(frozen[k], fresh[k]) for k in fresh if k not in copies)
    slow = _parameter_groups(GlobalMapper.from_components(tiny), 1e-3, 0.1)
    assert [group["lr"] for group in slow] == [1e-3, pytest.approx(1e-4)]
    assert len(slow[1]["params"]) == len(copies)


@pytest.mark.research
def test_object_loss_weight_counts_the_objects_pixels_that_many_times(tiny):
    batch = source().batch(np.random.default_rng(0), 2)
    scheduler = DDPMScheduler()
    mapper = GlobalMapper.from_components(tiny)

    def loss(recipe, batch):
        generator = torch.Generator().manual_seed(0)
        with elite_attention(tiny.unet, mapper):
            return training_step_losses(tiny, mapper, batch, recipe, scheduler, generator)["loss_mle"]

    plain = loss(RECIPE, batch)
    assert loss(replace(RECIPE, object_loss_weight=1.0), {**batch, "target_object_mask": None}) == plain  # unread at 1
    everywhere = {**batch, "target_object_mask": torch.ones_like(batch["target_object_mask"])}
    torch.testing.assert_close(loss(replace(RECIPE, object_loss_weight=5.0), everywhere), plain)  # all weighted alike
    assert loss(replace(RECIPE, object_loss_weight=5.0), batch) != plain
    with pytest.raises(ValueError, match="needs object masks"):
        loss(replace(RECIPE, object_loss_weight=5.0), {k: v for k, v in batch.items() if k != "target_object_mask"})


@pytest.mark.research
def test_min_snr_weights_each_sample_by_min_snr_gamma_over_snr(tiny):
    batch = source().batch(np.random.default_rng(0), 4)
    scheduler = DDPMScheduler()
    mapper = GlobalMapper.from_components(tiny)

    def loss(recipe):
        with elite_attention(tiny.unet, mapper):
            return training_step_losses(tiny, mapper, batch, recipe, scheduler, torch.Generator().manual_seed(0))["loss_mle"]

    # the same draws, stated apart: the per-sample errors and SNR(t) = ᾱ / (1 - ᾱ)
    noisy, noise, timesteps = _noised_latents(tiny, batch["pixel_values"], scheduler, torch.Generator().manual_seed(0))
    with torch.no_grad(), elite_attention(tiny.unet, mapper):
        words = mapper([level.float() for level in clip_feature_levels(tiny.image_encoder, clip_normalise(batch["clip_pixels"]))])
        context = encode_prompts_with_words(batch["prompts"], words[:, : RECIPE.num_words], tiny.tokenizer, tiny.text_encoder)
        per_sample = (tiny.unet(noisy, timesteps, encoder_hidden_states=context).sample - noise).square().mean((1, 2, 3))
    alpha_bar = scheduler.alphas_cumprod[timesteps]
    snr = alpha_bar / (1 - alpha_bar)
    gamma = float(snr.median())  # some samples above it, some below
    with torch.no_grad():
        torch.testing.assert_close(loss(replace(RECIPE, snr_gamma=gamma)), (per_sample * snr.clamp(max=gamma) / snr).mean())
        torch.testing.assert_close(loss(replace(RECIPE, snr_gamma=1e9)), loss(RECIPE))  # above every SNR: the plain mean


@pytest.mark.research
def test_key_value_drift_is_the_copies_relative_squared_distance_from_the_unets(tiny):
    mapper = GlobalMapper.from_components(tiny)
    assert float(mapper.key_value_drift(tiny.unet).detach()) == 0.0  # fresh copies are the UNet's own
    layers = cross_attention_modules(tiny.unet)
    size = sum(m.to_k.weight.square().sum() + m.to_v.weight.square().sum() for m in layers.values())
    to_k, _ = mapper.key_value(next(iter(layers)))
    step = torch.randn(to_k.weight.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        to_k.weight += step
    drift = mapper.key_value_drift(tiny.unet)
    torch.testing.assert_close(drift, step.square().sum() / size)
    drift.backward()
    torch.testing.assert_close(to_k.weight.grad, 2 * step / size)  # toward the UNet's weight


@pytest.mark.research
def test_key_value_anchor_adds_its_loss_and_holds_the_copies_nearer_the_unets(tiny, tmp_path):
    batch = source().batch(np.random.default_rng(0), 2)
    mapper = GlobalMapper.from_components(tiny)
    with torch.no_grad():
        for copy in mapper.to_v_global.values():
            copy.weight *= 1.5
    with elite_attention(tiny.unet, mapper):
        plain = training_step_losses(tiny, mapper, batch, RECIPE, DDPMScheduler(), torch.Generator().manual_seed(0))
        anchored = training_step_losses(tiny, mapper, batch, replace(RECIPE, key_value_anchor=2.0), DDPMScheduler(),
                                        torch.Generator().manual_seed(0))
    assert "loss_anchor" not in plain and torch.equal(anchored["loss_mle"], plain["loss_mle"])
    torch.testing.assert_close(anchored["loss_anchor"], 2.0 * mapper.key_value_drift(tiny.unet))
    assert float(anchored["loss_anchor"]) > 0

    free = train_global(tiny, source(), tmp_path / "free", RECIPE)
    held = train_global(tiny, source(), tmp_path / "held", replace(RECIPE, key_value_anchor=1e4))
    with torch.no_grad():
        assert 0 < float(held.key_value_drift(tiny.unet)) < float(free.key_value_drift(tiny.unet))
    assert "loss_anchor" in json.loads((tmp_path / "held" / "log.json").read_text())["history"][-1]


@pytest.mark.research
def test_the_command_trains_on_the_object_alone_with_its_pixels_weighted_and_min_snr(tmp_path):
    elite_train(["global", "--preset", "tiny-random", "--profile", "smoke", "--steps", "1", "--toy-global-view", "object",
                 "--toy-global-target", "close-up",
                 "--object-loss-weight", "3", "--snr-gamma", "5", "--key-value-anchor", "1", "--lr-schedule", "cosine",
                 "--out", str(tmp_path / "run")])
    assert GlobalMapper.from_pretrained(tmp_path / "run" / "mapper").input_view == "object"
    recipe = json.loads((tmp_path / "run" / "log.json").read_text())["recipe"]
    assert recipe["object_loss_weight"] == 3.0 and recipe["snr_gamma"] == 5.0 and recipe["key_value_anchor"] == 1.0
    assert recipe["lr_schedule"] == "cosine"


def test_the_command_keeps_the_checkpoints_it_is_told_to(tmp_path):
    elite_train(["global", "--preset", "tiny-random", "--profile", "smoke", "--steps", "4", "--checkpoint-every", "1",
                 "--keep-checkpoints", "4", "--out", str(tmp_path / "run")])
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["step-000001", "step-000002", "step-000003", "step-000004"]  # the smoke profile keeps 2
    recipe = json.loads((tmp_path / "run" / "log.json").read_text())["recipe"]
    assert recipe["checkpoint_every"] == 1 and recipe["keep_checkpoints"] == 4


@pytest.mark.research
def test_the_command_trains_on_fixed_objects_and_validates_them_with_their_masks(tmp_path, recwarn):
    elite_train(["global", "--preset", "tiny-random", "--profile", "smoke", "--steps", "2", "--toy-fixed-objects", "3",
                 "--out", str(tmp_path / "run")])
    assert GlobalMapper.from_pretrained(tmp_path / "run" / "mapper").input_view == "object"
    assert (tmp_path / "run" / "validation" / "step-000002.png").is_file()
    assert not [w for w in recwarn if "without a mask" in str(w.message)]  # the validation grid passed the masks
    with pytest.raises(ValueError, match="1 to 10"):
        elite_train(["global", "--preset", "tiny-random", "--profile", "smoke", "--toy-fixed-objects", "11",
                     "--out", str(tmp_path / "too-many")])
    with pytest.raises(ValueError, match="1 to 20 for shape-colour"):  # the other kind has twenty in its half
        elite_train(["global", "--preset", "tiny-random", "--profile", "smoke", "--toy-fixed-objects", "21",
                     "--toy-fixed-kind", "shape-colour", "--out", str(tmp_path / "too-many")])


def test_the_command_trains_on_an_openimages_folder(tmp_path):
    folder = make_openimages_folder(tmp_path / "oi")
    elite_train(["global", "--preset", "tiny-random", "--profile", "smoke", "--steps", "2",
                 "--data", str(folder), "--out", str(tmp_path / "run")])
    assert (tmp_path / "run" / "mapper" / "model.safetensors").is_file()
    assert OpenImagesSource(folder).boxes  # the folder the run read


def test_batch_workers_build_the_same_batches(tiny, tmp_path):
    recipe = replace(RECIPE, steps=3, gradient_accumulation=2, validate_every=100)
    inline = train_global(tiny, source(), tmp_path / "inline", recipe)
    ahead = train_global(tiny, source(), tmp_path / "ahead", recipe, data_workers=2)
    assert all(torch.equal(state(inline)[k], state(ahead)[k]) for k in state(inline))
    logs = [json.loads((tmp_path / run / "log.json").read_text())["history"] for run in ("inline", "ahead")]
    assert logs[0] == logs[1]


def test_gradient_checkpointing_changes_memory_not_results(tiny, tmp_path, monkeypatch):
    """The UNet's blocks run through torch's checkpoint (counted) only when asked, with the same result."""
    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    recipe = replace(RECIPE, steps=2, validate_every=100)
    plain = state(train_global(tiny, source(), tmp_path / "plain", recipe))
    assert not calls
    checkpointed = state(train_global(tiny, source(), tmp_path / "checkpointed", recipe, gradient_checkpointing=True))
    tiny.unet.disable_gradient_checkpointing()
    assert calls  # recomputed in the backward pass: checkpointing was on
    assert all(torch.allclose(plain[k], checkpointed[k], atol=1e-6) for k in plain)


def test_bf16_mixed_precision_keeps_fp32_mapper_weights(tiny, tmp_path):
    AcceleratorState._reset_state(True)  # accelerate keeps one precision per process; tests switch it
    try:
        mapper = train_global(tiny, source(), tmp_path / "run", replace(RECIPE, steps=2, validate_every=100), mixed_precision="bf16")
    finally:
        AcceleratorState._reset_state(True)
    assert all(p.dtype == torch.float32 for p in mapper.parameters())
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert all(np.isfinite(h["loss_mle"]) for h in log["history"])


def test_the_command_starts_from_an_initial_mapper_of_the_same_view(tiny, tmp_path):
    """At a learning rate of 0 the run ends where it started: with --init-mapper, at that mapper."""
    with torch.random.fork_rng():
        torch.manual_seed(5)
        GlobalMapper.from_components(tiny, input_view="object").save_pretrained(tmp_path / "init")
    options = ["global", "--preset", "tiny-random", "--profile", "smoke", "--steps", "2", "--learning-rate", "0"]
    elite_train(options + ["--toy-global-view", "object", "--init-mapper", str(tmp_path / "init"), "--out", str(tmp_path / "run")])
    initial = state(GlobalMapper.from_pretrained(tmp_path / "init"))
    trained = state(GlobalMapper.from_pretrained(tmp_path / "run" / "mapper"))
    assert initial.keys() == trained.keys() and all(torch.equal(initial[k], trained[k]) for k in initial)
    elite_train(options + ["--toy-global-view", "object", "--out", str(tmp_path / "fresh")])
    fresh = state(GlobalMapper.from_pretrained(tmp_path / "fresh" / "mapper"))
    assert any(not torch.equal(initial[k], fresh[k]) for k in initial)
    with pytest.raises(ValueError, match="'object' view"):
        elite_train(options + ["--init-mapper", str(tmp_path / "init"), "--out", str(tmp_path / "other-view")])
