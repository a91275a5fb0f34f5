"""Images, masks, concept folders and prompt templates, prepared the way ELITE's encoders read them.

The authors' preprocessing for the image encoder: the image as RGB, resized (squashed, not cropped)
to the encoder's input size with bicubic resampling, scaled to [0, 1] and normalised with CLIP's mean
and std. Masks are white on the object, in RGB or greyscale (or, in a cut-out PNG, its alpha).

Beyond what their code reads (8-bit RGB JPEG/PNG), `load_image` accepts any PIL mode: greyscale,
palette, 16-bit and 32-bit greyscale (rescaled to 8 bits), and images with transparency (composited
over white, so transparent pixels do not become black); photos are turned upright by their EXIF
orientation; numpy arrays and torch tensors, channels last or first, uint8 or float in [0, 1].
"""
from __future__ import annotations

import csv
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import ExifTags, Image, ImageFilter, ImageOps, UnidentifiedImageError

from .arguments import path_argument

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)

# The authors' training templates (Textual Inversion's "imagenet_templates_small").
IMAGENET_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}",
    "a cropped photo of a {}", "a photo of the {}", "a good photo of the {}", "a photo of one {}",
    "a close-up photo of the {}", "a rendition of the {}", "a photo of the clean {}",
    "a rendition of a {}", "a photo of a nice {}", "a good photo of a {}", "a photo of the nice {}",
    "a photo of the small {}", "a photo of the weird {}", "a photo of the large {}",
    "a photo of a cool {}", "a photo of a small {}",
)

ImageLike = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor

# What a global mapper reads of a concept image: the whole image (the authors' code, whose training
# images are already boxes around an object), the object alone (`object_crop`), or the padded box
# around it (`box_crop`: the authors' training view, cut from a larger image by its mask).
GLOBAL_VIEWS = ("image", "object", "box")
# Where a stage-2 batch holds each global view, for the frozen global mapper's words
LOCAL_BATCH_VIEWS = {"image": "clip_pixels", "object": "object_crop_pixels", "box": "box_crop_pixels"}


def clip_normalise(pixels01: torch.Tensor) -> torch.Tensor:
    """(batch, 3, H, W) RGB in [0, 1] -> CLIP's normalisation."""
    return (pixels01 - CLIP_MEAN.to(pixels01)) / CLIP_STD.to(pixels01)


def _open(source: ImageLike, what: str) -> Image.Image:
    if isinstance(source, Image.Image):
        if 0 in source.size:
            raise ValueError(f"The {what} has no pixels (size {source.size}).")
        return _upright(source)
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return _from_array(source, what)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"The {what} must be a path, a PIL image, a numpy array or a torch tensor, "
                        f"not {type(source).__name__} {source!r}.")
    path = path_argument(source, f"the {what}", f"{'an' if what[0] in 'aeiou' else 'a'} {what} file")
    if not path.is_file():
        raise FileNotFoundError(f"No {what} file at {path}.")
    try:
        image = Image.open(path)
        image.load()  # decode now: a truncated file fails here, not later
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"{path} is not a readable {what} (corrupt, truncated or not an image file): {error}") from None
    return _upright(image)


def _upright(image: Image.Image) -> Image.Image:
    """The image as viewers show it: a camera's EXIF orientation (a phone photo taken upright is
    stored sideways, with a tag that says so) applied to the pixels."""
    if image.getexif().get(ExifTags.Base.Orientation, 1) == 1:
        return image
    return ImageOps.exif_transpose(image)


def _from_array(array: np.ndarray | torch.Tensor, what: str) -> Image.Image:
    """A numpy array or torch tensor -> PIL image.

    Shapes: (H, W), (H, W, C) or channels-first (C, H, W), with C = 1, 3 or 4 (channels first when
    only the first axis looks like channels). Values: bool, uint8, uint16 or int32 as PIL reads them,
    other integers in 0..255, floats in [0, 1] (scaled to 0..255) or, above 1, in 0..255.
    """
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    shape = array.shape
    if array.ndim == 3 and shape[0] in (1, 3, 4) and shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # torch's channels-first layout -> PIL's channels-last
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2 and not (array.ndim == 3 and array.shape[-1] in (3, 4)):
        raise ValueError(f"An {what} array must be (H, W), (H, W, C) or (C, H, W) with 1, 3 or 4 channels; got shape {shape}.")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"The {what} array has no pixels (shape {shape}).")
    if array.dtype.kind == "f":
        low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
        if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high > 255:
            raise ValueError(f"A float {what} array must hold values in [0, 1] (or 0..255); this one holds {low:.4g}..{high:.4g}. "
                             "Rescale it first, e.g. (x + 1) / 2 for values in [-1, 1].")
        array = np.clip(array * (255 if high <= 1 else 1) + 0.5, 0, 255).astype(np.uint8)
    elif array.dtype.kind in "iu" and array.dtype not in (np.uint8, np.uint16, np.int32):  # PIL reads those three
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError(f"An integer {what} array of {array.dtype} must hold values in 0..255; this one holds "
                             f"{array.min()}..{array.max()}. Convert it to uint8 first.")
        array = array.astype(np.uint8)
    try:
        return Image.fromarray(np.ascontiguousarray(array))
    except TypeError as error:
        raise ValueError(f"Cannot read a {what} array of shape {shape} and type {array.dtype}: {error}. "
                         "Pass uint8 values, (H, W, 3) RGB or (H, W) grey.") from None


def _to_8bit_grey(image: Image.Image) -> Image.Image:
    """16/32-bit integer or float greyscale -> 8-bit 'L', keeping the full range visible; other modes as they are."""
    if not (image.mode in ("I", "F") or image.mode.startswith("I;16")):
        return image
    values = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16") or (image.mode == "I" and values.max(initial=0) > 255):
        values = values / 65535 * 255
    elif image.mode == "F" and values.max(initial=0) <= 1.0:
        values = values * 255
    return Image.fromarray(np.clip(values + 0.5, 0, 255).astype(np.uint8))


def load_image(source: ImageLike) -> Image.Image:
    """Any image (path, PIL image, numpy array or torch tensor; any mode and size) -> an 8-bit RGB PIL
    image, upright (EXIF orientation applied). Arrays: see `_from_array`."""
    image = _to_8bit_grey(_open(source, "image"))
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode.endswith("A"):  # RGBA, LA, PA
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image.convert("RGB")


def load_mask(source: ImageLike, size: tuple[int, int] | None = None) -> np.ndarray:
    """A mask image (white = object) -> bool array (H, W); resized (nearest) to `size` = (W, H) if given.

    The object is where the mask is brighter than half its brightest value: mid-grey for a 0/255
    mask, so JPEG noise around black and white moves no pixel (a 0/1 label mask works too). A mask
    with transparency that varies (a cut-out PNG) marks the object by its alpha channel: its colours
    may be anything, all white included.
    """
    image = _to_8bit_grey(_open(source, "mask"))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    grey = image.convert("L")
    if image.mode.endswith("A"):
        alpha = image.getchannel("A")
        low, high = alpha.getextrema()
        if low != high:
            grey = alpha
    if size is not None and grey.size != tuple(size):
        grey = grey.resize(tuple(size), Image.Resampling.NEAREST)
    values = np.asarray(grey)
    mask = values > values.max() / 2
    if not mask.any():
        raise ValueError("The mask is empty (no white pixels): it must mark the object in white.")
    _warn_if_unlikely_mask(values, mask, source)
    return mask


def _warn_if_unlikely_mask(values: np.ndarray, mask: np.ndarray, source) -> None:
    """Warn about a mask that is probably wrong: not two-toned (a photo: image and mask swapped), or
    nearly all white and touching every edge (inverted: white must mark the object, not the background).
    values: (H, W) uint8 grey levels; mask: (H, W) bool, the object read from them."""
    name = f"The mask {source}" if isinstance(source, (str, os.PathLike)) else "The mask"
    top = max(int(values.max()), 1)
    between = ((values > 0.1 * top) & (values < 0.9 * top)).mean()  # JPEG noise and soft edges stay near the two tones
    if between > 0.2:
        warnings.warn(f"{name} is not two-toned ({between:.0%} of its pixels are neither black nor white): it looks "
                      "like a photo. Are the image and the mask swapped? A mask is white on the object, black elsewhere.",
                      stacklevel=3)
    elif mask.mean() > 0.9 and all(edge.any() for edge in (mask[0], mask[-1], mask[:, 0], mask[:, -1])):
        warnings.warn(f"{name} is {mask.mean():.0%} white and touches every edge: it looks inverted (white must mark "
                      "the object, black the background). Invert it if the object is the black part.", stacklevel=3)


def unit_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """An RGB PIL image resized (bicubic, squashed) to (3, size, size), in [0, 1]."""
    resized = image.resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255).permute(2, 0, 1)


def clip_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """An RGB PIL image -> the image encoder's input (3, size, size), as the authors prepare it."""
    return clip_normalise(unit_pixels(image, size)[None])[0]


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
# A file named like a mask: `N_bg.png` in the authors' layout, or another case, separator or suffix
# ("N-BG.jpg", "N mask.png", "N_mask.webp"); group 1 is the view it belongs to.
_MASK_NAME = re.compile(r"(.+?)[ _.\-]?(bg|mask)", re.IGNORECASE)


def concept_folder(folder: str | os.PathLike) -> list[tuple[Path, Path | None]]:
    """The views of a concept folder in the authors' layout: `N.jpg|png` with optional mask `N_bg.png`.

    Returns (image path, mask path or None) pairs sorted by name. A file named like a mask under
    another case, separator or suffix (`N-BG.jpg`, `N_mask.png`) is read as its view's mask; one whose
    view is missing is named in a warning. Neither is ever taken as a view.
    """
    folder = path_argument(folder, "folder", "a concept folder")
    if not folder.is_dir():
        raise FileNotFoundError(f"No concept folder at {folder}.")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    mask_like = {p: m[1] for p in files if (m := _MASK_NAME.fullmatch(p.stem))}
    images = [p for p in files if p not in mask_like]
    if not images:
        raise ValueError(f"{folder} holds no images; a concept folder has `N.jpg` or `N.png` (+ mask `N_bg.png`).")
    masks: dict[str, Path] = {}
    for path, view in sorted(mask_like.items(), key=lambda item: item[0].name != f"{item[1]}_bg.png"):
        masks.setdefault(view, path)  # the authors' `N_bg.png` first, where a view has several
    views = {p.stem for p in images}
    if orphans := sorted(p.name for p, view in mask_like.items() if view not in views):
        warnings.warn(f"{folder}: {', '.join(orphans)} look(s) like masks but no view has that name (a mask "
                      "`N_bg.png` belongs to the image `N.png`); they were left out.", stacklevel=2)
    return [(p, masks.get(p.stem)) for p in images]


# --------------------------------------------------------------------------------------------------
# Training samples for the global mapper.

def augment_for_clip(image: Image.Image, size: int, rng: np.random.Generator) -> torch.Tensor:
    """The image encoder's view of a training image, in [0, 1]: (3, size, size).

    The authors' stage-1 augmentation: resize to the encoder's size, horizontal flip (p 0.5),
    rotation within +-20 degrees, blur (p 0.3). (Their elastic transform is left out.)
    """
    image = image.resize((size, size), Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    corner = image.getpixel((0, 0))  # fill what the rotation uncovers with the border's colour
    image = image.rotate(float(rng.uniform(-20, 20)), resample=Image.Resampling.BICUBIC, fillcolor=corner)
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.BoxBlur(max(1, size // 112)))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)


def _object_square(mask: np.ndarray, margin: float) -> tuple[int, int, int]:
    """(left, top, side) of a square centred on the mask's box, `margin` wider than its longer side."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("The mask is empty: it marks no object pixels.")
    centre_x, centre_y = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
    side = round(max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) * (1 + margin))
    return int(np.floor(centre_x - side / 2)), int(np.floor(centre_y - side / 2)), side


def cut_out(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """The object alone, on black: the image with every pixel outside `mask` set to 0 (the authors'
    `image * mask`). mask: (H, W) bool, True on the object, at the image's size."""
    return Image.fromarray((np.asarray(image) * mask[..., None]).astype(np.uint8))


def object_crop(image: Image.Image, mask: np.ndarray, margin: float = 0.25) -> Image.Image:
    """The object alone (background pixels black), cropped to a square centred on its mask's box,
    `margin` wider than the box's longer side (areas beyond the image stay black).

    What a global mapper with `input_view="object"` reads: the object fills the encoder's view, so
    its shape spans many patches, and nothing of the background or the object's place is left for
    the words to carry. mask: (H, W) bool, True on the object, at the image's size.
    """
    left, top, side = _object_square(mask, margin)
    return cut_out(image, mask).crop((left, top, left + side, top + side))


def box_crop(image: Image.Image, mask: np.ndarray, margin: float = 0.25) -> Image.Image:
    """The padded box around the object, background kept: a square centred on the mask's box,
    `margin` wider than its longer side, moved inside the image where it fits (the authors' stage-1
    images are such boxes, padded by 10-20 px). mask: (H, W) bool, True on the object."""
    left, top, side = _object_square(mask, margin)
    width, height = image.size
    if side <= min(width, height):  # slide the square inside rather than show pixels beyond the image
        left, top = min(max(left, 0), width - side), min(max(top, 0), height - side)
    return image.crop((left, top, left + side, top + side))


def global_view_image(image: Image.Image, mask: np.ndarray | None, view: str) -> Image.Image:
    """What a global mapper that reads `view` (one of GLOBAL_VIEWS) sees of `image`; mask: (H, W) bool."""
    if view == "image":
        return image
    if mask is None:
        raise ValueError(f"The {view!r} view is cut out by the object's mask; give the mask.")
    return object_crop(image, mask) if view == "object" else box_crop(image, mask)


def local_batch_views(samples: list[tuple[Image.Image, np.ndarray]], size: int) -> dict[str, torch.Tensor]:
    """Every global view of (image, mask) samples, (B, 3, size, size) in [0, 1], under its stage-2 batch
    key (`LOCAL_BATCH_VIEWS`), so a frozen global mapper of any view finds what it reads."""
    return {key: torch.stack([unit_pixels(global_view_image(image, mask, view), size) for image, mask in samples])
            for view, key in LOCAL_BATCH_VIEWS.items()}


def target_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """The UNet's target image: (3, size, size) in [-1, 1]."""
    pixels = np.asarray(image.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
    return torch.from_numpy(pixels / 127.5 - 1).permute(2, 0, 1)


class TrainingSource(Protocol):
    """Where training samples come from (the toy world's: `toyworld.sources`; photos: `OpenImagesSource`).
    `batch` is a pure function of `rng` (exact resume)."""

    global_view: str  # what `clip_pixels` shows of an image: one of GLOBAL_VIEWS

    def batch(self, rng: np.random.Generator, size: int) -> dict:
        """`pixel_values` (B, 3, R, R) in [-1, 1]; `clip_pixels` (B, 3, S, S) in [0, 1]; `prompts`."""

    def validation_images(self) -> list[Image.Image]:
        """A few fixed images to show what the mapper makes of them during training."""


class LocalTrainingSource(Protocol):
    """Where stage-2 samples come from (see `training.local_step_losses` for the batch)."""

    def local_batch(self, rng: np.random.Generator, size: int, scale_augmentation: bool = True) -> dict:
        """`pixel_values`, `valid_mask`, `clip_pixels`, `object_crop_pixels`, `box_crop_pixels` (the
        global mapper's views, `LOCAL_BATCH_VIEWS`), `object_pixels`, `object_mask`, `prompts`; targets
        scale-augmented (`scale_augment`) unless `scale_augmentation` is False."""

    def validation_concepts(self) -> list[tuple[Image.Image, np.ndarray]]:
        """A few fixed (image, mask) pairs to show what the mappers make of them during training."""


# --------------------------------------------------------------------------------------------------
# Training samples for the local mapper (stage 2).

# What a stage-2 caption says of a shrunk or an enlarged target (`scale_augment`)
FAR_PHRASES = ("a far away", "very small")
NEAR_PHRASES = ("zoomed in", "close up")


def scale_augment(image: Image.Image, size: int, latent_factor: int, rng: np.random.Generator, enabled: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The authors' stage-2 scale augmentation (borrowed from Custom Diffusion) of the UNet's target.

    With probability 2/3 the image is resized to a side in [size/3, size]; if that is under 0.6 size
    it is pasted at a random place on a blank canvas (0 in [-1, 1]) and the caption says "a far away"
    or "very small". With probability 1/3 it is enlarged to 1.2..1.4 size and cropped ("zoomed in",
    "close up"). Returns the target (3, size, size) in [-1, 1], the valid-region mask
    (1, size / latent_factor, size / latent_factor) that weights the loss (the pasted region, one
    latent pixel inset; all ones otherwise), and the phrase for the caption ("a" when unchanged).
    `enabled=False` leaves every image unchanged (and draws nothing from `rng`).
    """
    if not enabled:
        scale = size
    elif rng.integers(0, 3) < 2:
        scale = int(rng.integers(size // 3, size + 1))
    else:
        scale = int(rng.integers(int(1.2 * size), int(1.4 * size)))
    scale += scale % 2
    latent = size // latent_factor
    valid = np.ones((latent, latent), dtype=np.float32)
    if scale < 0.6 * size:
        phrase = FAR_PHRASES[rng.integers(2)]
        cy, cx = (int(v) for v in rng.integers(scale // 2, size - scale // 2 + 1, size=2))
        pixels = np.zeros((size, size, 3), dtype=np.float32)
        pasted = np.asarray(image.resize((scale, scale), Image.Resampling.BICUBIC), dtype=np.float32) / 127.5 - 1
        pixels[cy - scale // 2: cy + scale // 2, cx - scale // 2: cx + scale // 2] = pasted
        valid[:] = 0
        valid[(cy - scale // 2) // latent_factor + 1: (cy + scale // 2) // latent_factor - 1,
              (cx - scale // 2) // latent_factor + 1: (cx + scale // 2) // latent_factor - 1] = 1
    elif scale > size:
        phrase = NEAR_PHRASES[rng.integers(2)]
        cy, cx = (int(v) for v in rng.integers(size // 2, scale - size // 2 + 1, size=2))
        enlarged = np.asarray(image.resize((scale, scale), Image.Resampling.BICUBIC), dtype=np.float32) / 127.5 - 1
        pixels = enlarged[cy - size // 2: cy + size // 2, cx - size // 2: cx + size // 2]
    else:
        phrase = "a"
        pixels = np.asarray(image.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32) / 127.5 - 1
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1), torch.from_numpy(valid)[None], phrase


def with_scale_phrase(prompt: str, phrase: str) -> str:
    """Put `scale_augment`'s phrase in place of the prompt's leading article ("a photo of a S" ->
    "a far away photo of a S"). The authors replace the first *character* of the template, which
    garbles templates that start with "the" ("ahe photo ..."); this replaces the word."""
    if phrase == "a":
        return prompt
    first, _, rest = prompt.partition(" ")
    return f"{phrase} {rest}" if first in ("a", "an", "the") else f"{phrase} {prompt}"


def object_view_for_clip(image: Image.Image, mask: np.ndarray, size: int, rng: np.random.Generator
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The local mapper's view of a training object, as the authors' stage 2 prepares it.

    The object alone (background pixels black) and its mask, resized to the encoder's `size`, then
    together: a random resize-and-crop (p 0.5, up to 256/224 of the size), rotation within +-30
    degrees (p 0.5) and translation within +-60/224 of the size (p 0.5).
    Returns the image (3, size, size) in [0, 1] and the mask (size, size) bool.
    """
    object_image = cut_out(image, mask).resize((size, size), Image.Resampling.BICUBIC)
    object_mask = Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.Resampling.NEAREST)
    if rng.integers(2) == 0:
        new_size = int(rng.integers(size, round(size * 256 / 224) + 1))
        top, left = (int(v) for v in rng.integers(0, new_size - size + 1, size=2))
        box = (left, top, left + size, top + size)
        object_image = object_image.resize((new_size, new_size), Image.Resampling.BICUBIC).crop(box)
        object_mask = object_mask.resize((new_size, new_size), Image.Resampling.NEAREST).crop(box)
    angle = float(rng.integers(-30, 31)) if rng.integers(2) == 0 else 0.0
    shift = tuple(int(v) for v in rng.integers(-round(60 * size / 224), round(60 * size / 224) + 1, size=2)) \
        if rng.integers(2) == 0 else (0, 0)
    object_image = object_image.rotate(angle, Image.Resampling.BICUBIC, translate=shift)
    object_mask = object_mask.rotate(angle, Image.Resampling.NEAREST, translate=shift)
    return (torch.from_numpy(np.asarray(object_image, dtype=np.float32) / 255).permute(2, 0, 1),
            torch.from_numpy(np.asarray(object_mask) > 127))


def _draw(rng: np.random.Generator, count: int, size: int, read: Callable[[int], Any], failure: Callable[[], str]) -> list:
    """`size` items `read(index)` at random indices; None means unusable and is passed over. At most
    100 tries per item, then ValueError(failure())."""
    found = []
    for _ in range(100 * size):
        item = read(int(rng.integers(count)))
        if item is not None:
            found.append(item)
            if len(found) == size:
                return found
    raise ValueError(failure())


class OpenImagesSource:
    """Object boxes of OpenImages in the authors' folder layout (stage 1 reads boxes only):

        <root>/annotations/<split>-annotations-bbox.csv   (train: oidv6-train-annotations-bbox.csv)
        <root>/images/<split>/<ImageID>.jpg

    Boxes covering 2 %..80 % of their image are kept; a sample is its box padded by 10 px, at
    `resolution` for the UNet and augmented at `clip_size` for CLIP, with a random template.
    Unreadable images are skipped and counted (`skipped`), never turned into blank samples.
    """

    global_view = "image"  # the box is the whole training image, as the authors'

    def __init__(self, root: str | os.PathLike, split: str = "test", resolution: int = 512, clip_size: int = 224):
        self.root, self.split = Path(root), split
        self.resolution, self.clip_size = resolution, clip_size
        name = "oidv6-train-annotations-bbox.csv" if split == "train" else f"{split}-annotations-bbox.csv"
        table = self.root / "annotations" / name
        if not table.is_file():
            raise FileNotFoundError(f"No box table at {table}; expected the OpenImages layout described in "
                                    "`OpenImagesSource`'s docstring.")
        with open(table, newline="") as f:
            rows = list(csv.DictReader(f))
        self.boxes = []
        for row in rows:
            x0, x1, y0, y1 = (float(row[k]) for k in ("XMin", "XMax", "YMin", "YMax"))
            if 0.02 < (x1 - x0) * (y1 - y0) < 0.8:
                self.boxes.append((row["ImageID"], x0, x1, y0, y1))
        if not self.boxes:
            raise ValueError(f"{table} has no boxes covering 2 %..80 % of their image.")
        self.skipped = 0

    def crop(self, index: int) -> Image.Image | None:
        """Box `index` padded by 10 px, or None if its image cannot be read."""
        image_id, x0, x1, y0, y1 = self.boxes[index]
        try:
            image = load_image(self.root / "images" / self.split / f"{image_id}.jpg")
        except (OSError, ValueError):
            self.skipped += 1
            return None
        w, h = image.size
        return image.crop((max(0, int(x0 * w) - 10), max(0, int(y0 * h) - 10),
                           min(w, int(x1 * w) + 10), min(h, int(y1 * h) + 10)))

    def batch(self, rng: np.random.Generator, size: int) -> dict:
        crops = _draw(rng, len(self.boxes), size, self.crop,
                      lambda: f"Could not read {size} images from {self.root} in {100 * size} attempts "
                              f"({self.skipped} unreadable so far).")
        return {"pixel_values": torch.stack([target_pixels(c, self.resolution) for c in crops]),
                "clip_pixels": torch.stack([augment_for_clip(c, self.clip_size, rng) for c in crops]),
                "prompts": [IMAGENET_TEMPLATES[rng.integers(len(IMAGENET_TEMPLATES))].format("S") for _ in crops]}

    def validation_images(self) -> list[Image.Image]:
        crops = (self.crop(i) for i in range(min(len(self.boxes), 16)))
        return [c for c in crops if c is not None][:4]


class OpenImagesMaskSource:
    """Stage-2 samples from OpenImages objects with segmentation masks, in the authors' layout:

        <root>/annotations/<split>-annotations-object-segmentation.csv
        <root>/masks/<split>/<MaskPath>              (white = object; any size, resized to the image)
        <root>/images/<split>/<ImageID>.jpg

    Kept as the authors keep them: boxes covering 2 %..80 % of the image, at least 100 px a side, with
    an aspect ratio within 1:2..2:1. A sample is the box padded by 10 px: the UNet's target is that crop
    scale-augmented (`scale_augment`, with its valid region and caption phrase); the global words read
    the crop; the local mapper reads the object alone (`object_view_for_clip` of the crop and its mask).
    Unreadable images or masks are skipped and counted (`skipped`).
    """

    def __init__(self, root: str | os.PathLike, split: str = "test", resolution: int = 512, clip_size: int = 224,
                 latent_factor: int = 8):
        self.root, self.split = Path(root), split
        self.resolution, self.clip_size, self.latent_factor = resolution, clip_size, latent_factor
        table = self.root / "annotations" / f"{split}-annotations-object-segmentation.csv"
        if not table.is_file():
            raise FileNotFoundError(f"No segmentation table at {table}; expected the OpenImages layout described "
                                    "in `OpenImagesMaskSource`'s docstring.")
        with open(table, newline="") as f:
            rows = list(csv.DictReader(f))
        self.objects = [row for row in rows if self.keeps(row)]
        if not self.objects:
            raise ValueError(f"{table} has no object that stage 2 keeps (2 %..80 % of the image, ≥ 100 px a side, "
                             "aspect ratio 1:2..2:1).")
        self.skipped = 0

    @staticmethod
    def keeps(row: dict) -> bool:
        """Whether a segmentation-table row's box passes the area filter."""
        x0, x1, y0, y1 = (float(row[k]) for k in ("BoxXMin", "BoxXMax", "BoxYMin", "BoxYMax"))
        return 0.02 < (x1 - x0) * (y1 - y0) < 0.8  # the pixel-size filters need the image: see `sample`

    def sample(self, index: int) -> tuple[Image.Image, np.ndarray] | None:
        """Object `index`: its padded box crop and the crop of its mask, or None if unreadable, too small,
        or its mask misses the box."""
        row = self.objects[index]
        try:
            image = load_image(self.root / "images" / self.split / f"{row['ImageID']}.jpg")
            mask = load_mask(self.root / "masks" / self.split / row["MaskPath"], size=image.size)
        except (OSError, ValueError):
            self.skipped += 1
            return None
        w, h = image.size
        x0, x1 = round(float(row["BoxXMin"]) * w), round(float(row["BoxXMax"]) * w)
        y0, y1 = round(float(row["BoxYMin"]) * h), round(float(row["BoxYMax"]) * h)
        if min(x1 - x0, y1 - y0) < 100 or not 0.5 <= (x1 - x0) / max(y1 - y0, 1) <= 2:
            return None
        box = (max(0, x0 - 10), max(0, y0 - 10), min(w, x1 + 10), min(h, y1 + 10))
        mask = mask[box[1]:box[3], box[0]:box[2]]
        return (image.crop(box), mask) if mask.any() else None

    def local_batch(self, rng: np.random.Generator, size: int, scale_augmentation: bool = True) -> dict:
        samples = _draw(rng, len(self.objects), size, self.sample,
                        lambda: f"Found fewer than {size} usable objects in {self.root} in {100 * size} attempts "
                                f"({self.skipped} unreadable so far; boxes under 100 px are passed over).")
        targets, valid, object_pixels, object_masks, prompts = [], [], [], [], []
        for crop, mask in samples:
            target, region, phrase = scale_augment(crop, self.resolution, self.latent_factor, rng, scale_augmentation)
            pixels, object_mask = object_view_for_clip(crop, mask, self.clip_size, rng)
            targets.append(target)
            valid.append(region)
            object_pixels.append(pixels)
            object_masks.append(object_mask)
            prompts.append(with_scale_phrase(IMAGENET_TEMPLATES[rng.integers(len(IMAGENET_TEMPLATES))].format("S"), phrase))
        return {"pixel_values": torch.stack(targets), "valid_mask": torch.stack(valid),
                **local_batch_views(samples, self.clip_size),
                "object_pixels": torch.stack(object_pixels), "object_mask": torch.stack(object_masks),
                "prompts": prompts}

    def validation_concepts(self) -> list[tuple[Image.Image, np.ndarray]]:
        found = (self.sample(i) for i in range(min(len(self.objects), 32)))
        return [s for s in found if s is not None][:4]
