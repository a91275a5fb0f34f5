"""Where the words are read: each word's cross-attention on the object against around it.

ELITE's claim (the paper's attention figures; chapters 02 and 04): w0 attends to the object. In a
generated image the object would first have to be found, so the measurement reads a scene whose object
is known exactly: the UNet denoises each concept's reference view itself, noised at t = 250, 500 and 750
(as in training), with the concept's words at S of "a photo of a S" and ELITE's processors (the mapper's
k/v copies) in place. Per word, the 16 x 16 layers' maps (averaged over heads, layers and timesteps) give
the mean attention on the object's cells divided by the mean off them: 1 is no preference, whatever the
object's size.

    python -m elite_tutorial.attention_on_object --out results/elite_v2/attention_on_object.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .arguments import whole_number, writable_file
from .attention import elite_attention
from .attention_maps import capture_cross_attention
from .components import ASSETS_DIR, load_components
from .data import target_pixels
from .evaluation import bootstrap_interval
from .mappers import GlobalMapper
from .pipeline import ELITEPipeline
from .storage import write_json_atomic
from .toyworld.concepts import CONCEPT_SETS, concept_views
from .words import compound_embeddings, encode_prompts_with_words, tokenize_with_placeholder, word_spans

PROMPT = "a photo of a S"
TIMESTEPS = (250, 500, 750)


def object_cells(mask: np.ndarray, resolution: int) -> torch.Tensor:
    """mask: (height, width) bool, True on the object. Returns (resolution, resolution) bool: the cells
    the object covers at least half of."""
    pooled = F.adaptive_avg_pool2d(torch.from_numpy(mask)[None, None].float(), (resolution, resolution))
    return pooled[0, 0] >= 0.5


def _reference_latents(components, views) -> torch.Tensor:
    """The reference views (image, mask) encoded by the VAE: (n, channels, h, w)."""
    vae = components.vae
    pixels = torch.stack([target_pixels(Image.fromarray(image), image.shape[0]) for image, _ in views])
    return vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor


def _on_object_ratios(components, views, context: torch.Tensor, positions: list[list[int]], timesteps, resolution: int,
                      seed: int) -> torch.Tensor:
    """Denoise each reference view at `timesteps` with its row of `context` (n, 77, width) under the UNet's
    current processors; (n, len(positions)): each word's (its token positions') mean attention on the
    object's cells over its mean off them, the `resolution` layers' maps averaged over heads and layers."""
    unet = components.unet
    clean = _reference_latents(components, views)
    generator = torch.Generator().manual_seed(seed)
    with capture_cross_attention(unet) as capture:
        for t in timesteps:
            noise = torch.randn(clean.shape, generator=generator).to(clean.device, clean.dtype)
            unet(components.scheduler.add_noise(clean, noise, torch.tensor([t])), t, encoder_hidden_states=context)
    layers = [layer for layer in capture.layers if capture.resolution(layer) == (resolution, resolution)]
    if not layers:
        raise ValueError(f"This UNet has no {resolution} x {resolution} cross-attention layer.")
    # (layers, n, heads, pixels, tokens) -> mean over layers and heads: (n, pixels, tokens)
    probs = torch.stack([capture.probabilities(layer).float().cpu() for layer in layers]).mean(dim=(0, 2))
    ratios = torch.empty(len(views), len(positions[0]))
    for row, (_, mask) in enumerate(views):
        cells = object_cells(mask, resolution).flatten()
        for word, where in enumerate(positions[row]):
            heat = probs[row][:, where].sum(dim=-1)
            ratios[row, word] = heat[cells].mean() / heat[~cells].mean()
    return ratios


@torch.no_grad()
def attention_on_object(pipe: ELITEPipeline, concepts, num_words: int = 1, timesteps=TIMESTEPS, resolution: int = 16,
                        seed: int = 0) -> torch.Tensor:
    """Each concept's words w0..w{num_words-1}, injected at S with ELITE's processors, read on its reference
    view: (concepts, num_words), each the word's mean attention on the object's cells over its mean off them."""
    views = [concept_views(concept)[0] for concept in concepts]  # (image, mask) of each reference
    words = torch.stack([pipe.encode(image, mask).words[:num_words] for image, mask in views])  # (n, num_words, width)
    with elite_attention(pipe.components.unet, pipe.global_mapper):
        return _injected_words_on_object(pipe.components, views, words, timesteps, resolution, seed)


@torch.no_grad()
def compound_word_attention_on_object(components, concepts, timesteps=TIMESTEPS, resolution: int = 16,
                                      seed: int = 0) -> torch.Tensor:
    """What w0 imitates: each concept's description fused into one compound word (`words.compound_embeddings`)
    at S, with the UNet's own processors. (concepts, 1)."""
    views = [concept_views(concept)[0] for concept in concepts]
    words = compound_embeddings(components, [concept.description for concept in concepts])[:, None]  # (n, 1, width)
    return _injected_words_on_object(components, views, words, timesteps, resolution, seed)


def _injected_words_on_object(components, views, words: torch.Tensor, timesteps, resolution: int, seed: int) -> torch.Tensor:
    """`words` (n, k, width) injected at S of the prompt, one row per view, under the UNet's current processors."""
    unet = components.unet
    first = int(tokenize_with_placeholder(components.tokenizer, [PROMPT], num_words=words.shape[1])[1][0])  # w0's position
    context = encode_prompts_with_words(PROMPT, words.to(unet.device, unet.dtype), components.tokenizer,
                                        components.text_encoder)
    positions = [[[first + word] for word in range(words.shape[1])]] * len(views)
    return _on_object_ratios(components, views, context, positions, timesteps, resolution, seed)


@torch.no_grad()
def said_in_words_attention_on_object(components, concepts, timesteps=TIMESTEPS, resolution: int = 16,
                                      seed: int = 0) -> torch.Tensor:
    """The reference for w0: the plain model told each concept in words ("a photo of a red dotted heart"),
    on the same noised views. (concepts, 2): the shape word's ratio, and that of all the description's words."""
    views = [concept_views(concept)[0] for concept in concepts]
    prompts = [PROMPT.replace("S", concept.description) for concept in concepts]
    tokens = components.tokenizer(prompts, padding="max_length", max_length=components.tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt")
    context = components.text_encoder(tokens.input_ids.to(components.text_encoder.device))[0]
    positions = []
    for prompt, ids in zip(prompts, tokens.input_ids.tolist()):
        spans = word_spans(components.tokenizer, ids[:ids.index(components.tokenizer.eos_token_id) + 1])
        described = spans[len(PROMPT.split()) - 1:]  # the words where S was
        positions.append([list(described[-1]), [p for span in described for p in span]])
    return _on_object_ratios(components, views, context.to(components.unet.dtype), positions, timesteps, resolution, seed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Each word's attention on the object / around it (JSON).")
    parser.add_argument("--mapper", type=Path, default=ASSETS_DIR / "toy-global-mapper")
    parser.add_argument("--concepts", choices=sorted(CONCEPT_SETS), default="test")
    parser.add_argument("--num-words", type=whole_number(1), default=1,
                        help="words injected at S (1: w0 alone, as the pipeline generates by default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=writable_file, help="also write the report, with this command, to this JSON file")
    args = parser.parse_args(argv)
    components = load_components("toy", device="cpu", dtype=torch.float32)
    pipe = ELITEPipeline(components, GlobalMapper.from_pretrained(args.mapper))
    concepts = CONCEPT_SETS[args.concepts]
    ratios = attention_on_object(pipe, concepts, args.num_words, seed=args.seed)
    references = [compound_word_attention_on_object(components, concepts, seed=args.seed),
                  said_in_words_attention_on_object(components, concepts, seed=args.seed)]
    names = [f"w{w}" for w in range(args.num_words)] + [
        "said as one compound word", "said in words: the shape word", "said in words: all its words"]
    columns = torch.cat([ratios, *references], dim=1)  # (concepts, words + 3)
    report = {"prompt": PROMPT, "timesteps": list(TIMESTEPS), "resolution": 16, "concept_set": args.concepts,
              "words": {name: {"mean": round(float(columns[:, k].mean()), 3),
                               "interval": bootstrap_interval(columns[:, k].numpy()),
                               "concepts_above_1": int((columns[:, k] > 1).sum()), "concepts": len(concepts)}
                        for k, name in enumerate(names)},
              "per_concept": {c.name: dict(zip(names, (round(float(r), 3) for r in row))) for c, row in zip(concepts, columns)}}
    for word, figures in report["words"].items():
        print(f"{word}: on the object / around it {figures['mean']:.2f} (above 1 in {figures['concepts_above_1']} of "
              f"{figures['concepts']})")
    if args.out:
        command = " ".join(["python -m elite_tutorial.attention_on_object", *(sys.argv[1:] if argv is None else argv)])
        write_json_atomic(args.out, {"command": command, **report})


if __name__ == "__main__":
    main()
