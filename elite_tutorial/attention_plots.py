"""Reading a captured generation as per-word attention maps, and drawing them.

    words = prompt_words(pipe.components.tokenizer, "a photo of a S on the left")   # S = w0
    heat = word_map(capture, words[4].positions)                 # (h, w), rows of the prompt
    inside_outside_ratio(heat, object_mask)                      # > 1: S is read more on the object
    overlay(image, heat).save("S.png")
    word_grid(image, capture, words).savefig("grid.png")         # the paper's figure: one map per word

A word's map is the attention its tokens receive (their probabilities summed, so a word split into
several tokens counts once), at each query pixel, averaged over heads (or one head), over the layers
of one resolution (or over every layer, each upsampled to the finest grid), and over the chosen
steps. Maps are read from the conditional rows: the prompt, not the empty prompt of guidance.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image

from .attention_maps import AttentionCapture
from .words import DEFAULT_PLACEHOLDER, placeholder_token_id, tokenize_with_placeholder


@dataclass(frozen=True)
class PromptWord:
    """One word of a prompt as the UNet sees it: a label and its token positions (start token = 0)."""

    label: str
    positions: tuple[int, ...]


def injected_word_names(token_index: int | Sequence[int] | str = 0, count: int = 5) -> tuple[str, ...]:
    """Names of the words `ELITEPipeline` injects for `token_index`: 0 -> ("w0",), "full" -> w0..w4."""
    if token_index == "full":
        return tuple(f"w{i}" for i in range(count))
    return tuple(f"w{i}" for i in ([token_index] if isinstance(token_index, int) else token_index))


def prompt_words(tokenizer, prompt: str, injected: Sequence[str] = ("w0",),
                 placeholder: str = DEFAULT_PLACEHOLDER) -> list[PromptWord]:
    """The prompt's whitespace words with their token positions, the placeholder expanded into the
    injected words (one label each). Punctuation glued to the placeholder ("S,") gets its own entry.

    A prompt without the placeholder (a plain Stable Diffusion prompt) is split the same way.
    """
    placeholder_id = placeholder_token_id(tokenizer, placeholder)
    ids = tokenizer(prompt).input_ids
    if placeholder_id in ids:
        ids = tokenize_with_placeholder(tokenizer, [prompt], len(injected), placeholder)[0][0].tolist()
    words, position = [], 1
    for text in prompt.split():
        pieces = tokenizer(text, add_special_tokens=False).input_ids
        if placeholder_id in pieces:
            before = pieces.index(placeholder_id)
            rest = text.replace(placeholder, "", 1)
            if before:
                words.append(PromptWord(rest, tuple(range(position, position + before))))
            for offset, name in enumerate(injected):
                words.append(PromptWord(name, (position + before + offset,)))
            after = len(pieces) - before - 1
            if after:
                start = position + before + len(injected)
                words.append(PromptWord(rest, tuple(range(start, start + after))))
            position += len(pieces) - 1 + len(injected)
        else:
            words.append(PromptWord(text, tuple(range(position, position + len(pieces)))))
            position += len(pieces)
    if position >= len(ids) or ids[position] != tokenizer.eos_token_id:  # words split unlike the whole prompt
        tokens = tokenizer.convert_ids_to_tokens(ids)
        end = ids.index(tokenizer.eos_token_id)
        return [PromptWord(tokens[i].removesuffix("</w>"), (i,)) for i in range(1, end)]
    return words


def resolutions(capture: AttentionCapture) -> list[int]:
    """The grid heights the capture has layers at, finest first."""
    return sorted({capture.resolution(layer)[0] for layer in capture.layers}, reverse=True)


def layers_at(capture: AttentionCapture, resolution: int | None) -> list[str]:
    """The captured layers attending from a `resolution`-high grid (None: all layers)."""
    chosen = [layer for layer in capture.layers if resolution is None or capture.resolution(layer)[0] == resolution]
    if not chosen:
        raise ValueError(f"No captured layer runs at resolution {resolution}; there are {resolutions(capture)}.")
    return chosen


def word_map(capture: AttentionCapture, positions: Sequence[int], row: int | None = None, resolution: int | None = None,
             head: int | None = None, steps: Sequence[int] | None = None, layers: Sequence[str] | None = None) -> torch.Tensor:
    """The attention the tokens at `positions` receive: (h, w), at `resolution` (None: the finest grid,
    every layer upsampled to it).

    row: a row of the UNet batch (default: the first conditional row). head: one head (default: their
    mean). steps: step indices (default: all; a subset needs a capture made with `keep_steps`).
    layers: explicit layers instead of those of `resolution`.
    """
    row = capture.conditional_rows.start if row is None else row
    if not capture.sums:
        raise ValueError("Nothing was recorded: run the pipeline inside `capture_cross_attention`.")
    rows, heads, _, tokens = next(iter(capture.sums.values())).shape
    _check_index("row", row, rows, "rows of the UNet batch")
    _check_index("head", head, heads, "heads")
    if not positions:
        raise ValueError("positions is empty: give the token positions of a word (`prompt_words` lists them).")
    if capture.tokens is None:
        for position in positions:
            _check_index("token position", position, tokens, "prompt positions")
    columns = [capture.column(p) for p in positions]

    def one_layer(layer: str) -> torch.Tensor:
        probs = capture.probabilities(layer, steps)[row]  # (heads, pixels, kept tokens)
        probs = probs.mean(0) if head is None else probs[head]
        return probs[:, columns].sum(-1)
    return _mean_over_layers(capture, one_layer, resolution, layers)


def inside_outside_ratio(heat: torch.Tensor | np.ndarray, mask: torch.Tensor | np.ndarray) -> float:
    """The mean of a map over the object divided by its mean around it: 1 when the map does not prefer
    the object, above 1 when it looks at the object, below 1 when it looks away.

    heat: (h, w), e.g. a `word_map`. mask: (H, W), True (or 1) on the object, at any resolution: it is
    resized to the map's grid by area, a cell counting as object when at least half of it is.
    """
    heat, mask = (x.detach().cpu().float() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x, dtype=np.float32))
                  for x in (heat, mask))
    if heat.dim() != 2 or mask.dim() != 2:
        raise ValueError(f"heat and mask must be 2-D (h, w) and (H, W); got {tuple(heat.shape)} and {tuple(mask.shape)}.")
    inside = F.adaptive_avg_pool2d(mask[None, None], tuple(heat.shape))[0, 0] >= 0.5
    if inside.all() or not inside.any():
        raise ValueError(f"At the map's {tuple(heat.shape)} grid the mask covers {'every' if inside.any() else 'no'} cell: "
                         "a ratio needs cells on and off the object.")
    return float(heat[inside].mean() / heat[~inside].mean())


def gate_map(capture: AttentionCapture, row: int = 0, resolution: int | None = None, head: int | None = None,
             steps: Sequence[int] | None = None, layers: Sequence[str] | None = None) -> torch.Tensor:
    """ELITE's local gate (w0's map over its maximum) of the local branch's `row`: (h, w), as `word_map`."""
    if not capture.gate_sums:
        raise ValueError("No local gate was recorded (generate with a LocalMapper and λ > 0).")
    rows, heads, _ = next(iter(capture.gate_sums.values())).shape
    _check_index("row", row, rows, "rows of the local branch")
    _check_index("head", head, heads, "heads")

    def one_layer(layer: str) -> torch.Tensor:
        gate = capture.gate(layer, steps)[row]  # (heads, pixels)
        return gate.mean(0) if head is None else gate[head]
    return _mean_over_layers(capture, one_layer, resolution, layers, [layer for layer in capture.layers if layer in capture.gate_sums])


def _check_index(name: str, value, count: int, what: str) -> None:
    """Refuse an index (None: not chosen) outside 0..count-1 of what the capture holds, naming it."""
    if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value < count):
        raise ValueError(f"{name} {value!r} is outside what was captured: {count} {what} (0 to {count - 1}).")


def _mean_over_layers(capture: AttentionCapture, one_layer, resolution: int | None, layers: Sequence[str] | None,
                      candidates: Sequence[str] | None = None) -> torch.Tensor:
    """The mean of `one_layer(layer)` (pixels,) over the layers, each as an image upsampled to the finest one."""
    if layers is None:
        layers = [layer for layer in layers_at(capture, resolution) if candidates is None or layer in candidates]
    if not layers:
        raise ValueError("No layer to read.")
    grids = [(one_layer(layer).float().reshape(capture.resolution(layer)), capture.resolution(layer)) for layer in layers]
    size = max((shape for _, shape in grids), key=lambda s: s[0] * s[1])
    return torch.stack([grid if shape == size else
                        F.interpolate(grid[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
                        for grid, shape in grids]).mean(0)


def overlay(image: Image.Image | np.ndarray, heat: torch.Tensor | np.ndarray, opacity: float = 0.6,
            cmap: str = "inferno") -> Image.Image:
    """`heat` (h, w), scaled to [0, 1] by its maximum and coloured, blended over `image` at `opacity`."""
    base = Image.fromarray(_uint8(image)).convert("RGB")
    heat = torch.as_tensor(np.asarray(heat, dtype=np.float32))
    finite = bool(torch.isfinite(heat).all())
    if heat.dim() != 2 or not finite:
        raise ValueError(f"heat must be a finite (h, w) map; got shape {tuple(heat.shape)}"
                         f"{'' if finite else ' with NaN or infinite values'}.")
    heat = F.interpolate(heat[None, None], size=(base.height, base.width), mode="bilinear", align_corners=False)[0, 0]
    heat = (heat.clamp(min=0) / heat.max().clamp(min=1e-12)).numpy()
    coloured = (matplotlib.colormaps[cmap](heat)[..., :3] * 255).astype(np.uint8)
    return Image.blend(base, Image.fromarray(coloured), float(np.clip(opacity, 0, 1)))


def _uint8(image) -> np.ndarray:
    array = np.asarray(image)
    return (array * 255).round().astype(np.uint8) if array.dtype.kind == "f" else array


def word_grid(image, capture: AttentionCapture, words: Sequence[PromptWord], row: int | None = None,
              opacity: float = 0.6, scale: int = 4, **selection) -> Figure:
    """The paper's figure: the generated image, then one overlay per word, titled by the word.
    `selection`: `resolution`, `head`, `steps`, `layers` as in `word_map`. Save it with `savefig`."""
    base = Image.fromarray(_uint8(image))
    base = base.resize((base.width * scale, base.height * scale), Image.Resampling.NEAREST)
    figure = Figure(figsize=(1.6 * (1 + len(words)), 1.9))
    axes = figure.subplots(1, 1 + len(words), squeeze=False)[0]
    axes[0].imshow(base)
    axes[0].set_title("image", fontsize=9)
    for ax, word in zip(axes[1:], words):
        ax.imshow(overlay(base, word_map(capture, word.positions, row, **selection), opacity))
        ax.set_title(word.label, fontsize=9)
    for ax in axes:
        ax.axis("off")
    figure.tight_layout()
    return figure
