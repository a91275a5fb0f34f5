"""Stage-1 trainer: logs both losses, checkpoints atomically, keeps the last K, resumes exactly."""
import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors import safe_open
from safetensors.torch import save_file
from test_data import make_openimages_folder

from elite_tutorial.cli import main as elite_train
from elite_tutorial.data import OpenImagesSource
from elite_tutorial.mappers import GlobalMapper, cross_attention_modules
from elite_tutorial.toyworld.sources import ToyWorldSource
from elite_tutorial.training import (
    LOCAL_PROFILES,
    PROFILES,
    _fresh_mapper,
    _parameter_groups,
    saved_recipe,
    train_global,
)

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
    recipe = replace(RECIPE, gradient_accumulation=2)
    straight = state(train_global(tiny, source(), tmp_path / "straight", recipe))
    train_global(tiny, source(), tmp_path / "resumed", recipe, stop_after=2)
    assert not (tmp_path / "resumed" / "mapper").exists()  # interrupted: no final mapper yet
    # a checkpoint written before a recipe field existed resumes: the field's default is the old behaviour;
    # one written before an option was removed resumes when it holds the behaviour every run now has
    for log_path in (tmp_path / "resumed" / "checkpoints").glob("*/log.json"):
        log = json.loads(log_path.read_text())
        del log["recipe"]["key_value_lr_scale"]
        log["recipe"].update(lr_schedule="constant", object_loss_weight=1.0, snr_gamma=None, key_value_anchor=0.0)
        log_path.write_text(json.dumps(log))
        # checkpoints written before the training state held the weights keep them in mapper/ alone
        state_path = log_path.parent / "training_state.safetensors"
        with safe_open(str(state_path), "pt") as f:
            names, metadata = list(f.keys()), f.metadata()
            kept = {k: f.get_tensor(k) for k in names if not k.startswith("model.")}
        assert any(k.startswith("model.") for k in names) and kept
        save_file(kept, str(state_path), metadata)
    resumed = state(train_global(tiny, source(), tmp_path / "resumed", recipe, resume=True))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    log = json.loads((tmp_path / "resumed" / "log.json").read_text())
    assert log["history"] == json.loads((tmp_path / "straight" / "log.json").read_text())["history"]


def test_resume_refuses_another_recipe_and_a_fresh_run_refuses_a_used_folder(tiny, tmp_path):
    train_global(tiny, source(), tmp_path / "run", RECIPE, stop_after=1)
    with pytest.raises(ValueError, match="another recipe"):
        train_global(tiny, source(), tmp_path / "run", replace(RECIPE, reg_weight=0.0), resume=True)
    with pytest.raises(FileExistsError, match="--resume latest"):
        train_global(tiny, source(), tmp_path / "run", RECIPE)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train_global(tiny, source(), tmp_path / "empty", RECIPE, resume=True)
    # a v1 research run (an option since removed, at another value than today's behaviour) is refused by name
    log_path = next((tmp_path / "run" / "checkpoints").glob("*/log.json"))
    log = json.loads(log_path.read_text())
    log["recipe"]["lr_schedule"] = "linear"
    log_path.write_text(json.dumps(log))
    with pytest.raises(ValueError, match="lr_schedule='linear', an option removed"):
        train_global(tiny, source(), tmp_path / "run", RECIPE, resume=True)


def test_saved_recipes_of_the_shipped_mappers_read_as_todays():
    """Every recipe the repository holds (shipped mappers' logs, results) reads back as a recipe of today's
    fields, the removed options at the behaviour every run now has."""
    found = 0
    for path in sorted((Path(__file__).resolve().parents[1] / "assets").rglob("log.json")):
        log = json.loads(path.read_text())
        if "recipe" not in log or "steps" not in log["recipe"]:
            continue
        profile = PROFILES["toy"] if "num_words" in log["recipe"] else LOCAL_PROFILES["toy"]
        assert set(saved_recipe(log["recipe"], profile, str(path))) == set(asdict(profile)), path
        found += 1
    assert found >= 2


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


def test_the_command_keeps_the_checkpoints_it_is_told_to(tmp_path):
    elite_train(["global", "--preset", "tiny-random", "--profile", "smoke", "--steps", "4", "--checkpoint-every", "1",
                 "--keep-checkpoints", "4", "--out", str(tmp_path / "run")])
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["step-000001", "step-000002", "step-000003", "step-000004"]  # the smoke profile keeps 2
    recipe = json.loads((tmp_path / "run" / "log.json").read_text())["recipe"]
    assert recipe["checkpoint_every"] == 1 and recipe["keep_checkpoints"] == 4


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
        GlobalMapper.from_components(tiny, input_view="box").save_pretrained(tmp_path / "init")
    options = ["global", "--preset", "tiny-random", "--profile", "smoke", "--steps", "2", "--learning-rate", "0"]
    elite_train(options + ["--toy-global-view", "box", "--init-mapper", str(tmp_path / "init"), "--out", str(tmp_path / "run")])
    initial = state(GlobalMapper.from_pretrained(tmp_path / "init"))
    trained = state(GlobalMapper.from_pretrained(tmp_path / "run" / "mapper"))
    assert initial.keys() == trained.keys() and all(torch.equal(initial[k], trained[k]) for k in initial)
    elite_train(options + ["--toy-global-view", "box", "--out", str(tmp_path / "fresh")])
    fresh = state(GlobalMapper.from_pretrained(tmp_path / "fresh" / "mapper"))
    assert any(not torch.equal(initial[k], fresh[k]) for k in initial)
    with pytest.raises(ValueError, match="'box' view"):
        elite_train(options + ["--init-mapper", str(tmp_path / "init"), "--out", str(tmp_path / "other-view")])
