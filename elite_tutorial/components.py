"""The six frozen pieces of Stable Diffusion + CLIP that ELITE builds on, and where they come from.

`load_components(preset_or_path)` returns a `Components` for one of the presets below or for a local
folder in diffusers layout. Every real checkpoint, downloaded sd14 included, is loaded by the same
function, `load_components_from_folders`, from folders on disk:

| preset        | what                                                                  | download? |
|---------------|-----------------------------------------------------------------------|-----------|
| `toy`         | the miniature Stable Diffusion pretrained by this project (`assets/`) | never     |
| `sd14`        | `CompVis/stable-diffusion-v1-4` + `openai/clip-vit-large-patch14`     | yes, once |
| `tiny-random` | seeded random tiny models (`tests/tiny-random`, unit tests)           | never     |
| a folder path | what `Components.save_pretrained` writes (diffusers layout + `image_encoder/`) | never |

`sd14_architecture()` builds the full-size sd14 UNet and CLIP ViT-L/14 towers with random weights
for shape and memory checks, without any download.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
)

from .arguments import path_argument
from .storage import atomic_directory

PRESET_ENV_VAR = "ELITE_PRESET"
DEFAULT_PRESET = "toy"
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"

SD14_REPO = "CompVis/stable-diffusion-v1-4"
CLIP_L_REPO = "openai/clip-vit-large-patch14"


class PresetUnavailableError(RuntimeError):
    """A preset's weights are not on this machine and cannot be fetched (offline, or not built)."""


@dataclass
class Components:
    """The frozen models ELITE works with. All share one device and dtype.

    - `tokenizer`: `CLIPTokenizer`, prompts -> (batch, 77) token ids.
    - `text_encoder`: `CLIPTextModel`, ids -> (batch, 77, text_width) prompt embeddings
      (768 for sd14).
    - `image_encoder`: `CLIPVisionModel`, (batch, 3, S, S) CLIP-normalised pixels -> hidden states
      (batch, 1 + patches, vision_width) per layer (224 px, 257 tokens, 1024 wide for ViT-L/14).
    - `vae`: `AutoencoderKL`, (batch, 3, H, W) in [-1, 1] <-> latents (batch, 4, H/f, W/f).
    - `unet`: `UNet2DConditionModel`, noisy latents + timestep + prompt embeddings -> noise.
    - `scheduler`: a diffusers scheduler (its config is what training and sampling share).
    """

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    image_encoder: CLIPVisionModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    scheduler: object

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def models(self) -> dict[str, torch.nn.Module]:
        """The four `nn.Module`s by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.nn.Module)}

    def to(self, device=None, dtype=None) -> Components:
        for model in self.models().values():
            model.to(device=device)
            if dtype is not None and model.dtype != dtype:
                model.to(dtype=dtype)
        return self

    def text_to_image_pipeline(self):
        """A plain diffusers `StableDiffusionPipeline` sharing these (frozen) models."""
        # imported here: importing diffusers' pipelines pulls in transformers' image processors
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=self.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write every component to `folder/<name>/` (safetensors), atomically, with diffusers'
        `model_index.json`.

        The result loads with `load_components(folder)`, and as a text-to-image pipeline with
        `StableDiffusionPipeline.from_pretrained(folder)` (which leaves `image_encoder/` aside); a crash
        midway leaves no partial folder.
        """
        with atomic_directory(folder, overwrite=False) as staging:
            for f in fields(self):
                getattr(self, f.name).save_pretrained(staging / f.name)
            self.text_to_image_pipeline().save_config(staging)  # model_index.json
        return folder


def default_device_and_dtype(device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    """CUDA + fp16 when a GPU is present, else CPU + fp32; explicit arguments win.

    `dtype` may be a torch dtype or its name ("float16", "bfloat16", "float32"; "fp16", "bf16",
    "fp32"). A device this machine lacks is refused here, not deep inside PyTorch.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = _available_device(device)
    dtype = _as_dtype(dtype)
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    return device, dtype


_DTYPE_NAMES = {"fp16": torch.float16, "half": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
                "float": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                "float64": torch.float64}


def _as_dtype(dtype) -> torch.dtype | None:
    """A torch dtype from a dtype or its name (a string left as it is gives models of mixed dtypes)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype.removeprefix("torch.")]
    raise ValueError(f"dtype must be a torch dtype (e.g. torch.float16) or one of the names "
                     f"{', '.join(map(repr, _DTYPE_NAMES))}; not {dtype!r}.")


def _available_device(device) -> torch.device:
    """`device` as a torch.device, if this machine has it."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{device!r} is not a device name ({error}); use 'cpu', 'cuda' or 'cuda:<index>'.") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device={str(device)!r}, but PyTorch finds no CUDA GPU on this machine "
                             "(none, no driver, or a CPU-only PyTorch); use device='cpu', or leave it out.")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device={str(device)!r}, but this machine has {count} CUDA GPU(s): cuda:0..cuda:{count - 1}.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device='mps', but Apple's MPS backend is not available here; use device='cpu'.")
    return device


# --------------------------------------------------------------------------------------------------
# Loading from folders: the one code path for every real checkpoint.

COMPONENT_NAMES = tuple(f.name for f in fields(Components))


def load_components_from_folders(folders: dict[str, Path], device=None, dtype=None) -> Components:
    """Load each component from its own folder (a `save_pretrained` folder, or a Hub snapshot).

    `folders` maps every name in `COMPONENT_NAMES` to a directory. A folder may hold a whole
    `CLIPModel` (as the CLIP-L repository does): the text and vision towers load from its parts.
    """
    device, dtype = default_device_and_dtype(device, dtype)
    missing = [name for name in COMPONENT_NAMES if not Path(folders[name]).is_dir()]
    if missing:
        raise FileNotFoundError(
            "Missing component folder(s): "
            + ", ".join(f"{name} (expected {folders[name]})" for name in missing)
            + ". A components folder holds what `Components.save_pretrained` writes: "
            + ", ".join(f"{n}/" for n in COMPONENT_NAMES)
            + "."
        )
    # Any scheduler class reads `scheduler_config.json`; `_class_name` says which one to build.
    scheduler_config = PNDMScheduler.load_config(folders["scheduler"])
    scheduler_class = getattr(diffusers, scheduler_config["_class_name"])
    components = Components(
        tokenizer=CLIPTokenizer.from_pretrained(folders["tokenizer"]),
        text_encoder=CLIPTextModel.from_pretrained(folders["text_encoder"], dtype=dtype),
        image_encoder=CLIPVisionModel.from_pretrained(folders["image_encoder"], dtype=dtype),
        vae=AutoencoderKL.from_pretrained(folders["vae"], torch_dtype=dtype),
        unet=UNet2DConditionModel.from_pretrained(folders["unet"], torch_dtype=dtype),
        scheduler=scheduler_class.from_config(scheduler_config),
    )
    return _frozen(components.to(device))


def _frozen(components: Components) -> Components:
    for model in components.models().values():
        model.requires_grad_(False).eval()
    return components


def load_components_folder(folder: str | os.PathLike, device=None, dtype=None) -> Components:
    """Load what `Components.save_pretrained(folder)` wrote."""
    folder = Path(folder)
    return load_components_from_folders({name: folder / name for name in COMPONENT_NAMES}, device, dtype)


# --------------------------------------------------------------------------------------------------
# Presets.

def _sd14_snapshots() -> tuple[Path, Path]:
    """Local snapshot folders of the two sd14 repositories (from the Hub cache, else downloaded)."""
    from huggingface_hub import snapshot_download

    wanted = {
        SD14_REPO: ["model_index.json", "scheduler/*.json", "unet/config.json",
                    "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                    "vae/diffusion_pytorch_model.safetensors"],
        CLIP_L_REPO: ["config.json", "model.safetensors", "*.txt", "tokenizer*.json", "vocab.json",
                      "special_tokens_map.json"],
    }
    folders = []
    for repo, patterns in wanted.items():
        try:
            folders.append(Path(snapshot_download(repo, allow_patterns=patterns)))
        except Exception as error:  # offline, no network, no access: all end the same way for a user
            raise PresetUnavailableError(
                f"The 'sd14' preset needs the Hugging Face repositories {SD14_REPO} (vae, unet, "
                f"scheduler) and {CLIP_L_REPO} (tokenizer, text and vision encoders), and {repo} "
                f"is neither in the local Hub cache nor downloadable here ({type(error).__name__}). "
                f"On a machine with internet access run `hf download {SD14_REPO}` and "
                f"`hf download {CLIP_L_REPO}` (accept the model licence on the Hub first; set "
                f"HF_HOME to share the cache), or save both into one folder with "
                f"`Components.save_pretrained` and pass that folder instead of 'sd14'. "
                f"Offline presets that need nothing: 'toy', 'tiny-random'."
            ) from error
    return folders[0], folders[1]


def _load_sd14(device=None, dtype=None) -> Components:
    sd, clip = _sd14_snapshots()
    folders = {"unet": sd / "unet", "vae": sd / "vae", "scheduler": sd / "scheduler",
               "tokenizer": clip, "text_encoder": clip, "image_encoder": clip}
    return load_components_from_folders(folders, device, dtype)


TOY_FOLDER = ASSETS_DIR / "toy-sd"


def _load_shipped_folder(preset: str, folder: Path, in_git: str, rebuild: str, device=None, dtype=None) -> Components:
    """A preset whose weights ship with the repository in `folder` (`in_git`, relative to the repository's
    root); `rebuild` says how to write them again."""
    if not folder.is_dir():
        raise PresetUnavailableError(
            f"The {preset!r} preset's weights are not at {folder}. They ship with the repository; restore "
            f"the folder from git (`git checkout -- {in_git}`), or {rebuild}."
        )
    return load_components_folder(folder, device, dtype)


def _load_toy(device=None, dtype=None) -> Components:
    return _load_shipped_folder("toy", TOY_FOLDER, "assets/toy-sd", "rebuild it with the toy pretraining command described in the "
                                "README", device, dtype)


TINY_RANDOM_FOLDER = ASSETS_DIR.parent / "tests" / "tiny-random"  # beside the tests it serves; assets/ keeps the toy world


def _load_tiny_random(device=None, dtype=None) -> Components:
    """Seeded random miniature models in the same classes and roles as sd14 (unit tests only).

    Sizes: text width 32; vision width 32 with 6 layers (feature levels, see `mappers`), 32 px
    images in 4 px patches (64 patches); VAE 32 px <-> 4x16x16 latents; UNet 2 levels.
    """
    return _load_shipped_folder("tiny-random", TINY_RANDOM_FOLDER, "tests/tiny-random", "write it again with `python -m "
                                "elite_tutorial.toyworld.models tiny-random --out tests/tiny-random`", device, dtype)


PRESETS: dict[str, Callable[..., Components]] = {
    "toy": _load_toy,
    "sd14": _load_sd14,
    "tiny-random": _load_tiny_random,
}


def preset_from_env() -> str:
    """The preset the notebooks use: `$ELITE_PRESET`, default `toy`."""
    return os.environ.get(PRESET_ENV_VAR, DEFAULT_PRESET)


def load_components(preset_or_path: str | os.PathLike | None = None, device=None, dtype=None) -> Components:
    """Load a preset by name (see the module docstring) or a components folder by path.

    `None` means `$ELITE_PRESET` (default `toy`). Default device/dtype: CUDA + fp16 when available,
    else CPU + fp32. Models come back frozen (`requires_grad_(False)`) and in eval mode.
    """
    if preset_or_path is None:
        preset_or_path = preset_from_env()
    device, dtype = default_device_and_dtype(device, dtype)  # a bad device or dtype fails before any download
    if isinstance(preset_or_path, str) and preset_or_path in PRESETS:
        return PRESETS[preset_or_path](device=device, dtype=dtype)
    if path_argument(preset_or_path, "preset_or_path", f"a components folder, or a preset ({', '.join(PRESETS)})").is_dir():
        return load_components_folder(preset_or_path, device, dtype)
    raise ValueError(
        f"Unknown preset or folder {str(preset_or_path)!r}. Valid presets: {', '.join(PRESETS)}; "
        "or pass the path of a folder written by `Components.save_pretrained`."
    )


# --------------------------------------------------------------------------------------------------
# Full-size architecture with random weights (no download).

SD14_SCHEDULER_CONFIG = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
)
SD14_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
CLIP_L_TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
    bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
)
CLIP_L_VISION_CONFIG = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
)


@dataclass
class SD14Architecture:
    """Full-size sd14 models with random weights: UNet (860 M), CLIP-L text (123 M), vision (303 M)."""

    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    image_encoder: CLIPVisionModel

    @property
    def device(self) -> torch.device:
        """Where the models are (so mappers can be sized with `from_components(architecture)`)."""
        return self.unet.device


def sd14_architecture(seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu") -> SD14Architecture:
    """Build the sd14 UNet and CLIP ViT-L/14 towers from their configs, randomly initialised."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        models = SD14Architecture(
            unet=UNet2DConditionModel(**SD14_UNET_CONFIG),
            text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT_CONFIG)),
            image_encoder=CLIPVisionModel(CLIPVisionConfig(**CLIP_L_VISION_CONFIG)),
        )
    for model in (models.unet, models.text_encoder, models.image_encoder):
        model.to(device=device)
        if model.dtype != dtype:
            model.to(dtype=dtype)
        model.requires_grad_(False).eval()
    return models
