"""Writing to disk so that a crash never leaves a half-written file or folder behind, in safetensors."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from huggingface_hub import PyTorchModelHubMixin
from safetensors.torch import load_file, save_file


@contextmanager
def atomic_directory(folder: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield an empty staging folder next to `folder`; on success it becomes `folder`.

    If the body raises, the staging folder is deleted and `folder` is untouched. With `overwrite`,
    an existing `folder` is replaced (moved aside first, deleted after the swap); without it, an
    existing `folder` is an error.
    """
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} already exists; choose a new folder or remove it first.")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        yield staging
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
        old = None
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
            os.replace(folder, old / folder.name)
        os.replace(staging, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_json_atomic(path: str | os.PathLike, value) -> None:
    """`value` as indented JSON at `path`, written whole or not at all (a partial file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(partial, path)


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """`save_file` to a temporary name, then an atomic rename over `path`."""
    tmp = Path(path).with_suffix(".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """An optimizer's per-parameter state (AdamW moments, step) as flat tensors, `optim.<param>.<key>`."""
    return {f"optim.{pid}.{key}": (value if torch.is_tensor(value) else torch.tensor(value)).contiguous()
            for pid, state in optimizer.state_dict()["state"].items() for key, value in state.items()}


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of `optimizer_tensors` (the param groups, with their hyper-parameters, stay as built)."""
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


class SafetensorsHubMixin(PyTorchModelHubMixin):
    """`PyTorchModelHubMixin` (config.json + model.safetensors, Hub-shareable) that loads a local folder
    strictly (every weight present and expected; the Hub mixin's default is lenient) and quietly."""

    @classmethod
    def _from_pretrained(cls, *, model_id: str, map_location: str = "cpu", strict: bool = True, **kwargs):
        if not os.path.isdir(model_id):
            return super()._from_pretrained(model_id=model_id, map_location=map_location, strict=strict, **kwargs)
        hub_only = ("revision", "cache_dir", "force_download", "local_files_only", "token")
        model = cls(**{k: v for k, v in kwargs.items() if k not in hub_only})
        weights = Path(model_id) / "model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} is missing: a saved {cls.__name__} folder holds config.json and model.safetensors.")
        model.load_state_dict(load_file(str(weights), device=str(map_location)), strict=strict)
        return model
