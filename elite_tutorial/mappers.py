"""ELITE's mapping networks, and the CLIP image features they read.

ELITE reads CLIP ViT-L/14 (24 layers) at five depths, in this order: the final hidden state, then the
outputs of layers 4, 8, 12 and 16 (`hidden_states[k]`, where `hidden_states[0]` is the patch
embedding). Deep features say *what* the object is; shallow ones keep *how it looks*.

For a vision tower with another depth (the toy and tiny presets) the four intermediate layers are
taken at the same relative depths, k * num_layers / 24, rounded: 6 layers -> 1, 2, 3, 4.

`GlobalMapper` turns the five levels into five word embeddings (w0 primary, w1..w4 auxiliary) and
carries the trainable copies of every cross-attention layer's `to_k`/`to_v` that ELITE uses for the
text context. `LocalMapper` turns the same levels of the object image into one token per patch, read
by ELITE's local attention branch through its own k/v copies. Both load the authors' released
checkpoints (`global_mapper.pt`, `local_mapper.pt`: `from_official`) and save/load as safetensors
with their config (`save_pretrained` / `from_pretrained`).
"""
from __future__ import annotations

import json
import math
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionModel

from .arguments import path_argument
from .data import GLOBAL_VIEWS
from .storage import SafetensorsHubMixin, atomic_directory

# What a saved mapper folder holds: an existing folder with anything else is never replaced by a save.
MAPPER_FILES = ("config.json", "model.safetensors", "README.md", "log.json")

ELITE_LAYERS_OF_24 = (4, 8, 12, 16)
NUM_LEVELS = 1 + len(ELITE_LAYERS_OF_24)


def feature_layer_indices(num_layers: int) -> tuple[int, ...]:
    """The `hidden_states` indices ELITE reads below the last layer, for a tower of `num_layers`."""
    if num_layers < len(ELITE_LAYERS_OF_24):
        raise ValueError(f"A vision tower needs at least {len(ELITE_LAYERS_OF_24)} layers for ELITE's levels; this one has {num_layers}.")
    indices = tuple(max(1, round(k * num_layers / 24)) for k in ELITE_LAYERS_OF_24)
    if len(set(indices)) != len(indices):
        raise ValueError(f"{num_layers} layers give repeated feature levels {indices}.")
    return indices


def clip_feature_levels(image_encoder: CLIPVisionModel, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """The five feature levels, `[last_hidden_state, hidden_states[4], [8], [12], [16]]` for ViT-L/14.

    pixel_values: (batch, 3, S, S), CLIP-normalised (224 px for ViT-L/14).
    Returns 5 tensors (batch, 1 + patches, vision_width): the class token first, then the patch
    tokens in raster order (257 x 1024 for ViT-L/14).
    """
    output = image_encoder(pixel_values.to(image_encoder.device, image_encoder.dtype), output_hidden_states=True)
    layers = feature_layer_indices(image_encoder.config.num_hidden_layers)
    return [output.last_hidden_state] + [output.hidden_states[k] for k in layers]


# --------------------------------------------------------------------------------------------------
# The global mapping network.

def level_mlp(in_width: int, hidden_width: int, out_width: int) -> nn.Sequential:
    """The authors' per-level MLP: Linear-LayerNorm-LeakyReLU twice, then Linear (indices 0..6)."""
    return nn.Sequential(
        nn.Linear(in_width, hidden_width), nn.LayerNorm(hidden_width), nn.LeakyReLU(),
        nn.Linear(hidden_width, hidden_width), nn.LayerNorm(hidden_width), nn.LeakyReLU(),
        nn.Linear(hidden_width, out_width),
    )


def attention_layer_key(layer: str) -> str:
    """The authors' name for a cross-attention layer: its module path with '.' -> '_'.

    Accepts a module path (`down_blocks.0.attentions.0.transformer_blocks.0.attn2`) or a processor
    name (the same + `.processor`).
    """
    return layer.removesuffix(".processor").replace(".", "_")


def cross_attention_modules(unet) -> dict[str, nn.Module]:
    """Every cross-attention (`attn2`) module of a UNet, by module path, in UNet order."""
    return {name: module for name, module in unet.named_modules() if name.endswith("attn2")}


MODEL_CARD = """
---
{{{{ card_data }}}}
---

An ELITE {branch} mapping network ({what}), saved by
`elite_tutorial.mappers.{cls}.save_pretrained`.

Load it with `{cls}.from_pretrained(<folder or repo>)` and use it with
`elite_tutorial.pipeline.ELITEPipeline` on the components it was trained for (`config.json` gives the
widths and layers). Paper: {{{{ paper_url }}}}. `log.json`, when present, holds the training command,
recipe and losses.
"""


class _LevelMapper(nn.Module):
    """What ELITE's two mapping networks share: one pair of MLPs per CLIP feature level (`mapping[i]`
    for the class token, `mapping_patch[i]` for the patch tokens), and trainable copies of every
    cross-attention layer's `to_k`/`to_v`, named after the branch (`to_k_global` / `to_k_local`).

    The copies are bias-free Linear(context_width -> inner_width), keyed by `attention_layer_key(layer)`;
    `attention_layers` maps those keys to [context_width, inner_width] (it is part of the saved config).
    Subclasses set `branch` and define `forward`.
    """

    branch: str
    _file_hint = " For the authors' `.pt` checkpoints use from_official."
    _required_config = {"vision_width": int, "text_width": int, "hidden_width": int, "num_levels": int,
                        "attention_layers": dict}

    def __init__(
        self,
        vision_width: int = 1024,
        text_width: int = 768,
        hidden_width: int = 1024,
        num_levels: int = NUM_LEVELS,
        attention_layers: dict[str, list[int]] | None = None,
    ):
        super().__init__()
        self.vision_width, self.text_width, self.hidden_width = vision_width, text_width, hidden_width
        self.num_levels = num_levels
        self.attention_layers = {key: list(dims) for key, dims in (attention_layers or {}).items()}
        self.mapping = nn.ModuleList(level_mlp(vision_width, hidden_width, text_width) for _ in range(num_levels))
        self.mapping_patch = nn.ModuleList(level_mlp(vision_width, hidden_width, text_width) for _ in range(num_levels))
        for which in ("k", "v"):
            setattr(self, f"to_{which}_{self.branch}",
                    nn.ModuleDict({k: nn.Linear(i, o, bias=False) for k, (i, o) in self.attention_layers.items()}))

    def _levels(self, features: Sequence[torch.Tensor]):
        if len(features) != self.num_levels:
            raise ValueError(f"Expected {self.num_levels} feature levels, got {len(features)}.")
        return zip(self.mapping, self.mapping_patch, features)

    # -- building ------------------------------------------------------------------------------------

    @classmethod
    def from_components(cls, components, hidden_width: int | None = None, **options):
        """A fresh mapper sized for `components`, its k/v copies initialised from the UNet's own.

        `hidden_width` defaults to the vision width (1024 for sd14, as the authors); `options` go to
        the class (`GlobalMapper`'s `input_view`).
        """
        vision_width = components.image_encoder.config.hidden_size
        layers = cross_attention_modules(components.unet)
        mapper = cls(
            vision_width=vision_width,
            text_width=components.text_encoder.config.hidden_size,
            hidden_width=hidden_width or vision_width,
            attention_layers={attention_layer_key(n): [m.to_k.in_features, m.to_k.out_features] for n, m in layers.items()},
            **options,
        )
        with torch.no_grad():
            for name, module in layers.items():
                to_k, to_v = mapper.key_value(name)
                to_k.weight.copy_(module.to_k.weight)
                to_v.weight.copy_(module.to_v.weight)
        return mapper.to(components.device)

    def check_compatible(self, components) -> None:
        """Raise a ValueError saying what differs if this mapper was made for other components."""
        expected = {
            "vision width": components.image_encoder.config.hidden_size,
            "text width": components.text_encoder.config.hidden_size,
            "cross-attention layers": {attention_layer_key(n): [m.to_k.in_features, m.to_k.out_features]
                                       for n, m in cross_attention_modules(components.unet).items()},
        }
        found = {"vision width": self.vision_width, "text width": self.text_width,
                 "cross-attention layers": self.attention_layers}
        problems = []
        for what in ("vision width", "text width"):
            if expected[what] != found[what]:
                problems.append(f"{what}: the components have {expected[what]}, the mapper {found[what]}")
        if expected["cross-attention layers"] != found["cross-attention layers"]:
            e, f = expected["cross-attention layers"], found["cross-attention layers"]
            problems.append(f"cross-attention layers: the UNet has {len(e)} ({_describe_layers(e)}), "
                            f"the mapper has k/v copies for {len(f)} ({_describe_layers(f)})")
        if problems:
            raise ValueError("This mapper was made for other components (another preset?): "
                             + "; ".join(problems) + ". Load the mapper trained for these components.")

    def key_value(self, layer: str) -> tuple[nn.Linear, nn.Linear]:
        """The (to_k, to_v) copies of one cross-attention layer (module path or processor name)."""
        key = attention_layer_key(layer)
        return getattr(self, f"to_k_{self.branch}")[key], getattr(self, f"to_v_{self.branch}")[key]

    def key_value_drift(self, unet) -> torch.Tensor:
        """How far the k/v copies sit from `unet`'s own `to_k`/`to_v`: sum over every copy of
        ||W_copy - W_unet||^2, divided by the sum of ||W_unet||^2 (0 for fresh copies; a scalar that
        carries gradients to the copies, and none to the UNet)."""
        moved = size = 0
        for name, module in cross_attention_modules(unet).items():
            for copy, own in zip(self.key_value(name), (module.to_k, module.to_v)):
                own_weight = own.weight.detach().to(copy.weight.dtype)
                moved = moved + (copy.weight - own_weight).square().sum()
                size = size + own_weight.square().sum()
        return moved / size

    @classmethod
    def _check_weights(cls, state: Mapping[str, torch.Tensor], source: str) -> None:
        """Refuse another branch's weights and non-finite ones, naming `source` (a file or "the state dict")."""
        other = next((b for b in ("global", "local") if b != cls.branch and any(k.startswith(f"to_k_{b}.") for k in state)), None)
        if other is not None:
            raise ValueError(f"{source} holds a {other} mapper; load it with {other.capitalize()}Mapper, not {cls.__name__}.")
        broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if broken:
            raise ValueError(f"{source} holds NaN or infinite weights ({', '.join(broken[:3])}"
                             + (f" and {len(broken) - 3} more" if len(broken) > 3 else "")
                             + "): the file is corrupted, or training diverged. Use another copy or checkpoint.")

    # -- saving --------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, log: dict | None = None, **kwargs):
        """`PyTorchModelHubMixin.save_pretrained` (config.json + model.safetensors), written atomically;
        `log` (the training log) is written as log.json in the same step."""
        if kwargs.get("push_to_hub"):
            return super().save_pretrained(save_directory, **kwargs)
        with atomic_directory(save_directory, own=MAPPER_FILES) as staging:
            super().save_pretrained(staging, **kwargs)
            if log is not None:
                (staging / "log.json").write_text(json.dumps(log))
        return None

    # -- the authors' checkpoint format ----------------------------------------------------------------

    @classmethod
    def from_official(cls, checkpoint: str | os.PathLike | Mapping[str, torch.Tensor], components=None):
        """Load the authors' `{global,local}_mapper.pt` (a path, or its state dict already loaded).

        Sizes come from the checkpoint; with `components`, they are checked against them.
        The file is read with `torch.load(weights_only=True)`: plain tensors only.
        """
        if isinstance(checkpoint, Mapping):
            state, source = dict(checkpoint), "the state dict"
        else:
            state, source = read_official_checkpoint(checkpoint), str(checkpoint)
            _check_official_name(Path(checkpoint), cls)
        ours, config = official_to_ours(state, cls)
        cls._check_weights(ours, source)
        mapper = cls(**config)
        mapper.load_state_dict(ours)
        if components is not None:
            mapper.check_compatible(components)
            mapper.to(components.device)
        return mapper

    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """This mapper's weights under the authors' key names (what their code loads)."""
        state = {}
        for i in range(self.num_levels):
            for name, mlp in (("mapping", self.mapping[i]), ("mapping_patch", self.mapping_patch[i])):
                state.update({f"{name}_{i}.{k}": v for k, v in mlp.state_dict().items()})
        for key in self.attention_layers:
            to_k, to_v = self.key_value(key)
            state[f"{key}_to_k.weight"], state[f"{key}_to_v.weight"] = to_k.weight, to_v.weight
        return {k: v.detach().clone() for k, v in state.items()}


class GlobalMapper(_LevelMapper, SafetensorsHubMixin, paper_url="https://arxiv.org/abs/2302.13848",
                   tags=["elite", "text-to-image", "personalization"],
                   model_card_template=MODEL_CARD.format(branch="global", cls="GlobalMapper",
                                                         what="CLIP image features -> 5 word embeddings, plus k/v copies "
                                                              "of every cross-attention layer")):
    """CLIP feature levels -> word embeddings, plus ELITE's k/v copies of every `attn2` layer.

    For level i, word i = `mapping[i]`(class token) + mean over patches of `mapping_patch[i]`(patch
    tokens). sd14: vision 1024 -> hidden 1024 -> text 768, 5 levels, 16 cross-attention layers.
    The copies (`to_k_global`, `to_v_global`) read all text context (see `attention`).
    """

    branch = "global"
    _optional_config = {"input_view": str}  # saves made before it existed read the whole image

    def __init__(self, vision_width: int = 1024, text_width: int = 768, hidden_width: int = 1024,
                 num_levels: int = NUM_LEVELS, attention_layers: dict[str, list[int]] | None = None,
                 input_view: str = "image"):
        """`input_view` (saved in the config): what the mapper was trained to read of a concept image,
        "image" (the whole image, as the authors' mapper), "object" (`data.object_crop`: the object
        alone, cut out by its mask) or "box" (`data.box_crop`: the padded box around the object, the
        authors' training view); `ELITEPipeline.encode` shows it that view."""
        super().__init__(vision_width, text_width, hidden_width, num_levels, attention_layers)
        if input_view not in GLOBAL_VIEWS:
            raise ValueError(f"input_view must be one of {GLOBAL_VIEWS}, not {input_view!r}.")
        self.input_view = input_view

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """features: `num_levels` tensors (batch, 1 + patches, vision_width) in the order of
        `clip_feature_levels` ([last, 4, 8, 12, 16] for ViT-L/14).
        Returns the words (batch, num_levels, text_width): w0 first."""
        words = [cls_mlp(level[:, :1]) + patch_mlp(level[:, 1:]).mean(dim=1, keepdim=True)
                 for cls_mlp, patch_mlp, level in self._levels(features)]
        return torch.cat(words, dim=1)


class LocalMapper(_LevelMapper, SafetensorsHubMixin, paper_url="https://arxiv.org/abs/2302.13848",
                  tags=["elite", "text-to-image", "personalization"],
                  model_card_template=MODEL_CARD.format(branch="local", cls="LocalMapper",
                                                        what="CLIP patch features of the object -> one token per patch, "
                                                             "plus k/v copies of every cross-attention layer")):
    """CLIP feature levels of the object image -> one local token per patch, plus the k/v copies
    (`to_k_local`, `to_v_local`) of ELITE's local attention branch.

    For level i, token p = `mapping[i]`(class token) + `mapping_patch[i]`(patch token p): the class
    token's mapping is broadcast to every patch. The tokens are then averaged over the levels.
    sd14: 256 patches x 768. The tokens come back unmasked: `mask_local_tokens` zeroes the background.
    """

    branch = "local"

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """features: as `GlobalMapper.forward`. Returns (batch, patches, text_width)."""
        per_level = [cls_mlp(level[:, :1]) + patch_mlp(level[:, 1:]) for cls_mlp, patch_mlp, level in self._levels(features)]
        return torch.stack(per_level).mean(dim=0)


def mask_local_tokens(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero the local tokens of background patches, as the authors do.

    tokens: (batch, patches, width) from `LocalMapper`, patches a square grid (16 x 16 for ViT-L/14).
    mask: (batch, 1, H, W) or (batch, H, W), 1 = object, at any resolution; it is resized to the
    patch grid by nearest neighbour (the authors' `F.interpolate(mask, (16, 16), mode="nearest")`).
    Masked tokens become zero vectors that stay in the local softmax: with the bias-free k/v copies
    their key is 0, which the released local mapper was trained with.
    """
    side = math.isqrt(tokens.shape[1])
    if side * side != tokens.shape[1]:
        raise ValueError(f"{tokens.shape[1]} local tokens do not form a square patch grid.")
    if mask.dim() == 3:
        mask = mask[:, None]
    grid = F.interpolate(mask.to(tokens.dtype), size=(side, side), mode="nearest")[:, 0]
    return tokens * grid.reshape(len(grid), -1, 1)


def _describe_layers(layers: dict[str, list[int]]) -> str:
    widths = sorted({tuple(dims) for dims in layers.values()})
    return "context -> inner widths " + ", ".join(f"{i}->{o}" for i, o in widths) if widths else "none"


def _check_official_name(path: Path, mapper_class) -> None:
    """Refuse the other branch's file by its name: the authors' `global_mapper.pt` and `local_mapper.pt`
    share one key layout, so only the name tells them apart."""
    other = "local" if mapper_class.branch == "global" else "global"
    if re.search(rf"(^|[^a-z]){other}([^a-z]|$)", path.stem.lower()):
        raise ValueError(f"{path} is named as the authors' {other} mapper; load it with "
                         f"{other.capitalize()}Mapper.from_official (if it really is a {mapper_class.branch} "
                         "mapper, rename the file).")


def read_official_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A `.pt` state dict of plain tensors, with clear errors for anything else."""
    path = path_argument(path, "checkpoint", "the authors' .pt checkpoint")
    saved_here = "a mapper saved by save_pretrained (config.json + model.safetensors) loads with from_pretrained(<its folder>)"
    if path.is_dir():
        raise ValueError(f"{path} is a folder; from_official reads the authors' `.pt` file, and {saved_here}.")
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint file at {path}.")
    if path.suffix == ".safetensors":
        raise ValueError(f"{path} is a safetensors file, not the authors' `.pt` checkpoint: {saved_here}.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL (\S+)", str(error))
        if found is None:  # not a pickle at all
            raise ValueError(f"{path} is not a readable PyTorch checkpoint (truncated, or not a checkpoint).") from None
        raise ValueError(
            f"{path} contains Python objects other than tensors ({found[1]}), so it is not loaded: only plain "
            "tensor checkpoints are, because unpickling arbitrary objects can run code."
        ) from None
    except Exception as error:  # noqa: BLE001 (bytes that are no pickle fail in many ways: KeyError, IndexError, ...)
        raise ValueError(f"{path} is not a readable PyTorch checkpoint (truncated, or not a checkpoint): "
                         f"{type(error).__name__}: {error}") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict of tensors (found {type(state).__name__}).")
    return dict(state)


_OFFICIAL_MLP = re.compile(r"^(mapping|mapping_patch)_(\d+)\.(\d+\.(?:weight|bias))$")
_OFFICIAL_KV = re.compile(r"^(.+)_to_([kv])\.weight$")


def official_to_ours(state: Mapping[str, torch.Tensor], mapper_class=GlobalMapper) -> tuple[dict[str, torch.Tensor], dict]:
    """Rename the authors' mapper keys to ours and read the sizes off the tensors.

    Both of their checkpoints use one scheme: `mapping_{i}.{j}.*` -> `mapping.{i}.{j}.*`;
    `<layer>_to_k.weight` -> `to_k_<branch>.<layer>.weight` (branch: global or local).
    Returns (our state dict, config of `mapper_class`).
    """
    kind = f"{mapper_class.branch}-mapper checkpoint"
    ours, attention_layers, unknown = {}, {}, []
    for key, tensor in state.items():
        if m := _OFFICIAL_MLP.match(key):
            ours[f"{m[1]}.{m[2]}.{m[3]}"] = tensor
        elif m := _OFFICIAL_KV.match(key):
            if tensor.dim() != 2:
                raise ValueError(f"{key} should be a 2-d weight, found shape {tuple(tensor.shape)}.")
            ours[f"to_{m[2]}_{mapper_class.branch}.{m[1]}.weight"] = tensor
            attention_layers.setdefault(m[1], [tensor.shape[1], tensor.shape[0]])
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"Not a {kind}: unexpected keys {unknown[:5]}"
                         + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "") + ".")
    if "mapping.0.0.weight" not in ours or "mapping.0.6.weight" not in ours:
        raise ValueError(f"Not a {kind}: no `mapping_0.0.weight` / `mapping_0.6.weight`.")
    levels = 1 + max(int(k.split(".")[1]) for k in ours if k.startswith("mapping."))
    hidden_width, vision_width = ours["mapping.0.0.weight"].shape
    config = dict(vision_width=vision_width, text_width=ours["mapping.0.6.weight"].shape[0],
                  hidden_width=hidden_width, num_levels=levels, attention_layers=attention_layers)
    expected = mapper_class(**config).state_dict()
    missing = sorted(set(expected) - set(ours))
    if missing:
        raise ValueError(f"Incomplete {kind}: missing {missing[:5]}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else "") + ".")
    wrong = [f"{k}: expected {tuple(expected[k].shape)}, found {tuple(ours[k].shape)}"
             for k in expected if expected[k].shape != ours[k].shape]
    if wrong:
        raise ValueError(f"Inconsistent {kind}: " + "; ".join(wrong[:5]) + ".")
    return ours, config
