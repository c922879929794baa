"""On-disk building blocks shared by every feature cache: atomic safetensors, a JSON manifest, settings hashes.

A cache entry is "done" when its manifest exists, its settings hash matches what the caller would build
now, and every file it lists has the recorded size. Files are written to a temporary name and renamed,
so a process killed mid-write leaves either the old file, the new file, or a stray `.tmp` — never a torn
file under the real name. The manifest is always written last: a crash before it means "not done".
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

from ovss.io import atomic_write, write_json

#: manifest "format" field; bump `MANIFEST_VERSION` when the layout of `data` changes incompatibly
MANIFEST_FORMAT = "ovss-cache-manifest"
MANIFEST_VERSION = 1


def settings_hash(settings: Mapping[str, Any]) -> str:
    """Stable 16-hex-digit SHA-256 of `settings` as canonical JSON (sorted keys; tuples == lists).

    Floats are written by `json` with repr precision, so 8.0 and 8 differ: callers pass typed configs.
    """
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=_canonical)
    return hashlib.sha256(text.encode("ascii")).hexdigest()[:16]


def _canonical(o: Any) -> Any:
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    if isinstance(o, torch.dtype):
        return str(o)
    raise TypeError(f"settings_hash: value of type {type(o).__name__} is not hashable as JSON")


def atomic_save_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                            metadata: Mapping[str, str] | None = None) -> Path:
    """Write `tensors` (moved to CPU, made contiguous) to `path` through a temporary file and a rename.

    The file is fsynced before the rename so that a power cut cannot leave a renamed but empty file. It is
    serialised in memory and written by `atomic_write`, not by safetensors' `save_file`, which renames its
    own temporary file into place with owner-only permissions (a bank built for a lab would be unreadable
    to the rest of it); here the umask decides, as for every other file ovss writes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    data = save(flat, metadata=None if metadata is None else {str(k): str(v) for k, v in metadata.items()})
    return atomic_write(path, lambda f: f.write(data), durable=True)


def load_safetensors(path: str | os.PathLike, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file: (tensors, metadata). Raises FileNotFoundError / ValueError with the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such safetensors file")
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as err:  # safetensors raises its own error types for torn or foreign files
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None


@dataclass
class Manifest:
    """The JSON record that marks a cache entry complete.

    settings: everything that changes the entry (hashed into `settings_hash`); files: names relative to the
    manifest's folder with their byte sizes; data: free-form results (counts, timings, ...).
    """

    settings: dict[str, Any]
    files: dict[str, int] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def settings_hash(self) -> str:
        return settings_hash(self.settings)

    def add_file(self, path: str | os.PathLike, root: str | os.PathLike) -> None:
        """Record `path` (already written) relative to `root` with its current size."""
        path = Path(path)
        self.files[path.relative_to(root).as_posix()] = path.stat().st_size

    def write(self, path: str | os.PathLike) -> Path:
        """Atomic JSON write; call it after every file it lists is on disk."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_json(path, {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION,
                                 "settings_hash": self.settings_hash, "settings": self.settings,
                                 "files": self.files, "data": self.data})

    @classmethod
    def read(cls, path: str | os.PathLike) -> "Manifest":
        """Parse a manifest; FileNotFoundError if absent, ValueError if it is not one of ours."""
        path = Path(path)
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: unreadable manifest ({err})") from None
        if not isinstance(obj, dict) or obj.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"{path}: not an ovss cache manifest")
        if obj.get("version") != MANIFEST_VERSION:
            raise ValueError(f"{path}: manifest version {obj.get('version')}, this ovss reads {MANIFEST_VERSION}")
        return cls(settings=obj.get("settings", {}), files=obj.get("files", {}), data=obj.get("data", {}))

    @classmethod
    def load_if_complete(cls, path: str | os.PathLike, settings: Mapping[str, Any]) -> "Manifest | None":
        """The manifest at `path` if it was written for `settings` and all its files are intact, else None."""
        path = Path(path)
        try:
            m = cls.read(path)
        except (FileNotFoundError, ValueError):
            return None
        if m.settings_hash != settings_hash(settings):
            return None
        root = path.parent
        for name, size in m.files.items():
            f = root / name
            if not f.is_file() or f.stat().st_size != size:
                return None
        return m


def parse_shard(text: str) -> tuple[int, int]:
    """`--shard i/n` (0-based i) -> (i, n): which slice of a vocabulary or caption list this machine builds."""
    try:
        i, n = (int(p) for p in text.split("/"))
    except ValueError:
        raise ValueError(f"shard {text!r}: use i/n, e.g. 0/4 (0-based)") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard {text!r}: need 0 <= i < n")
    return i, n
