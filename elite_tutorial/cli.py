"""`elite-train`: the console command for training ELITE's mapping networks.

    elite-train global --preset toy --profile toy --out runs/global-toy
    elite-train global --preset toy --profile toy --out runs/global-toy --resume latest
    elite-train global --preset toy --profile toy --mixed-precision bf16 --data-workers 3 --out runs/global-toy   # beside a GPU
    elite-train local --preset toy --profile toy --global-mapper assets/toy-global-mapper --out runs/local-toy
    accelerate launch -m elite_tutorial.cli global --preset sd14 --profile sd14 \\
        --data /data/openimages --mixed-precision bf16 --out runs/global-sd14

`--data toy` (the default) streams toy-world scenes; a folder is read as OpenImages in the authors'
layout: object boxes for stage 1 (`data.OpenImagesSource`), objects with segmentation masks for
stage 2 (`data.OpenImagesMaskSource`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from accelerate import PartialState

from .arguments import finite_number, whole_number
from .components import load_components
from .data import OpenImagesMaskSource, OpenImagesSource
from .mappers import NUM_LEVELS, GlobalMapper
from .step_speed import StepSpeed
from .toyworld.sources import TOY_CONTEXT_PROBABILITY, ToyWorldSource
from .training import LOCAL_PROFILES, PROFILES, check_run_folder, recipe_with, train_global, train_local

# What `--toy-global-view` and `--toy-global-target` offer: the views and targets of the course, the
# shipped mappers and the ELITE-on-v2 recipes (`ToyWorldSource` also takes the "object" view, which a
# mapper fitted in Python may read).
TOY_GLOBAL_VIEWS = ("image", "box")
TOY_GLOBAL_TARGETS = ("scene", "box", "other-view")


def _source(data: str, components, stage: str, context_probability: float = TOY_CONTEXT_PROBABILITY,
            global_view: str = "image", target: str = "scene"):
    clip_size = components.image_encoder.config.image_size
    latent_factor = 2 ** (len(components.vae.config.block_out_channels) - 1)
    resolution = components.unet.config.sample_size * latent_factor
    if data == "toy":
        return ToyWorldSource(clip_size=clip_size, image_size=resolution, latent_factor=latent_factor,
                              context_probability=context_probability, global_view=global_view, target=target)
    if stage == "local":
        return OpenImagesMaskSource(Path(data), resolution=resolution, clip_size=clip_size, latent_factor=latent_factor)
    return OpenImagesSource(Path(data), resolution=resolution, clip_size=clip_size)


def _check_out(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--out must be this stage's run folder or a new one (checked now, not after the components load)."""
    try:
        check_run_folder(args.out, args.stage, resume=args.resume == "latest")
    except OSError as error:
        parser.error(str(error))


def _common_options(stage: argparse.ArgumentParser, profiles) -> None:
    stage.add_argument("--preset", default="toy", help="components: a preset name or a components folder")
    stage.add_argument("--profile", default="toy", choices=sorted(profiles))
    stage.add_argument("--data", default="toy", help="'toy' or an OpenImages folder")
    stage.add_argument("--out", required=True, type=Path)
    stage.add_argument("--resume", choices=["latest"], help="continue from the newest checkpoint in --out")
    stage.add_argument("--steps", type=whole_number(1))
    stage.add_argument("--batch-size", type=whole_number(1))
    stage.add_argument("--gradient-accumulation", type=whole_number(1))
    stage.add_argument("--learning-rate", type=finite_number(), help="per sample (scaled by the total batch; 0 trains nothing)")
    stage.add_argument("--seed", type=whole_number(0))
    stage.add_argument("--checkpoint-every", type=whole_number(1), help="steps between checkpoints (the profile's by default)")
    stage.add_argument("--keep-checkpoints",
                       type=whole_number(1, " (the newest checkpoint is what --resume reads; to keep them all, "
                                            "give at least steps / checkpoint-every)"),
                       help="how many of the newest checkpoints to keep (the profile's by default; e.g. all of them, "
                            "to score a run at several lengths)")
    stage.add_argument("--key-value-lr-scale", type=finite_number(),
                       help="the k/v copies' learning rate as a multiple of the mapper's (0 keeps them frozen)")
    stage.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    stage.add_argument("--gradient-checkpointing", action="store_true")
    stage.add_argument("--data-workers", type=whole_number(0), default=0,
                       help="processes that build batches ahead (beside a GPU; the batches are the same)")
    speed = stage.add_argument_group("speed", "how a step is computed on the hardware, never what it computes "
                                              "(docs/full-scale.md, \"A faster step\")")
    speed.add_argument("--micro-batch", type=whole_number(1),
                       help="samples per forward pass: a multiple of --batch-size that divides batch x accumulation "
                            "(the same samples and noise, in fewer passes)")
    speed.add_argument("--channels-last", action="store_true", help="UNet and VAE convolutions in NHWC")
    speed.add_argument("--tf32", action="store_true", help="fp32 matmuls on TF32 tensor cores (a GPU's)")
    speed.add_argument("--compile-unet", action="store_true", help="torch.compile the UNet (pays after minutes of warm-up)")
    speed.add_argument("--fused-adamw", action="store_true", help="AdamW's update in one kernel")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="elite-train", description="Train ELITE's mapping networks.")
    stages = parser.add_subparsers(dest="stage", required=True)
    stage = stages.add_parser("global", help="stage 1: the global mapping network (+ k/v copies)")
    _common_options(stage, PROFILES)
    stage.add_argument("--num-words", type=int, choices=range(1, NUM_LEVELS + 1),
                       help="words injected in training (1 for the ablation)")
    stage.add_argument("--reg-weight", type=finite_number(), help="weight of mean |words| (0 for the ablation)")
    stage.add_argument("--toy-context-probability", type=finite_number(maximum=1.0), default=TOY_CONTEXT_PROBABILITY,
                       help="toy data: how often a caption says the object's size, its position and the background")
    stage.add_argument("--toy-global-view", choices=TOY_GLOBAL_VIEWS, default="image",
                       help="toy data: what the image encoder sees, the whole scene or the padded box around the "
                            "object (the authors' view)")
    stage.add_argument("--toy-global-target", choices=TOY_GLOBAL_TARGETS, default="scene",
                       help="toy data: the UNet's target, the scene as drawn, the box around the object (the authors' "
                            "recipe: the encoder's view is the target), or another render of the same object (its "
                            "context said with --toy-context-probability)")
    stage.add_argument("--init-mapper", type=Path,
                       help="start from this global mapper's weights (a mapper folder) instead of fresh ones")
    stage = stages.add_parser("local", help="stage 2: the local mapping network (+ local k/v copies)")
    _common_options(stage, LOCAL_PROFILES)
    stage.add_argument("--global-mapper", required=True, type=Path, help="the trained global mapper's folder (frozen)")
    stage.add_argument("--reg-weight", type=finite_number(), help="weight of mean |local values|")
    args = parser.parse_args(argv)
    _check_out(parser, args)

    overrides = dict(steps=args.steps, batch_size=args.batch_size, gradient_accumulation=args.gradient_accumulation,
                     learning_rate=args.learning_rate, reg_weight=args.reg_weight, seed=args.seed,
                     key_value_lr_scale=args.key_value_lr_scale,
                     checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints)
    toy_options = {}  # the toy stream's options exist for stage 1 only
    if args.stage == "global":
        overrides.update(num_words=args.num_words)
        toy_options = dict(context_probability=args.toy_context_probability, global_view=args.toy_global_view,
                           target=args.toy_global_target)
    recipe = recipe_with(args.profile, args.stage, **overrides)
    speed = StepSpeed(args.micro_batch, args.channels_last, args.tf32, args.compile_unet, args.fused_adamw)
    try:
        speed.merged(recipe.batch_size, recipe.gradient_accumulation)
    except ValueError as error:
        parser.error(f"--micro-batch: {error}")
    try:
        speed.check_device(PartialState().device)
    except ValueError as error:
        parser.error(f"--compile-unet: {error}")
    # frozen models in the compute dtype; the mapper keeps fp32 weights (autocast does the rest)
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    # the given mapper first (stage 1's start, stage 2's frozen one): a mistyped path fails before the components load
    given_path = args.init_mapper if args.stage == "global" else args.global_mapper
    given = GlobalMapper.from_pretrained(given_path) if given_path else None
    components = load_components(args.preset, device="cpu", dtype=dtype)
    options = dict(resume=args.resume == "latest", mixed_precision=args.mixed_precision,
                   gradient_checkpointing=args.gradient_checkpointing, data_workers=args.data_workers,
                   speed=speed,
                   command=" ".join(["elite-train", *(sys.argv[1:] if argv is None else argv)]))
    source = _source(args.data, components, args.stage, **toy_options)
    if args.stage == "global":
        mapper = train_global(components, source, args.out, recipe, initial_mapper=given, **options)
    else:
        mapper = train_local(components, given, source, args.out, recipe, **options)
    print(f"{args.stage} mapper ({sum(p.numel() for p in mapper.parameters()) / 1e6:.2f} M parameters) -> {args.out / 'mapper'}")


if __name__ == "__main__":
    main()
