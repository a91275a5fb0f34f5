"""The paper's similarity metrics, CLIP-T, CLIP-I and DINO-I, with real models (sd14) or the toy world's.

ELITE reports them as Textual Inversion and Custom Diffusion do:

- **CLIP-T**, does the image follow the prompt: the cosine similarity of CLIP's projected image and text
  embeddings. The prompt is read with the placeholder replaced by the concept's class word
  ("a photo of a S on the left" -> "a photo of a heart on the left"). The paper leaves that word open;
  a prompt with a hole where S was is not a sentence CLIP saw in training.
- **CLIP-I**, does the image show the concept: the cosine similarity of CLIP image embeddings between
  a generated image and each reference view of the concept, averaged over the views.
- **DINO-I**: the same with a self-supervised appearance embedding, which tells apart objects of one
  class that CLIP puts together.

| role | `sd14` | `toy` |
|---|---|---|
| CLIP-T, CLIP-I | `openai/clip-vit-base-patch32`, the model of Textual Inversion's evaluation (the paper names none) | the toy CLIP with its projection heads (`assets/toy-eval/clip`) |
| DINO-I | `facebook/dino-vits16` (ViT-S/16, the paper's), its class token | the toy judge's convolutional features (the 2048 numbers its attribute heads read) |

Images are resized (squashed) to each model's input size, as `data.py` prepares images for CLIP.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPModel, CLIPTokenizer

from .components import ASSETS_DIR, TOY_FOLDER, PresetUnavailableError
from .data import ImageLike, clip_normalise, load_image, unit_pixels

SD14_METRIC_REPOS = {"clip": "openai/clip-vit-base-patch32", "dino": "facebook/dino-vits16"}
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@dataclass
class MetricModels:
    """What the three metrics read.

    clip: a `CLIPModel` with projection heads; tokenizer: its tokenizer; clip_size: its input side.
    appearance: (n, 3, H, W) RGB in [0, 1] at `appearance_size` -> (n, d) features (DINO-I's role).
    """

    clip: CLIPModel
    tokenizer: CLIPTokenizer
    clip_size: int
    appearance: Callable[[torch.Tensor], torch.Tensor]
    appearance_size: int

    @property
    def device(self) -> torch.device:
        return self.clip.device


def projected_features(features) -> torch.Tensor:
    """CLIP's projected features: transformers 5 wraps them in an output's `pooler_output`."""
    return features if torch.is_tensor(features) else features.pooler_output


def _toy_models(device) -> MetricModels:
    from .toyworld.judge import ToyJudge  # noqa: PLC0415

    clip = CLIPModel.from_pretrained(ASSETS_DIR / "toy-eval" / "clip", torch_dtype=torch.float32).to(device).eval()
    judge = ToyJudge.from_pretrained(ASSETS_DIR / "toy-eval" / "judge").to(device).eval()
    return MetricModels(clip, CLIPTokenizer.from_pretrained(TOY_FOLDER / "tokenizer"), clip.config.vision_config.image_size,
                        appearance=lambda pixels: judge.features(pixels * 2 - 1), appearance_size=64)


def _sd14_models(device) -> MetricModels:
    from transformers import ViTModel  # noqa: PLC0415

    try:
        clip = CLIPModel.from_pretrained(SD14_METRIC_REPOS["clip"], torch_dtype=torch.float32).to(device).eval()
        tokenizer = CLIPTokenizer.from_pretrained(SD14_METRIC_REPOS["clip"])
        dino = ViTModel.from_pretrained(SD14_METRIC_REPOS["dino"], add_pooling_layer=False).to(device).eval()
    except OSError as error:  # offline, or not in the local Hub cache
        raise PresetUnavailableError(
            f"The sd14 metrics need {SD14_METRIC_REPOS['clip']} (CLIP-T, CLIP-I) and {SD14_METRIC_REPOS['dino']} "
            f"(DINO-I), which are neither in the local Hub cache nor downloadable here ({type(error).__name__}). On a machine "
            f"with internet access run `hf download {SD14_METRIC_REPOS['clip']}` and "
            f"`hf download {SD14_METRIC_REPOS['dino']}` and copy the cache (HF_HOME)."
        ) from error

    def dino_class_token(pixels: torch.Tensor) -> torch.Tensor:
        normalised = (pixels - IMAGENET_MEAN.to(pixels)) / IMAGENET_STD.to(pixels)
        return dino(pixel_values=normalised).last_hidden_state[:, 0]

    return MetricModels(clip, tokenizer, clip.config.vision_config.image_size, dino_class_token, appearance_size=224)


def load_metric_models(preset: str = "toy", device="cpu") -> MetricModels:
    """The metric models of a preset ("toy": shipped, offline; "sd14": downloaded, see the module doc)."""
    loaders = {"toy": _toy_models, "sd14": _sd14_models}
    if preset not in loaders:
        raise ValueError(f"No metric models for preset {preset!r}; choose one of {', '.join(loaders)}.")
    return loaders[preset](torch.device(device))


def _pixels(images: Sequence[ImageLike] | np.ndarray, size: int, device) -> torch.Tensor:
    """Images (paths, PIL, or uint8 arrays (n, H, W, 3)) -> (n, 3, size, size) RGB in [0, 1]."""
    return torch.stack([unit_pixels(load_image(image), size) for image in images]).to(device)


@torch.no_grad()
def image_embeddings(models: MetricModels, images, batch_size: int = 64) -> torch.Tensor:
    """Unit-length CLIP image embeddings (n, projection_dim)."""
    out = []
    for start in range(0, len(images), batch_size):
        pixels = clip_normalise(_pixels(images[start:start + batch_size], models.clip_size, models.device))
        out.append(projected_features(models.clip.get_image_features(pixel_values=pixels)))
    return F.normalize(torch.cat(out).float(), dim=-1)


@torch.no_grad()
def text_embeddings(models: MetricModels, prompts: Sequence[str]) -> torch.Tensor:
    """Unit-length CLIP text embeddings (n, projection_dim)."""
    ids = models.tokenizer(list(prompts), padding="max_length", truncation=True, return_tensors="pt").input_ids
    return F.normalize(projected_features(models.clip.get_text_features(input_ids=ids.to(models.device))).float(), dim=-1)


@torch.no_grad()
def appearance_embeddings(models: MetricModels, images, batch_size: int = 64) -> torch.Tensor:
    """Unit-length appearance embeddings (n, d): DINO's class token (sd14), the judge's features (toy)."""
    out = [models.appearance(_pixels(images[i:i + batch_size], models.appearance_size, models.device))
           for i in range(0, len(images), batch_size)]
    return F.normalize(torch.cat(out).flatten(1).float(), dim=-1)


def clip_t(models: MetricModels, images, prompts: Sequence[str]) -> torch.Tensor:
    """CLIP-T of each image with its prompt (already with the class word in place of S): (n,)."""
    if len(images) != len(prompts):
        raise ValueError(f"CLIP-T pairs images with prompts: {len(images)} images, {len(prompts)} prompts.")
    return (image_embeddings(models, images) * text_embeddings(models, prompts)).sum(-1)


def clip_i(models: MetricModels, images, references) -> torch.Tensor:
    """CLIP-I of each image: its mean similarity to the reference views, (n,)."""
    return (image_embeddings(models, images) @ image_embeddings(models, references).T).mean(-1)


def dino_i(models: MetricModels, images, references) -> torch.Tensor:
    """DINO-I of each image: its mean appearance similarity to the reference views, (n,)."""
    return (appearance_embeddings(models, images) @ appearance_embeddings(models, references).T).mean(-1)


def with_class_word(prompt: str, class_word: str, placeholder: str = "S") -> str:
    """The prompt CLIP-T reads: the placeholder word replaced by the class word."""
    words = prompt.replace(",", " ,").split()
    if placeholder not in words:
        raise ValueError(f"{prompt!r} has no placeholder word {placeholder!r}.")
    return " ".join(class_word if w == placeholder else w for w in words).replace(" ,", ",")
