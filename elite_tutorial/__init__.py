"""elite-tutorial: ELITE (Wei et al., ICCV 2023) rebuilt step by step on diffusers and transformers."""
from .components import (
    Components,
    PresetUnavailableError,
    load_components,
    preset_from_env,
    sd14_architecture,
)
from .words import encode_prompts_with_words

__all__ = [
    "Components",
    "PresetUnavailableError",
    "encode_prompts_with_words",
    "load_components",
    "preset_from_env",
    "sd14_architecture",
]
