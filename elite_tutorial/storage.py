"""Writing to disk so that a crash never leaves a half-written file or folder behind, in safetensors."""
from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from huggingface_hub import PyTorchModelHubMixin
from safetensors.torch import load_file, save_file


def _scratch_folder(folder: Path, kind: str) -> Path:
    """A new hidden folder next to `folder` for one write: `.<name>.<kind>-<pid>-<random>`.

    The writer's process id in the name tells a later write whether it was left behind by a crash.
    """
    return Path(tempfile.mkdtemp(prefix=f".{folder.name}.{kind}-{os.getpid()}-", dir=folder.parent))


def _running(pid: int) -> bool:
    """Whether a process with this id exists (so its scratch folders may still be in use)."""
    if pid == os.getpid() or os.name == "nt":  # on Windows os.kill would end the process: assume it runs
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _clean_leftovers(folder: Path) -> None:
    """Remove the scratch folders of earlier writes to `folder` whose process is gone (killed mid-write).

    If such a write was killed between the two renames of an overwrite, `folder` is missing and its
    previous copy sits in an `old` scratch folder: it is put back first.
    """
    if not folder.parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(folder.name)}\.(staging|old)-(\d+)-[a-z0-9_]+")
    found = [(m[1], path) for path in folder.parent.iterdir()
             if (m := pattern.fullmatch(path.name)) and not _running(int(m[2]))]
    for kind, path in sorted(found, key=lambda item: item[0] != "old"):  # restore before deleting
        if kind == "old" and not folder.exists() and (path / folder.name).is_dir():
            os.replace(path / folder.name, folder)
        shutil.rmtree(path, ignore_errors=True)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`).

    Returns False where the system or the filesystem cannot (then the caller renames twice).
    """
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # a C library older than glibc 2.28
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # not supported here
        return False
    raise OSError(error, os.strerror(error), str(a), None, str(b))


def _replace_folder(staging: Path, folder: Path) -> None:
    """Make `staging` the new `folder`; an existing `folder`'s old content ends up at `staging` or is deleted.

    `folder` never goes missing: where the system can, the two are swapped in one atomic step;
    elsewhere the old copy is moved aside first and put back if the second rename fails (if the
    process is killed between the two, the next write to `folder` puts it back).
    """
    if not folder.exists():
        os.replace(staging, folder)
        return
    if _exchange(staging, folder):
        return
    old = _scratch_folder(folder, "old")
    os.replace(folder, old / folder.name)
    try:
        os.replace(staging, folder)
    except BaseException:
        os.replace(old / folder.name, folder)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_directory(folder: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield an empty staging folder next to `folder`; on success it becomes `folder`.

    If the body raises, the staging folder is deleted and `folder` is untouched. With `overwrite`,
    an existing `folder` is replaced, and is never missing meanwhile; without it, an existing
    `folder` is an error. Staging folders that killed writes left behind are cleaned up first.
    """
    folder = Path(folder)
    _clean_leftovers(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} already exists; choose a new folder or remove it first.")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = _scratch_folder(folder, "staging")
    try:
        yield staging
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
        _replace_folder(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # after a swap: the old content


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


def looks_local(name: str | os.PathLike) -> bool:
    """Whether a model name is meant as a path on this machine rather than a Hub repository id.

    A Hub id is `name` or `owner/name`; anything else (an absolute or relative path such as
    `./x`, `~/x` or `runs/a/mapper`, a file name ending in `.pt`, `.json` or `.safetensors`, or
    `first/second` where `first` is a folder here) is a local path.
    """
    text = os.fspath(name)
    if text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1:
        return True
    if text.endswith((".pt", ".pth", ".bin", ".json", ".safetensors")):
        return True
    return "/" in text and Path(text.split("/")[0]).is_dir()


class SafetensorsHubMixin(PyTorchModelHubMixin):
    """`PyTorchModelHubMixin` (config.json + model.safetensors, Hub-shareable) that loads a local folder
    strictly (every weight present and expected; the Hub mixin's default is lenient) and quietly,
    and says which file is wrong when a local folder is not a saved model."""

    _file_hint = ""  # what to do instead when given a file, said after the error

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """Load a saved folder, or a Hub repository (`owner/name`), as `PyTorchModelHubMixin` does.

        A local-looking path (`looks_local`) that is not a folder fails at once, instead of being
        tried on the Hub; so do a folder without a readable `config.json`.
        """
        folder = Path(pretrained_model_name_or_path)
        if folder.is_dir():
            _check_config(folder, cls.__name__)
        elif folder.is_file():
            raise ValueError(f"{folder} is a file; {cls.__name__}.from_pretrained takes the folder that "
                             f"save_pretrained wrote (config.json + model.safetensors).{cls._file_hint}")
        elif looks_local(pretrained_model_name_or_path):
            raise FileNotFoundError(f"No folder at {os.fspath(pretrained_model_name_or_path)!r} ({folder.expanduser().absolute()}); "
                                    "check the path. A Hub repository is named `owner/name`.")
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def _check_weights(cls, state: dict[str, torch.Tensor], source: str) -> None:
        """Refuse weights this class cannot use, before they are loaded (subclasses add checks)."""

    @classmethod
    def _from_pretrained(cls, *, model_id: str, map_location: str = "cpu", strict: bool = True, **kwargs):
        if not os.path.isdir(model_id):
            return super()._from_pretrained(model_id=model_id, map_location=map_location, strict=strict, **kwargs)
        hub_only = ("revision", "cache_dir", "force_download", "local_files_only", "token")
        model = cls(**{k: v for k, v in kwargs.items() if k not in hub_only})
        weights = Path(model_id) / "model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} is missing: a saved {cls.__name__} folder holds config.json and model.safetensors.")
        try:
            state = load_file(str(weights), device=str(map_location))
        except Exception as error:  # safetensors' own error names no file
            raise ValueError(f"{weights} is not a readable safetensors file (truncated or corrupt: {error}); "
                             "save the model again, or download it again.") from None
        cls._check_weights(state, str(weights))
        model.load_state_dict(state, strict=strict)
        return model


def _check_config(folder: Path, what: str) -> None:
    """Raise, naming the file, if `folder` has no config.json or one that is not a JSON object."""
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config} is missing: a saved {what} folder holds config.json and model.safetensors "
                                "(what save_pretrained writes).")
    try:
        value = json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{config} is not valid JSON ({error}); restore it, or save the model again.") from None
    if not isinstance(value, dict):
        raise ValueError(f"{config} holds a JSON {type(value).__name__}, not the object of settings save_pretrained writes.")
