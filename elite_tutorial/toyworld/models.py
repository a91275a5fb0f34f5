"""The miniature Stable Diffusion of the toy world: same classes and roles as sd14, sized for a CPU.

| role | sd14 | toy |
|---|---|---|
| tokenizer | CLIP BPE, 49,408 entries | CLIP BPE on the toy language (`toy_vocabulary`) |
| text encoder | `CLIPTextModel`, 12 layers, width 768 | `CLIPTextModel`, 4 layers, width 128 |
| image encoder | `CLIPVisionModel` ViT-L/14, 24 layers, 224 px, 16x16 patches, width 1024 | `CLIPVisionModel`, 6 layers, 64 px, 8x8 patches of 8 px, width 128 |
| feature levels | `[last, 4, 8, 12, 16]` | `[last, 1, 2, 3, 4]` (same relative depths, see `mappers`) |
| VAE | `AutoencoderKL`, 512 px -> 4x64x64 (factor 8) | `AutoencoderKL`, 64 px -> 4x16x16 (factor 4) |
| UNet | `UNet2DConditionModel`, 4 levels, 320-1280 channels, cross-attention at 64, 32, 16 | `UNet2DConditionModel`, 3 levels, 64-128 channels, cross-attention at 16 and 8 |
| scheduler | PNDM, scaled-linear betas 0.00085-0.012 | the same |

The `tiny-random` preset of the unit tests (`tiny_random_components`: seeded random models, smaller
still, in the same classes) is a folder like the toy one, `tests/tiny-random`, written once by

    python -m elite_tutorial.toyworld.models tiny-random --out tests/tiny-random

Both read sd14's scheduler configuration from `components`, the layer below the world: the toy
scheduler is sd14's by definition, and a tiny-random folder is what `Components.save_pretrained` writes.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig, CLIPVisionModel

from ..components import SD14_SCHEDULER_CONFIG, Components
from ..data import FAR_PHRASES, IMAGENET_TEMPLATES, NEAR_PHRASES
from .render import ATTRIBUTES, POSITION_PHRASES, PREFIXES, SIZE
from .tokenizer import build_clip_tokenizer

TEXT_WIDTH = 128
# Words of ELITE's training templates and of the editing prompts used later in the course, so that
# they are single tokens as in the real CLIP vocabulary (the toy text encoder never sees most of them
# during pretraining; their embeddings stay random, like rare words).
TEMPLATE_WORDS = (
    "a an the of on in at and with photo picture image rendering rendition cropped clean dirty dark "
    "bright my cool close up good one nice small large weird background far away very zoomed "
    "S"
).split()


def toy_vocabulary() -> list[str]:
    words = [w for values in ATTRIBUTES.values() for w in values]
    words += [w for phrase in POSITION_PHRASES.values() for w in phrase.split()]
    words += [w for prefix in PREFIXES for w in prefix.split()]
    return sorted(set(words + TEMPLATE_WORDS))


def toy_tokenizer() -> CLIPTokenizer:
    return build_clip_tokenizer(toy_vocabulary())


def toy_clip(tokenizer: CLIPTokenizer, patch_size: int = 8) -> CLIPModel:
    """The toy CLIP: a 4-layer text tower and a 6-layer ViT on 64 px scenes, `patch_size` px patches
    (8: an 8 x 8 grid; 4: a 16 x 16 grid, the grid of ViT-L/14 at 224 px)."""
    return CLIPModel(CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH,
            num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=128, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4,
            image_size=SIZE, patch_size=patch_size,
        ),
        projection_dim=128,
    ))


def toy_vae() -> AutoencoderKL:
    # No attention in the mid block: the VAE is purely convolutional, like most of SD's.
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=SIZE,
        block_out_channels=(48, 96, 96), layers_per_block=1, norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        mid_block_add_attention=False,
    )


def toy_unet() -> UNet2DConditionModel:
    # `attention_head_dim` is the number of heads in UNet2DConditionModel (a diffusers naming quirk
    # that SD's own config shares: 8 there).
    return UNet2DConditionModel(
        sample_size=SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=4, norm_num_groups=32,
    )


def toy_scheduler() -> PNDMScheduler:
    return PNDMScheduler(**SD14_SCHEDULER_CONFIG)


# --------------------------------------------------------------------------------------------------
# The tiny-random preset (unit tests only).

# The words the tiny-random tokenizer knows as single tokens (anything else splits into characters):
# a few of its own, the toy world's and the training captions', so that every prompt a test builds is
# made of known words (`words.tokenize_with_placeholder` refuses a word this vocabulary lacks).
TINY_WORDS = sorted(
    set("a an the photo picture of in on with and S dog cat background".split())
    | {word for values in ATTRIBUTES.values() for word in values}
    | {word for phrase in (*POSITION_PHRASES.values(), *PREFIXES, *IMAGENET_TEMPLATES, *FAR_PHRASES, *NEAR_PHRASES)
       for word in phrase.replace("{}", "").split()}
)


def tiny_random_components() -> Components:
    """Seeded random miniature models in the same classes and roles as sd14, on CPU in fp32, frozen.

    Sizes: text width 32; vision width 32 with 6 layers (feature levels, see `mappers`), 32 px
    images in 4 px patches (64 patches); VAE 32 px <-> 4x16x16 latents; UNet 2 levels. Saved once
    as `tests/tiny-random` (`main`), which `load_components("tiny-random")` reads.
    """
    tokenizer = build_clip_tokenizer(TINY_WORDS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
            projection_dim=32, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ))
        image_encoder = CLIPVisionModel(CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
            image_size=32, patch_size=4, projection_dim=32,
        ))
        vae = AutoencoderKL(
            block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1,
            norm_num_groups=16, sample_size=32,
        )
        unet = UNet2DConditionModel(
            sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16,
        )
    components = Components(tokenizer, text_encoder, image_encoder, vae, unet, PNDMScheduler(**SD14_SCHEDULER_CONFIG))
    for model in components.models().values():
        model.requires_grad_(False).eval()
    return components


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m elite_tutorial.toyworld.models",
                                     description="Write a preset's models as a components folder.")
    commands = parser.add_subparsers(dest="command", required=True)
    tiny = commands.add_parser("tiny-random", help="the seeded random models of the unit tests (`tiny_random_components`)")
    tiny.add_argument("--out", type=Path, required=True, help="a new folder (e.g. tests/tiny-random)")
    args = parser.parse_args(argv)
    print(tiny_random_components().save_pretrained(args.out))


if __name__ == "__main__":
    main()
