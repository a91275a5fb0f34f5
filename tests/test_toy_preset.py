"""The shipped toy world: loads offline through the folder path, and its judge is accurate."""
import os
import subprocess
import sys

import numpy as np
import torch
from transformers import CLIPModel

from elite_tutorial import load_components
from elite_tutorial.components import TOY_FOLDER
from elite_tutorial.mappers import clip_feature_levels
from elite_tutorial.studies.report import EVAL_DIR, clip_shape_among_5, linear_probe_accuracy, mapper_input_probe, prompted_attributes
from elite_tutorial.toyworld.judge import ToyJudge, accuracy
from elite_tutorial.toyworld.models import toy_tokenizer, toy_vocabulary
from elite_tutorial.toyworld.render import SHAPES, SIZE, exact_scene, random_spec


def test_toy_loads_offline_with_the_sd14_roles(tmp_path):
    code = (
        "from elite_tutorial import load_components; c = load_components('toy');"
        "print(type(c.unet).__name__, type(c.text_encoder).__name__, type(c.image_encoder).__name__, c.dtype)"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path), ELITE_PRESET="toy")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-4:] == ["UNet2DConditionModel", "CLIPTextModel", "CLIPVisionModel", "torch.float32"]


def test_toy_world_shapes_and_tokenizer():
    c = load_components("toy", device="cpu")
    assert {"image_encoder", "scheduler", "text_encoder", "tokenizer", "unet", "vae"} <= set(os.listdir(TOY_FOLDER))
    for word in toy_vocabulary():
        assert len(c.tokenizer.tokenize(word)) == 1, word
    levels = clip_feature_levels(c.image_encoder, torch.zeros(1, 3, SIZE, SIZE))
    assert [tuple(x.shape) for x in levels] == [(1, 65, 128)] * 5  # class token + 8x8 patches
    latents = c.vae.encode(torch.zeros(1, 3, SIZE, SIZE)).latent_dist.mode()
    assert latents.shape == (1, 4, 16, 16)


def test_shipped_judge_reads_fresh_renders():
    judge = ToyJudge.from_pretrained(EVAL_DIR / "judge").eval()
    specs = [random_spec(np.random.default_rng(7_000_000 + i), 0.0) for i in range(300)]
    images = np.stack([exact_scene(s).image for s in specs])
    scores = accuracy(judge, images, [s.labels() for s in specs])
    assert min(scores.values()) >= 0.9, scores


def test_prompted_attributes_are_the_words_in_the_prompt():
    labels = {"shape": "star", "colour": "red", "pattern": "striped", "size": "large", "position": "left", "background": "navy"}
    assert prompted_attributes("a red star on the left", labels) == {"shape": "star", "colour": "red", "position": "left"}
    assert prompted_attributes("a photo of a large red striped star on the left, on a navy background", labels) == labels


def test_shipped_tokenizer_is_the_one_the_code_builds():
    from transformers import CLIPTokenizer

    shipped = CLIPTokenizer.from_pretrained(TOY_FOLDER / "tokenizer")
    assert shipped.get_vocab() == toy_tokenizer().get_vocab()


def test_linear_probe_reads_what_is_there_and_nothing_else():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (1000,), generator=generator)
    separable = torch.nn.functional.one_hot(labels, 5).float() + 0.1 * torch.randn(1000, 5, generator=generator)
    assert linear_probe_accuracy(separable, labels, train=800) > 0.95
    noise = torch.randn(1000, 16, generator=generator)
    assert linear_probe_accuracy(noise, labels, train=800) < 0.35  # chance is 0.2


def test_mapper_input_probe_on_the_shipped_encoder():
    encoder = load_components("toy", device="cpu").image_encoder
    scene = mapper_input_probe(encoder, count=600)
    assert set(scene) == {"shape", "colour", "pattern", "position", "background"}
    assert scene["shape"]["chance"] == 0.2 and scene["background"]["chance"] == round(1 / 7, 3)
    assert all(row["accuracy"] > row["chance"] for row in scene.values())
    assert scene["background"]["accuracy"] > 0.9 and scene["position"]["accuracy"] > 0.7  # the whole scene: where, on what
    # the v2 encoder learnt on the box around the object: shown the object alone, it reads its identity,
    cut_out = mapper_input_probe(encoder, count=600, view="object")
    assert min(cut_out[attribute]["accuracy"] for attribute in ("shape", "colour", "pattern")) > 0.9
    assert cut_out["shape"]["accuracy"] > scene["shape"]["accuracy"] + 0.3  # far better than from the scene,
    assert cut_out["position"]["accuracy"] < scene["position"]["accuracy"] - 0.2  # and its place is gone


class _ShapeReadingCLIP(torch.nn.Module):
    """A stand-in CLIP: a caption's embedding is its shape word (one-hot over SHAPES); the i-th image
    of each group of five is embedded as shape `order[i]`. Groups draw the shapes in SHAPES order, so
    order 0..4 reads every image right and a reversed order only the middle one."""

    def __init__(self, tokenizer, order):
        super().__init__()
        self.shape_tokens = torch.tensor([tokenizer.convert_tokens_to_ids(f"{s}</w>") for s in SHAPES])
        self.order = torch.tensor(order)
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the module a device

    @property
    def device(self):
        return self.anchor.device

    def get_text_features(self, input_ids):
        return (input_ids[:, :, None] == self.shape_tokens).any(1).float()

    def get_image_features(self, pixel_values):
        return torch.nn.functional.one_hot(self.order.repeat(len(pixel_values) // len(SHAPES)), len(SHAPES)).float()


def test_clip_shape_among_5_scores_the_shape_word_alone():
    tokenizer = toy_tokenizer()
    assert clip_shape_among_5(_ShapeReadingCLIP(tokenizer, range(5)), tokenizer, groups=4) == 1.0
    assert clip_shape_among_5(_ShapeReadingCLIP(tokenizer, [4, 3, 2, 1, 0]), tokenizer, groups=4) == 0.2
    shipped = CLIPModel.from_pretrained(EVAL_DIR / "clip", dtype=torch.float32).eval()
    assert 0.3 < clip_shape_among_5(shipped, tokenizer, groups=40) <= 1.0
