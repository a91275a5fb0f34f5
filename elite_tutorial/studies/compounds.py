"""Compound words: teaching the toy text encoder to read one token as a whole object.

Real CLIP's 49,408 tokens include many that name a whole thing whose look takes several words to say
("ladybug", "flamingo"), so its text encoder reads one token as a bundle of attributes. Textual
Inversion and ELITE's w0 are single tokens written into that space. The toy language has one word
per attribute value and nothing else, so the toy text encoder has never read one token as several
attributes: a token whose embedding is the sum of "red", "dotted" and "circle" draws the object far
less often than the three words do (`python -m elite_tutorial.evaluation --described`, "described as
one compound word").

`teach_compound_words` fine-tunes the text encoder so that it reads such compounds. In a
single-object caption the run of identity words ("red dotted circle") is fused into one token whose
embedding is the sum of theirs (`fuse_identity_words`, `words.compound_embeddings`). With the UNet frozen,
the text encoder learns to make the UNet predict under the fused caption what it predicts under the
words (the same noisy latents and timesteps: distillation), while on plain captions it keeps its
outputs (the mean squared difference from the frozen encoder's hidden states). Token and position
embeddings stay frozen: the vocabulary that mappers and Textual Inversion write into is unchanged.
Each fused word is read with a little Gaussian noise (`jitter_compounds`): a mapped word lands near
its compound, not on it, and a reader taught only the exact sums reads such words worse (gate 3).
With `unet_kv`, the UNet's cross-attention keys and values learn beside the text encoder, as ELITE's
k/v copies do; the frozen UNet stays the teacher.

`fit_mapper_to_compounds` asks what ELITE's mapper could carry if it were told the answer: w0 of a
`GlobalMapper` (reading the object alone or, with `--view box`, the padded box around it) fitted by
regression onto each object's compound embedding. Such a mapper is also a start for ELITE's training
(`elite-train global --init-mapper`).

    python -m elite_tutorial.studies.compounds teach --components assets/toy-sd --out toy-sd-compound
    python -m elite_tutorial.studies.compounds fit-mapper --components toy-sd-compound --view box --out fitted-mapper

The shipped toy world uses both: `assets/toy-sd`'s text encoder was taught compound words, and the
shipped global mapper is such a fitted map (docs/elite-on-v2.md says why).
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from PIL import Image
from tqdm.auto import tqdm

from ..components import Components, load_components
from ..data import GLOBAL_VIEWS, clip_pixels, global_view_image
from ..mappers import MAPPER_FILES, GlobalMapper, clip_feature_levels, cross_attention_modules
from ..storage import atomic_directory
from ..toyworld.concepts import is_held_out
from ..toyworld.render import COLOURS, PATTERNS, SHAPES, caption, described, random_spec, render
from ..words import DEFAULT_PLACEHOLDER, compound_embeddings, encode_prompts_with_words
from .pretrain import HELD_OUT_SEED, ScenePool, _autocast, _encode_pool, tokenize, train_loop

IDENTITY_WORDS = frozenset((*COLOURS, *PATTERNS, *SHAPES))
MAX_COMPOUND = 3  # a colour, a pattern and a shape
FIT_SEED = HELD_OUT_SEED // 2  # the regression's training scenes: seeds no pretraining pool and no held-out set reaches


@dataclass(frozen=True)
class CompoundRecipe:
    """Every number that decides the taught text encoder (with the code and the components)."""

    seed: int = 0
    pool_size: int = 4000       # scenes of the UNet's own training pool, encoded once by the VAE
    steps: int = 3000
    batch: int = 16             # fused captions a step (two UNet passes and a backward each)
    keep_batch: int = 32        # plain captions a step (text encoder only; 10 % of them empty)
    lr: float = 1e-4
    keep_weight: float = 0.1    # weight of loss_keep against loss_compound
    caption_drop: float = 0.3   # as the UNet's captions
    # each fused word's noise: a standard deviation per dimension drawn from [0, compound_noise]. Gate 3's
    # mapped words lie 0.02-0.12 (norm) from their compounds, identities at least 0.24 apart
    compound_noise: float = 0.012
    # also teach the UNet's cross-attention keys and values (the layers ELITE trains copies of): does a
    # UNet that learns to read one token draw more from it than the frozen one?
    unet_kv: bool = False
    warmup_steps: int = 100
    checkpoint_every: int = 250


def fuse_identity_words(text: str, placeholder: str = DEFAULT_PLACEHOLDER) -> tuple[str, list[str]]:
    """A single-object caption with its run of identity words replaced by `placeholder`, and those
    words: 'a photo of a large red dotted circle on the left' -> ('a photo of a large S on the left',
    ['red', 'dotted', 'circle'])."""
    words = text.split(" ")
    bare = [word.rstrip(",") for word in words]  # "a red circle, on a grass background"
    run = [i for i, word in enumerate(bare) if word in IDENTITY_WORDS]
    if not run or run != list(range(run[0], run[-1] + 1)) or len(run) > MAX_COMPOUND:
        raise ValueError(f"{text!r} is not a single-object caption with one run of identity words.")
    fused = placeholder + words[run[-1]][len(bare[run[-1]]):]  # the comma stays
    return " ".join(words[:run[0]] + [fused] + words[run[-1] + 1:]), bare[run[0]:run[-1] + 1]


def jitter_compounds(compounds: torch.Tensor, noise: float, generator: torch.Generator) -> torch.Tensor:
    """compounds (batch, 1, width) plus Gaussian noise whose standard deviation per dimension is
    drawn for each row from [0, noise]: words around the compounds, as a map writes them."""
    if noise == 0:
        return compounds
    scale = noise * torch.rand(compounds.shape[0], 1, 1, generator=generator, device=compounds.device)
    return compounds + scale * torch.randn(compounds.shape, generator=generator, device=compounds.device)


def train_compounds(pool: ScenePool, components: Components, recipe: CompoundRecipe, work: Path, device):
    """The text encoder taught compound words (see the module doc), the UNet that reads them (the
    components' own, or with `recipe.unet_kv` a copy whose cross-attention keys and values learned too),
    and the loss history."""
    c, device = components, torch.device(device)
    teacher = c.text_encoder.to(device).requires_grad_(False).eval()
    unet = c.unet.to(device).requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    student.embeddings.requires_grad_(False)  # token and position embeddings: the vocabulary stays as it was
    reader, learner = unet, student  # the UNet that reads the fused captions; what the optimiser trains
    if recipe.unet_kv:
        reader = copy.deepcopy(unet)
        for attention in cross_attention_modules(reader).values():
            attention.to_k.requires_grad_(True)
            attention.to_v.requires_grad_(True)
        learner = torch.nn.ModuleDict({"text_encoder": student, "unet": reader})
    noise_scheduler = DDPMScheduler.from_config(c.scheduler.config)
    latent_mean, latent_std = _encode_pool(c.vae.to(device), pool, device)
    scale = c.vae.config.scaling_factor
    # fused captions never show a personal concept: its compound word is one no teaching step read,
    # as a mapped word for an unseen object is (gate 3)
    single = np.array([i for i, spec in enumerate(pool.specs) if len(spec.objects) == 1 and not is_held_out(spec.objects[0])])

    def make_batch(rng):
        index = single[rng.integers(len(single), size=recipe.batch)]
        texts = [caption(pool.specs[i], rng, recipe.caption_drop) for i in index]
        fused = [fuse_identity_words(text) for text in texts]
        kept = rng.integers(len(pool), size=recipe.keep_batch)
        keep_texts = ["" if rng.random() < 0.1 else caption(pool.specs[i], rng, recipe.caption_drop) for i in kept]
        return {"index": torch.from_numpy(index), "input_ids": tokenize(c.tokenizer, texts),
                "fused_prompts": [prompt for prompt, _ in fused], "compounds": [" ".join(words) for _, words in fused],
                "keep_ids": tokenize(c.tokenizer, keep_texts),
                "timesteps": torch.from_numpy(rng.integers(noise_scheduler.config.num_train_timesteps, size=recipe.batch))}

    def loss_fn(batch, generator):
        index, timesteps = batch["index"], batch["timesteps"]
        with torch.no_grad(), _autocast(device):
            mean, std = latent_mean[index], latent_std[index]
            latents = (mean + std * torch.randn(mean.shape, generator=generator, device=device)) * scale
            noise = torch.randn(latents.shape, generator=generator, device=device)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            wanted = unet(noisy, timesteps, encoder_hidden_states=teacher(batch["input_ids"]).last_hidden_state).sample
            kept = teacher(batch["keep_ids"]).last_hidden_state
        compounds = compound_embeddings(c, batch["compounds"])[:, None]  # (batch, 1, width), from the frozen vocabulary
        compounds = jitter_compounds(compounds, recipe.compound_noise, generator)
        with _autocast(device):
            context = encode_prompts_with_words(batch["fused_prompts"], compounds, c.tokenizer, student)
            predicted = reader(noisy, timesteps, encoder_hidden_states=context).sample
            keep = student(batch["keep_ids"]).last_hidden_state
        return {"loss_compound": F.mse_loss(predicted.float(), wanted.float()),
                "loss_keep": recipe.keep_weight * F.mse_loss(keep.float(), kept.float())}

    history = train_loop("compounds", learner, make_batch, loss_fn, recipe.steps, recipe.lr, recipe, work, device)
    return student.requires_grad_(False), reader.requires_grad_(False), history


def teach_compound_words(components_folder: Path, out: Path, recipe: CompoundRecipe = CompoundRecipe(),
                         device: str | None = None, command: str = "") -> dict:
    """Write `out`: the components folder with its text encoder (and with `recipe.unet_kv` its UNet)
    taught compound words, and the stage's record in its `pretrain_log.json`. Resumable through
    `<out>.work/`; `out` appears only when done."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    components_folder, out = Path(components_folder), Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; move it away or choose another --out.")
    work = out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    components = load_components(components_folder, device=device, dtype=torch.float32)
    pool = ScenePool(recipe.seed * 1_000_000, recipe.pool_size, cache=work / "pool.npy")
    student, unet, history = train_compounds(pool, components, recipe, work, device)
    record = {"recipe": asdict(recipe), "seconds": round(time.perf_counter() - started, 1), "device": str(device),
              "loss_last": history[-1], "command": command}
    with atomic_directory(out, overwrite=False) as staging:
        shutil.copytree(components_folder, staging, dirs_exist_ok=True)
        shutil.rmtree(staging / "text_encoder")
        student.to(torch.float16).save_pretrained(staging / "text_encoder")
        if recipe.unet_kv:
            shutil.rmtree(staging / "unet")
            unet.to(torch.float16).save_pretrained(staging / "unet")
        log_file = staging / "pretrain_log.json"
        log = json.loads(log_file.read_text()) if log_file.exists() else {}
        log["compound_words"] = record
        log_file.write_text(json.dumps(log, indent=1))
    shutil.rmtree(work)
    return record


def _object_views(components: Components, count: int, first_seed: int, skip_concepts: bool = False,
                  view: str = "object") -> tuple[list[torch.Tensor], list[str]]:
    """The random single-object scenes of seeds `first_seed` onwards, `count` of them (fewer with
    `skip_concepts`, which leaves out the personal concepts' identities): the CLIP levels of what a
    mapper reading `view` sees of each (`data.global_view_image`), each level (n, tokens, width), and
    the object said in words ('red dotted circle'; solid goes unsaid)."""
    size = components.image_encoder.config.image_size
    pixels, phrases = [], []
    for seed in range(first_seed, first_seed + count):
        spec = random_spec(np.random.default_rng(seed), two_object_probability=0.0)
        if skip_concepts and is_held_out(spec.objects[0]):
            continue
        image, masks = render(spec)
        pixels.append(clip_pixels(global_view_image(Image.fromarray(image), masks[0], view), size))
        phrases.append(described(asdict(spec.objects[0])))
    with torch.no_grad():
        levels = [clip_feature_levels(components.image_encoder, batch.to(components.device)) for batch in torch.stack(pixels).split(250)]
    return [torch.cat(level).float() for level in zip(*levels)], phrases


def fit_mapper_to_compounds(components: Components, count: int = 6000, epochs: int = 30, seed: int = 0,
                            held_out: int = 1000, progress: bool = True, view: str = "object"
                            ) -> tuple[GlobalMapper, dict]:
    """A `GlobalMapper` reading `view` (one of `data.GLOBAL_VIEWS`) whose w0 is fitted by regression onto each training object's
    compound word: the random single-object scenes of `count` seeds (those showing a personal concept
    left out, as from every mapper source), `epochs` passes of AdamW (batch 128), its k/v
    copies the UNet's own. Returns it and {"train_mse", "held_out_mse", "held_out_variance"} (on
    `held_out` held-out scenes; the variance is the targets' per dimension, what a constant word would score)."""
    if view not in GLOBAL_VIEWS:
        raise ValueError(f"view must be one of {GLOBAL_VIEWS}, not {view!r}.")
    levels, phrases = _object_views(components, count, FIT_SEED, skip_concepts=True, view=view)  # a mapper source
    held_levels, held_phrases = _object_views(components, held_out, HELD_OUT_SEED, view=view)
    targets, held_targets = compound_embeddings(components, phrases), compound_embeddings(components, held_phrases)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mapper = GlobalMapper.from_components(components, input_view=view).float()
        order = [torch.randperm(len(phrases)) for _ in range(epochs)]
    parameters = [*mapper.mapping[0].parameters(), *mapper.mapping_patch[0].parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=1e-3)
    for permutation in tqdm(order, desc="fit w0 to compound words", disable=not progress):
        for batch in permutation.split(128):
            loss = F.mse_loss(mapper([level[batch] for level in levels])[:, 0], targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    mapper.eval().requires_grad_(False)
    with torch.no_grad():
        report = {"train_mse": F.mse_loss(mapper(levels)[:, 0], targets).item(),
                  "held_out_mse": F.mse_loss(mapper(held_levels)[:, 0], held_targets).item(),
                  "held_out_variance": held_targets.var(0).mean().item()}
    return mapper, {k: round(v, 6) for k, v in report.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    teach = commands.add_parser("teach", help="write a components folder whose text encoder reads compound words")
    fit = commands.add_parser("fit-mapper", help="fit a mapper's w0 onto compound words by regression")
    for command in (teach, fit):
        command.add_argument("--components", type=Path, required=True, help="a components folder (e.g. assets/toy-sd)")
        command.add_argument("--out", type=Path, required=True)
        command.add_argument("--seed", type=int, default=0)
    teach.add_argument("--steps", type=int, default=CompoundRecipe.steps)
    teach.add_argument("--compound-noise", type=float, default=CompoundRecipe.compound_noise,
                       help="the largest standard deviation of the noise on fused words (0: the exact sums)")
    teach.add_argument("--unet-kv", action="store_true", help="also teach the UNet's cross-attention keys and values")
    teach.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    fit.add_argument("--count", type=int, default=6000, help="training scenes")
    fit.add_argument("--epochs", type=int, default=30)
    fit.add_argument("--view", choices=GLOBAL_VIEWS, default="object",
                     help="what the mapper reads: the object alone or the padded box around it (stage 1's view)")
    args = parser.parse_args(argv)
    command = " ".join(["python -m elite_tutorial.studies.compounds", *(sys.argv[1:] if argv is None else argv)])
    if args.command == "teach":
        recipe = CompoundRecipe(seed=args.seed, steps=args.steps, compound_noise=args.compound_noise,
                                unet_kv=args.unet_kv)
        record = teach_compound_words(args.components, args.out, recipe, args.device, command)
        print(json.dumps(record, indent=1))
        return
    components = load_components(args.components, device="cpu", dtype=torch.float32)
    mapper, report = fit_mapper_to_compounds(components, args.count, args.epochs, args.seed, view=args.view)
    with atomic_directory(args.out, own=(*MAPPER_FILES, "fit.json")) as staging:
        mapper.save_pretrained(staging)
        (staging / "fit.json").write_text(json.dumps({**report, "command": command}, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
