"""`elite-train`: the console command for training ELITE's mapping networks.

    elite-train global --preset toy --profile toy --out runs/global-toy
    elite-train global --preset toy --profile toy --out runs/global-toy --resume latest
    accelerate launch -m elite_tutorial.cli global --preset sd14 --profile sd14 \\
        --data /data/openimages --mixed-precision bf16 --out runs/global-sd14

`--data toy` (the default) streams toy-world scenes; a folder is read as OpenImages in the authors'
layout (`data.OpenImagesSource`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .components import load_components
from .data import OpenImagesSource, ToyWorldSource
from .training import PROFILES, recipe_with, train_global


def _source(data: str, components):
    clip_size = components.image_encoder.config.image_size
    if data == "toy":
        return ToyWorldSource(clip_size=clip_size)
    resolution = components.unet.config.sample_size * 2 ** (len(components.vae.config.block_out_channels) - 1)
    return OpenImagesSource(Path(data), resolution=resolution, clip_size=clip_size)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="elite-train", description="Train ELITE's mapping networks.")
    stages = parser.add_subparsers(dest="stage", required=True)
    stage = stages.add_parser("global", help="stage 1: the global mapping network (+ k/v copies)")
    stage.add_argument("--preset", default="toy", help="components: a preset name or a components folder")
    stage.add_argument("--profile", default="toy", choices=sorted(PROFILES))
    stage.add_argument("--data", default="toy", help="'toy' or an OpenImages folder")
    stage.add_argument("--out", required=True, type=Path)
    stage.add_argument("--resume", choices=["latest"], help="continue from the newest checkpoint in --out")
    stage.add_argument("--steps", type=int)
    stage.add_argument("--batch-size", type=int)
    stage.add_argument("--gradient-accumulation", type=int)
    stage.add_argument("--learning-rate", type=float, help="per sample (scaled by the total batch)")
    stage.add_argument("--num-words", type=int, help="words injected in training (1 for the ablation)")
    stage.add_argument("--reg-weight", type=float, help="weight of mean |words| (0 for the ablation)")
    stage.add_argument("--seed", type=int)
    stage.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    stage.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args(argv)

    recipe = recipe_with(args.profile, steps=args.steps, batch_size=args.batch_size,
                         gradient_accumulation=args.gradient_accumulation, learning_rate=args.learning_rate,
                         num_words=args.num_words, reg_weight=args.reg_weight, seed=args.seed)
    # frozen models in the compute dtype; the mapper keeps fp32 weights (autocast does the rest)
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    components = load_components(args.preset, device="cpu", dtype=dtype)
    mapper = train_global(components, _source(args.data, components), args.out, recipe,
                          resume=args.resume == "latest", mixed_precision=args.mixed_precision,
                          gradient_checkpointing=args.gradient_checkpointing,
                          command=" ".join(["elite-train", *(sys.argv[1:] if argv is None else argv)]))
    print(f"global mapper ({sum(p.numel() for p in mapper.parameters()) / 1e6:.2f} M parameters) -> {args.out / 'mapper'}")


if __name__ == "__main__":
    main()
