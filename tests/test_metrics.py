"""CLIP-T, CLIP-I and DINO-I on known cases (toy models), and the sd14 metric models' offline error."""
import os
import subprocess
import sys

import numpy as np
import pytest

from elite_tutorial.metrics import clip_i, clip_t, dino_i, load_metric_models, with_class_word
from elite_tutorial.toyworld.render import caption, random_scene


@pytest.fixture(scope="module")
def toy_metrics():
    return load_metric_models("toy")


@pytest.fixture(scope="module")
def scenes():
    return [random_scene(seed, two_object_probability=0.0) for seed in range(10**9 + 100, 10**9 + 116)]


def test_identical_images_score_one_and_others_less(toy_metrics, scenes):
    images = np.stack([s.image for s in scenes])
    for metric in (clip_i, dino_i):
        same = metric(toy_metrics, images, images[:1])
        assert same[0].item() == pytest.approx(1.0, abs=1e-5)
        assert (same[1:] < 0.999).all()


def test_clip_t_is_higher_for_the_right_prompts_than_for_shuffled_ones(toy_metrics, scenes):
    images = np.stack([s.image for s in scenes])
    prompts = [caption(s.spec) for s in scenes]
    matched = clip_t(toy_metrics, images, prompts)
    shuffled = clip_t(toy_metrics, images, prompts[1:] + prompts[:1])
    assert matched.mean() > shuffled.mean() + 0.05
    assert (matched > shuffled).float().mean() >= 0.75
    with pytest.raises(ValueError, match="3 images, 2 prompts"):
        clip_t(toy_metrics, images[:3], prompts[:2])


def test_clip_t_reads_the_class_word_where_the_placeholder_was():
    assert with_class_word("a photo of a S, on a grass background", "heart") == "a photo of a heart, on a grass background"
    assert with_class_word("a small S on the left", "ring") == "a small ring on the left"
    with pytest.raises(ValueError, match="no placeholder"):
        with_class_word("a photo of a Sun", "ring")


def test_unknown_preset_and_offline_sd14_metrics_say_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="toy, sd14"):
        load_metric_models("sd15")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path))
    code = "from elite_tutorial.metrics import load_metric_models; load_metric_models('sd14')"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    last_line = result.stderr.strip().splitlines()[-1]
    assert result.returncode != 0 and last_line.startswith("elite_tutorial.components.PresetUnavailableError")
    assert "openai/clip-vit-base-patch32" in last_line and "facebook/dino-vits16" in last_line
