import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPTokenizer, CLIPVisionModel

from elite_tutorial import PresetUnavailableError, load_components
from elite_tutorial import components as components_module
from elite_tutorial.mappers import clip_feature_levels
from elite_tutorial.toyworld.models import tiny_random_components


def test_tiny_random_has_the_sd14_classes_and_is_frozen(tiny):
    assert isinstance(tiny.tokenizer, CLIPTokenizer)
    assert isinstance(tiny.text_encoder, CLIPTextModel)
    assert isinstance(tiny.image_encoder, CLIPVisionModel)
    assert isinstance(tiny.vae, AutoencoderKL)
    assert isinstance(tiny.unet, UNet2DConditionModel)
    assert tiny.unet.config.cross_attention_dim == tiny.text_encoder.config.hidden_size
    for model in tiny.models().values():
        assert not any(p.requires_grad for p in model.parameters())
        assert not model.training
    assert (tiny.device.type, tiny.dtype) == ("cpu", torch.float32)


def test_tiny_random_is_seeded():
    a, b = load_components("tiny-random"), load_components("tiny-random")
    assert torch.equal(a.unet.conv_in.weight, b.unet.conv_in.weight)


def test_the_tiny_random_folder_is_what_its_command_writes(tiny):
    # tests/tiny-random is written by `python -m elite_tutorial.toyworld.models tiny-random`
    built = tiny_random_components()
    assert built.tokenizer.get_vocab() == tiny.tokenizer.get_vocab()
    assert built.tokenizer("a photo of a S, close-up").input_ids == tiny.tokenizer("a photo of a S, close-up").input_ids
    for name, model in built.models().items():
        saved = getattr(tiny, name).state_dict()
        assert model.state_dict().keys() == saved.keys(), name
        for key, tensor in model.state_dict().items():
            assert torch.equal(tensor, saved[key]), f"{name}.{key}"
    assert {k: v for k, v in built.scheduler.config.items() if not k.startswith("_")} == \
        {k: v for k, v in tiny.scheduler.config.items() if not k.startswith("_")}


def test_a_missing_tiny_random_folder_says_how_to_write_it(monkeypatch, tmp_path):
    monkeypatch.setattr(components_module, "TINY_RANDOM_FOLDER", tmp_path / "tiny-random")
    with pytest.raises(PresetUnavailableError, match="toyworld.models tiny-random"):
        load_components("tiny-random")


def test_default_device_is_cpu_fp32_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the default is then cuda + fp16")
    assert components_module.default_device_and_dtype() == (torch.device("cpu"), torch.float32)
    assert components_module.default_device_and_dtype("cpu", torch.bfloat16)[1] == torch.bfloat16


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match="toy, sd14, tiny-random"):
        load_components("sd15")


def test_preset_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("ELITE_PRESET", "tiny-random")
    assert isinstance(load_components().unet, UNet2DConditionModel)


def assert_same_models(a, b):
    """Identical weights, and the same outputs (to float rounding: kernels may differ by layout)."""
    for name, model in a.models().items():
        other = getattr(b, name).state_dict()
        for key, tensor in model.state_dict().items():
            assert torch.equal(tensor, other[key]), f"{name}.{key}"
    with torch.no_grad():
        for x, y in zip(outputs(a), outputs(b)):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def outputs(components):
    """Prompt embeddings, vision features and one UNet step: what every loader must reproduce."""
    ids = components.tokenizer(["a red circle"], padding="max_length", return_tensors="pt").input_ids
    text = components.text_encoder(ids).last_hidden_state
    vision = clip_feature_levels(components.image_encoder, torch.ones(1, 3, 32, 32))[2]
    latents = torch.ones(1, 4, 16, 16)
    noise = components.unet(latents, 10, encoder_hidden_states=text).sample
    decoded = components.vae.decode(latents).sample
    return text, vision, noise, decoded


def test_local_folder_round_trip(tiny, tmp_path):
    folder = tiny.save_pretrained(tmp_path / "tiny")
    assert sorted(os.listdir(folder)) == sorted([*components_module.COMPONENT_NAMES, "model_index.json"])
    assert list(tmp_path.iterdir()) == [folder]  # no staging folder left behind
    loaded = load_components(folder)
    assert_same_models(tiny, loaded)
    assert type(loaded.scheduler) is type(tiny.scheduler)
    assert {k: v for k, v in loaded.scheduler.config.items() if not k.startswith("_")} == {
        k: v for k, v in tiny.scheduler.config.items() if not k.startswith("_")}


def test_a_saved_folder_loads_as_a_diffusers_pipeline_that_draws_the_same(tiny, tmp_path):
    folder = tiny.save_pretrained(tmp_path / "tiny")
    loaded = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)

    def draw(pipe):
        return pipe("a photo", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    np.testing.assert_array_equal(draw(loaded), draw(tiny.text_to_image_pipeline()))


def test_save_refuses_an_existing_folder(tiny, tmp_path):
    with pytest.raises(FileExistsError):
        tiny.save_pretrained(tmp_path)


def test_incomplete_folder_names_what_is_missing(tiny, tmp_path):
    folder = tiny.save_pretrained(tmp_path / "tiny")
    (folder / "vae" / "config.json").unlink()
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "vae").rmdir()
    with pytest.raises(FileNotFoundError, match=r"vae \(expected"):
        load_components(folder)


def test_sd14_folders_are_wired_like_the_hub_repositories(tiny, tmp_path, monkeypatch):
    """sd14 = SD repo (unet, vae, scheduler) + one CLIPModel repo (tokenizer, both towers)."""
    sd, clip = tmp_path / "sd", tmp_path / "clip"
    for name in ("unet", "vae", "scheduler"):
        getattr(tiny, name).save_pretrained(sd / name)
    clip_model = CLIPModel(CLIPConfig(text_config=tiny.text_encoder.config.to_dict(),
                                      vision_config=tiny.image_encoder.config.to_dict()))
    clip_model.text_model.load_state_dict(tiny.text_encoder.state_dict())
    clip_model.vision_model.load_state_dict(tiny.image_encoder.state_dict())
    clip_model.save_pretrained(clip)
    tiny.tokenizer.save_pretrained(clip)
    monkeypatch.setattr(components_module, "_sd14_snapshots", lambda: (sd, clip))
    loaded = load_components("sd14", device="cpu")
    assert_same_models(tiny, loaded)


def test_sd14_offline_and_not_cached_says_what_is_missing(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path))
    code = "from elite_tutorial import load_components; load_components('sd14', device='cpu')"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("elite_tutorial.components.PresetUnavailableError")
    for needed in ("CompVis/stable-diffusion-v1-4", "openai/clip-vit-large-patch14", "hf download"):
        assert needed in last_line


def test_missing_toy_weights_say_how_to_restore_them(tmp_path, monkeypatch):
    monkeypatch.setattr(components_module, "TOY_FOLDER", tmp_path / "absent")
    with pytest.raises(PresetUnavailableError, match="git checkout"):
        load_components("toy")


def test_text_to_image_pipeline_shares_the_models(tiny):
    pipe = tiny.text_to_image_pipeline()
    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.unet is tiny.unet and pipe.text_encoder is tiny.text_encoder
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 32, 32, 3)
    assert 0 <= images.min() and images.max() <= 1


def test_components_fields_are_the_six_roles():
    assert components_module.COMPONENT_NAMES == ("tokenizer", "text_encoder", "image_encoder", "vae", "unet", "scheduler")
