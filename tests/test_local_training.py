"""Stage 2: the scale augmentation, the object view, the trainer (local mapper only; exact resume)."""
import json
from dataclasses import replace

import numpy as np
import torch
from diffusers import DDPMScheduler
from PIL import Image

from elite_tutorial.attention import elite_attention
from elite_tutorial.cli import main as elite_train
from elite_tutorial.data import GLOBAL_VIEWS, object_view_for_clip, scale_augment, with_scale_phrase
from elite_tutorial.mappers import GlobalMapper, LocalMapper
from elite_tutorial.toyworld.sources import ToyWorldSource
from elite_tutorial.training import LOCAL_PROFILES, local_step_losses, train_local

RECIPE = replace(LOCAL_PROFILES["smoke"], steps=3, checkpoint_every=1, keep_checkpoints=2, validate_every=3)


def source():
    return ToyWorldSource(clip_size=32, image_size=32, latent_factor=2)  # the tiny components' sizes


def state(mapper):
    return {k: v.clone() for k, v in mapper.state_dict().items()}


def test_scale_augmentation_marks_the_real_pixels_and_says_so_in_the_caption():
    image = Image.fromarray(np.full((40, 40, 3), 200, np.uint8))
    seen = set()
    for seed in range(60):
        pixels, valid, phrase = scale_augment(image, 64, 8, np.random.default_rng(seed))
        assert pixels.shape == (3, 64, 64) and valid.shape == (1, 8, 8)
        seen.add(phrase)
        if phrase in ("a far away", "very small"):
            assert 0 < valid.sum() < 64
            assert pixels[:, 0, 0].eq(0).all() or pixels[:, -1, -1].eq(0).all()  # blank canvas somewhere
        else:
            assert valid.eq(1).all() and pixels.gt(0.5).all()  # the image everywhere
    assert {"a", "zoomed in", "close up"} <= seen and seen & {"a far away", "very small"}
    assert with_scale_phrase("a photo of a S", "close up") == "close up photo of a S"
    assert with_scale_phrase("the photo of a S", "a far away") == "a far away photo of a S"  # not "a far awayhe"
    assert with_scale_phrase("S on the left", "very small") == "very small S on the left"
    assert with_scale_phrase("a photo of a S", "a") == "a photo of a S"
    rng = np.random.default_rng(0)
    pixels, valid, phrase = scale_augment(image, 64, 8, rng, enabled=False)  # the toy profile's choice
    assert phrase == "a" and valid.eq(1).all() and pixels.gt(0.5).all()
    assert rng.integers(10**9) == np.random.default_rng(0).integers(10**9)  # nothing drawn


def test_object_view_blacks_out_the_background_and_moves_the_mask_with_the_object():
    pixels = np.full((64, 64, 3), 255, np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[16:48, 16:48] = True
    for seed in range(20):
        view, view_mask = object_view_for_clip(Image.fromarray(pixels), mask, 32, np.random.default_rng(seed))
        assert view.shape == (3, 32, 32) and view_mask.shape == (32, 32) and view_mask.any()
        inside, outside = view[:, view_mask], view[:, ~view_mask]
        assert inside.mean() > 0.8 and outside.mean() < 0.2


def test_stage_two_trains_the_local_mapper_with_the_global_one_frozen(tiny, tmp_path):
    torch.manual_seed(1)
    global_mapper = GlobalMapper.from_components(tiny)
    before = state(global_mapper)
    mapper = train_local(tiny, global_mapper, source(), tmp_path / "run", RECIPE)
    assert all(torch.equal(before[k], v) for k, v in global_mapper.state_dict().items())
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert len(log["history"]) == 3 and all(h["loss_reg"] > 0 and np.isfinite(h["loss_mle"]) for h in log["history"])
    assert (tmp_path / "run" / "validation" / "step-000003.png").is_file()
    fresh, trained = state(LocalMapper.from_components(tiny)), state(mapper)
    assert any(not torch.equal(fresh[k], trained[k]) for k in trained if k.startswith("to_v_local"))
    loaded = state(LocalMapper.from_pretrained(tmp_path / "run" / "mapper"))
    assert all(torch.equal(loaded[k], trained[k]) for k in trained)
    assert not any(p.requires_grad for model in tiny.models().values() for p in model.parameters())


def test_stage_two_shows_the_global_mapper_the_view_it_was_trained_on(tiny):
    batch = source().local_batch(np.random.default_rng(0), 2)
    scrambled = {**batch, "clip_pixels": torch.rand_like(batch["clip_pixels"])}
    losses = {}
    for view in GLOBAL_VIEWS:
        torch.manual_seed(1)
        global_mapper, local_mapper = GlobalMapper.from_components(tiny, input_view=view), LocalMapper.from_components(tiny)
        with elite_attention(tiny.unet, global_mapper, local_mapper=local_mapper):
            losses[view] = [local_step_losses(tiny, global_mapper, local_mapper, b, RECIPE, DDPMScheduler(),
                                              torch.Generator().manual_seed(0))["loss_mle"] for b in (batch, scrambled)]
    assert losses["image"][0] != losses["image"][1]  # reads the whole scene
    assert losses["object"][0] == losses["object"][1]  # reads the object cut out, not the scene


def test_stage_two_resume_reaches_the_weights_of_an_uninterrupted_run(tiny, tmp_path):
    global_mapper = GlobalMapper.from_components(tiny)
    straight = state(train_local(tiny, global_mapper, source(), tmp_path / "straight", RECIPE))
    train_local(tiny, global_mapper, source(), tmp_path / "resumed", RECIPE, stop_after=2)
    resumed = state(train_local(tiny, global_mapper, source(), tmp_path / "resumed", RECIPE, resume=True))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_stage_two_under_bf16_mixed_precision(tmp_path):
    """Autocast makes the local branch's gate fp32 and its attention bf16; the step must still add up."""
    from accelerate.state import AcceleratorState

    from elite_tutorial.components import load_components

    components = load_components("tiny-random", device="cpu", dtype=torch.bfloat16)
    AcceleratorState._reset_state(True)  # accelerate keeps one precision per process; tests switch it
    try:
        mapper = train_local(components, GlobalMapper.from_components(components), source(), tmp_path / "run",
                             replace(RECIPE, steps=2, validate_every=100), mixed_precision="bf16")
    finally:
        AcceleratorState._reset_state(True)
    assert all(p.dtype == torch.float32 for p in mapper.parameters())
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert all(np.isfinite(h["loss_mle"]) for h in log["history"])


def test_the_local_command(tiny, tmp_path):
    GlobalMapper.from_components(tiny).save_pretrained(tmp_path / "global")
    elite_train(["local", "--preset", "tiny-random", "--profile", "smoke", "--steps", "2",
                 "--global-mapper", str(tmp_path / "global"), "--out", str(tmp_path / "run")])
    assert (tmp_path / "run" / "mapper" / "model.safetensors").is_file()


def test_the_local_command_reads_an_openimages_folder_with_masks(tiny, tmp_path):
    from test_data import make_openimages_mask_folder
    GlobalMapper.from_components(tiny).save_pretrained(tmp_path / "global")
    folder = make_openimages_mask_folder(tmp_path / "oi")
    elite_train(["local", "--preset", "tiny-random", "--profile", "smoke", "--steps", "2", "--data", str(folder),
                 "--global-mapper", str(tmp_path / "global"), "--out", str(tmp_path / "run")])
    assert (tmp_path / "run" / "mapper" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "validation").is_dir()
