"""Writing to disk so that a crash never leaves a half-written file or folder behind, in safetensors."""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from huggingface_hub import PyTorchModelHubMixin
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .arguments import path_argument


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


def foreign_entries(folder: Path, own: Collection[str]) -> list[str]:
    """The names in an existing `folder` that are not in `own` (sorted; none where it does not exist)."""
    return sorted(p.name for p in folder.iterdir() if p.name not in own) if folder.is_dir() else []


def refuse_foreign(folder: Path, foreign: list[str], what: str = "this save") -> None:
    """Raise, naming the folder and what in it is not `what`'s own, if `foreign` is not empty."""
    if foreign:
        shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
        raise FileExistsError(f"{folder} holds files that {what} did not write ({shown}); replacing the folder would "
                              "delete them. Choose a new or empty folder, or move them away first.")


def _prepare_parent(folder: Path) -> None:
    """Make `folder`'s parent, or say what is wrong with it in terms of `folder` (not of a hidden staging path)."""
    blocking = next((p for p in folder.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise NotADirectoryError(f"Cannot save to {folder}: {blocking} is a file, not a folder.")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PermissionError(f"Cannot save to {folder}: its folder {folder.parent} cannot be created "
                              f"({error.strerror}).") from None
    if not os.access(folder.parent, os.W_OK | os.X_OK):
        raise PermissionError(f"Cannot save to {folder}: its folder {folder.parent} is not writable.")


@contextmanager
def atomic_directory(folder: str | os.PathLike, overwrite: bool = True,
                     own: Collection[str] | None = None) -> Iterator[Path]:
    """Yield an empty staging folder next to `folder`; on success it becomes `folder`.

    If the body raises, the staging folder is deleted and `folder` is untouched. With `overwrite`,
    an existing `folder` is replaced, and is never missing meanwhile, but only where it holds nothing
    but the saver's own files: the names in `own` (checked before the body runs, so no work is lost
    to a refusal) and those the body writes. A folder that holds anything else (a user's notes, other
    runs) is refused, naming what is in it. Without `overwrite`, an existing `folder` is an error.
    Staging folders that killed writes left behind are cleaned up first. The current folder (`.`) and
    those above it are refused: a save replaces its folder, and a process cannot work in a replaced one.
    """
    folder = Path(os.path.abspath(os.path.expanduser(folder)))
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} is a file; give a folder to save into.")
    if folder == Path.cwd() or folder in Path.cwd().parents:
        raise ValueError(f"Cannot save into {folder}: it is the current folder or holds it, and a save replaces its "
                         "folder as a whole. Name a subfolder, e.g. ./mapper.")
    _clean_leftovers(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} already exists; choose a new folder or remove it first.")
    if own is not None:
        refuse_foreign(folder, foreign_entries(folder, own))
    _prepare_parent(folder)
    staging = _scratch_folder(folder, "staging")
    try:
        yield staging
        refuse_foreign(folder, foreign_entries(folder, {*(own or ()), *(p.name for p in staging.iterdir())}))
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
    # config.json's fields: those the weights' shapes follow (required), and those older saves may lack
    _required_config: dict[str, type] = {}
    _optional_config: dict[str, type] = {}

    def _save_pretrained(self, save_directory: Path) -> None:
        """model.safetensors with a SHA-256 of its tensors in the metadata, checked on load."""
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(Path(save_directory) / "model.safetensors"),
                  metadata={"format": "pt", "sha256": tensors_digest(state)})

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """Load a saved folder, or a Hub repository (`owner/name`), as `PyTorchModelHubMixin` does.

        A local-looking path (`looks_local`) that is not a folder fails at once, instead of being
        tried on the Hub; so do a folder without a readable `config.json`.
        """
        folder = path_argument(pretrained_model_name_or_path, "pretrained_model_name_or_path",
                               f"a saved {cls.__name__} folder or a Hub repository")
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
        config = {k: v for k, v in kwargs.items() if k not in hub_only}
        cls._check_config_fields(config, Path(model_id) / "config.json")
        model = cls(**config)
        weights = Path(model_id) / "model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} is missing: a saved {cls.__name__} folder holds config.json and model.safetensors.")
        try:
            state = load_file(str(weights), device=str(map_location))
            with safe_open(str(weights), "pt") as f:
                saved_digest = (f.metadata() or {}).get("sha256")
        except Exception as error:  # safetensors' own error names no file
            raise ValueError(f"{weights} is not a readable safetensors file (truncated or corrupt: {error}); "
                             "save the model again, or download it again.") from None
        if saved_digest is not None and saved_digest != tensors_digest(state):  # files without one load as before
            raise ValueError(f"{weights} is damaged: its tensors do not match the checksum saved with them. "
                             "Use another copy, or save the model again.")
        cls._check_weights(state, str(weights))
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if differing := [k for k in expected if k in state and tuple(state[k].shape) != expected[k]]:
            k = differing[0]
            raise ValueError(f"{weights} does not match {Path(model_id) / 'config.json'}: {k} is {tuple(state[k].shape)} in "
                             f"the weights, {expected[k]} by the config ({len(differing)} tensors differ). The config "
                             "was edited or belongs to other weights; save the model again.")
        model.load_state_dict(state, strict=strict)
        return model

    @classmethod
    def _check_config_fields(cls, config: dict, path: Path) -> None:
        """Refuse, naming config.json and the field, a config that lacks a field the weights follow or
        has one of the wrong type. (Fields the class does not take never reach it: the Hub mixin drops them.)"""
        known = {**cls._required_config, **cls._optional_config}
        if missing := [name for name in cls._required_config if name not in config]:
            raise ValueError(f"{path} lacks {', '.join(missing)}: a saved {cls.__name__} config holds "
                             f"{', '.join(cls._required_config)}. Save the model again.")
        for name, value in config.items():
            kind = known.get(name)
            if kind is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
                raise ValueError(f"{path}: {name} must be {'a whole number' if kind is int else f'a {kind.__name__}'}, "
                                 f"not {value!r}.")


def tensors_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of tensors' names, dtypes, shapes and bytes, in name order (what a save's checksum covers)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        # reshape: a 0-d tensor (BatchNorm's step count) cannot be viewed as bytes; the bytes are the same
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


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
