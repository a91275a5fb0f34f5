"""The attention explorer: generate a concept in a prompt, then look at where each word attends.

    explorer = AttentionExplorer(pipe, {"teal_heart": (image, mask), ...})
    explorer                                         # in Jupyter: the widgets

Generating (concept, prompt, λ, seed) captures every step's cross-attention once; the view controls
(word, steps, resolution, head, opacity) then re-render from that capture without generating again.
The drawing is the pure function `render(view, generation)`, usable and testable without widgets:

    generation = generate(pipe, pipe.encode(image, mask), "a photo of a S on the left", local_scale=0.8, seed=0)
    render(View(word="w0", steps=(10, 25)), generation).save("w0.png")
"""
from __future__ import annotations

import io
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from .attention_maps import AttentionCapture, capture_cross_attention
from .attention_plots import PromptWord, gate_map, overlay, prompt_words, resolutions, word_map
from .pipeline import DEFAULT_LOCAL_SCALE, Concept, ELITEPipeline

GATE = "local gate"  # the word list's entry for ELITE's local gate


@dataclass
class Generation:
    """One generated image (H, W, 3) uint8, its capture (every step kept) and the prompt's words."""

    image: np.ndarray
    capture: AttentionCapture
    words: list[PromptWord]
    prompt: str

    @property
    def labels(self) -> list[str]:
        """What the word selector offers: each word, then the local gate when there is one."""
        return [w.label for w in self.words] + ([GATE] if self.capture.gate_sums else [])


@dataclass(frozen=True)
class View:
    """How to look at a generation. steps: first and last step (inclusive; None = all);
    resolution: a grid height (None = all layers, upsampled to the finest); layer: one layer instead
    (a processor name); head: one head or None (mean)."""

    word: str = "w0"
    steps: tuple[int, int] | None = None
    resolution: int | None = None
    layer: str | None = None
    head: int | None = None
    opacity: float = 0.6
    scale: int = 4


def generate(pipe: ELITEPipeline, concept: Concept, prompt: str, local_scale: float | None = None, seed: int = 0,
             **kwargs) -> Generation:
    """Generate one image of `concept` in `prompt` with every step's attention captured (prompt tokens only)."""
    words = prompt_words(pipe.components.tokenizer, prompt)
    positions = sorted({p for w in words for p in w.positions})
    with capture_cross_attention(pipe, tokens=positions, keep_steps=True) as capture:
        output = pipe(prompt, concept, local_scale=local_scale, generator=torch.Generator().manual_seed(seed),
                      output_type="np", **kwargs)
    return Generation((output.images[0] * 255).round().astype(np.uint8), capture, words, prompt)


def render(view: View, generation: Generation) -> Image.Image:
    """The generated image beside the chosen word's map over it, enlarged `view.scale` times."""
    capture = generation.capture
    steps = None if view.steps is None else range(view.steps[0], view.steps[1] + 1)
    selection = dict(resolution=view.resolution, head=view.head, steps=steps,
                     layers=None if view.layer is None else [view.layer])
    if view.word == GATE:
        heat = gate_map(capture, **selection)
    else:
        word = next((w for w in generation.words if w.label == view.word), None)
        if word is None:
            raise ValueError(f"{view.word!r} is not a word of {generation.prompt!r}; its words: {generation.labels}.")
        heat = word_map(capture, word.positions, **selection)
    image = Image.fromarray(generation.image)
    size = (image.width * view.scale, image.height * view.scale)
    image = image.resize(size, Image.Resampling.NEAREST)
    panel = Image.new("RGB", (2 * size[0] + 8, size[1]), "white")
    panel.paste(image, (0, 0))
    panel.paste(overlay(image, heat, view.opacity), (size[0] + 8, 0))
    return panel


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class AttentionExplorer:
    """The ipywidgets app: concept, prompt, λ and seed, then Generate; word, steps, resolution or
    layer, head and opacity re-render from the stored capture. `concepts`: name -> (image, mask or None).
    An uploaded image (and optional mask) is added as the concept "uploaded"."""

    def __init__(self, pipe: ELITEPipeline, concepts: dict[str, tuple[Any, Any]], prompt: str = "a photo of a S on the left",
                 seed: int = 0):
        import ipywidgets as w  # noqa: PLC0415 (widgets only for the app)

        if not isinstance(concepts, Mapping) or not concepts:
            raise TypeError(f"concepts must be a non-empty dict of name -> (image, mask or None), e.g. "
                            f"{{'heart': ('0.png', '0_bg.png')}}; not {concepts!r:.60}.")
        self.pipe, self.concepts = pipe, dict(concepts)
        self._encoded: dict[str, Concept] = {}
        self.generation: Generation | None = None
        self._mute = False
        has_local = pipe.local_mapper is not None
        self.concept = w.Dropdown(options=list(self.concepts), description="concept")
        self.upload_image = w.FileUpload(accept="image/*", description="image")
        self.upload_mask = w.FileUpload(accept="image/*", description="mask")
        self.prompt = w.Text(value=prompt, description="prompt", layout=w.Layout(width="420px"))
        self.local_scale = w.FloatSlider(value=DEFAULT_LOCAL_SCALE if has_local else 0.0, min=0, max=1, step=0.1, description="λ",
                                         disabled=not has_local)
        self.seed = w.IntText(value=seed, description="seed")
        self.generate_button = w.Button(description="Generate", button_style="primary")
        self.word = w.Dropdown(description="word")
        self.steps = w.IntRangeSlider(description="steps")
        self.resolution = w.Dropdown(description="resolution")
        self.layer = w.Dropdown(description="layer")
        self.head = w.Dropdown(description="head")
        self.opacity = w.FloatSlider(value=0.6, min=0, max=1, step=0.05, description="opacity")
        self.image = w.Image(format="png")
        self.status = w.HTML()
        self.generate_button.on_click(lambda _: self.run())
        for upload in (self.upload_image, self.upload_mask):
            upload.observe(lambda _: self._take_upload(), names="value")
        for control in (self.word, self.steps, self.resolution, self.layer, self.head, self.opacity):
            control.observe(lambda _: self.refresh(), names="value")
        self.widget = w.VBox([
            w.HBox([self.concept, self.upload_image, self.upload_mask]),
            w.HBox([self.prompt, self.local_scale, self.seed, self.generate_button]),
            w.HBox([self.word, self.resolution, self.layer, self.head]),
            w.HBox([self.steps, self.opacity]),
            self.image, self.status,
        ])

    def _ipython_display_(self):
        from IPython.display import display  # noqa: PLC0415

        display(self.widget)

    def _take_upload(self) -> None:
        if not self.upload_image.value:
            return
        image = Image.open(io.BytesIO(bytes(self.upload_image.value[0]["content"])))
        mask = Image.open(io.BytesIO(bytes(self.upload_mask.value[0]["content"]))) if self.upload_mask.value else None
        self.concepts["uploaded"] = (image, mask)
        self._encoded.pop("uploaded", None)
        self.concept.options = list(self.concepts)
        self.concept.value = "uploaded"

    def encoded(self, name: str) -> Concept:
        if name not in self._encoded:
            image, mask = self.concepts[name]
            self._encoded[name] = self.pipe.encode(image, mask)
        return self._encoded[name]

    def run(self) -> None:
        """Generate with the current concept, prompt, λ and seed; then show it."""
        self.status.value = "generating…"
        try:
            self.generation = generate(self.pipe, self.encoded(self.concept.value), self.prompt.value,
                                       self.local_scale.value, self.seed.value)
        except ValueError as error:  # a prompt without S, a bad upload: say so in the app
            self.status.value = f"<span style='color:#b00'>{error}</span>"
            return
        capture = self.generation.capture
        heads = min(total.shape[1] for total in capture.sums.values())  # (rows, heads, pixels, tokens)
        with self._muted():
            labels = self.generation.labels
            self.word.options = labels
            if self.word.value not in labels:
                self.word.value = next((label for label in labels if label.startswith("w")), labels[0])
            self.steps.max = capture.num_steps - 1
            self.steps.value = (0, capture.num_steps - 1)
            self.resolution.options = [("all", None)] + [(str(r), r) for r in resolutions(capture)]
            self.layer.options = [("all of the resolution", None)] + [
                (f"{name.removesuffix('.transformer_blocks.0.attn2.processor')} ({capture.resolution(name)[0]})", name)
                for name in capture.layers]
            self.head.options = [("mean", None)] + [(str(h), h) for h in range(heads)]
        self.status.value = f"{capture.num_steps} steps captured ({capture.nbytes() / 2**20:.1f} MiB)"
        self.refresh()

    def view(self) -> View:
        return View(word=self.word.value, steps=tuple(self.steps.value), resolution=self.resolution.value,
                    layer=self.layer.value, head=self.head.value, opacity=self.opacity.value)

    def refresh(self) -> None:
        """Re-render the current view of the stored generation (nothing is generated)."""
        if self.generation is None or self._mute:
            return
        self.image.value = png_bytes(render(self.view(), self.generation))

    @contextmanager
    def _muted(self):
        """No re-rendering while several controls change together."""
        self._mute = True
        try:
            yield
        finally:
            self._mute = False

