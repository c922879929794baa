"""OVDiff's per-class prototype cache: support sets and prototypes on disk, keyed by what produced them.

Layout (one folder per class and support-set setting, so classes are shared by every vocabulary and run):

    CACHE/<class slug>_<name hash>/<support hash>/
        support.json                     manifest: support settings, prompt, thresholds, counts, timings
        support.safetensors              attribution [N, a, a] f32, fg / bg masks as packed bits [N, ⌈H·W/8⌉] u8
        images/000.png ...               the support images (only with keep_images)
        <extractor>-<hash>.safetensors   fg_mean [1, D], fg_inst [n, D], fg_parts [K, D], bg_* alike (f32,
                                         unnormalised)
        <extractor>-<hash>.json          manifest: extractor settings (incl. the support hash), counts, timings

Every file is written to a temporary name and renamed; a manifest is written after the files it lists, so a
killed build leaves a class either complete or visibly incomplete, and a rerun redoes only the latter.
"""
from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ovss.banks.storage import Manifest, atomic_save_safetensors, load_safetensors, settings_hash
from ovss.io import atomic_write, sanitize_name

#: version of the layout above; part of every key, so a format change never reads old files
PROTOTYPE_FORMAT = 1

_PROTO_KEYS = ("fg_mean", "fg_inst", "fg_parts", "bg_mean", "bg_inst", "bg_parts")


@dataclass
class ClassPrototypes:
    """Unnormalised prototypes of one class for one extractor (rows are D-dim vectors; any may be empty)."""

    fg_mean: torch.Tensor
    fg_inst: torch.Tensor
    fg_parts: torch.Tensor
    bg_mean: torch.Tensor
    bg_inst: torch.Tensor
    bg_parts: torch.Tensor

    @property
    def dim(self) -> int:
        return int(self.fg_mean.shape[-1])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in _PROTO_KEYS}

    @classmethod
    def from_tensors(cls, t: Mapping[str, torch.Tensor]) -> "ClassPrototypes":
        missing = [k for k in _PROTO_KEYS if k not in t]
        if missing:
            raise ValueError(f"prototype file lacks {missing}")
        return cls(**{k: t[k].float() for k in _PROTO_KEYS})


@dataclass
class SupportSet:
    """What sampling one class produced: attribution maps, fg/bg masks and (optionally) the images.

    attribution: (N, a, a) DAAM maps before normalisation; fg / bg: (N, H, W) bool at the image size;
    images: (N, 3, H, W) float in [0, 1], or None when not kept.
    """

    attribution: torch.Tensor
    fg: torch.Tensor
    bg: torch.Tensor
    images: torch.Tensor | None = None


def _pack(masks: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(masks.reshape(masks.shape[0], -1).cpu().numpy().astype(bool), axis=1))


def _unpack(bits: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    n = bits.shape[0]
    flat = np.unpackbits(bits.numpy(), axis=1, count=hw[0] * hw[1]) if n else np.zeros((0, hw[0] * hw[1]), np.uint8)
    return torch.from_numpy(flat.astype(bool)).reshape(n, *hw)


class PrototypeCache:
    """Per-class support sets and prototypes under `root` (see the module docstring for the layout).

    `support_settings` is everything that changes the support set (prompt, models, sampler, seed, N, mask
    source, ...); `extractor_settings` everything that changes one extractor's prototypes given the support
    set. Both are JSON-able dicts hashed with `settings_hash`.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser()

    # -- paths -------------------------------------------------------------------------------------------
    @staticmethod
    def class_slug(name: str) -> str:
        """A file-safe folder name that still tells classes apart when sanitising maps two names together."""
        digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:8]
        return f"{sanitize_name(name)[:60]}_{digest}"

    def support_dir(self, name: str, support_settings: Mapping[str, Any]) -> Path:
        return self.root / self.class_slug(name) / self.support_key(support_settings)

    @staticmethod
    def support_key(support_settings: Mapping[str, Any]) -> str:
        return settings_hash({"format": PROTOTYPE_FORMAT, **support_settings})

    @staticmethod
    def _extractor_full(support_settings: Mapping[str, Any], extractor: str,
                        extractor_settings: Mapping[str, Any]) -> dict[str, Any]:
        return {"format": PROTOTYPE_FORMAT, "extractor": extractor,
                "support": PrototypeCache.support_key(support_settings), **extractor_settings}

    def _extractor_paths(self, name: str, support_settings: Mapping[str, Any], extractor: str,
                         extractor_settings: Mapping[str, Any]) -> tuple[Path, Path, dict[str, Any]]:
        full = self._extractor_full(support_settings, extractor, extractor_settings)
        stem = f"{sanitize_name(extractor)}-{settings_hash(full)}"
        folder = self.support_dir(name, support_settings)
        return folder / f"{stem}.safetensors", folder / f"{stem}.json", full

    # -- prototypes --------------------------------------------------------------------------------------
    def has_prototypes(self, name: str, support_settings: Mapping[str, Any], extractor: str,
                       extractor_settings: Mapping[str, Any]) -> bool:
        _, manifest, full = self._extractor_paths(name, support_settings, extractor, extractor_settings)
        return Manifest.load_if_complete(manifest, full) is not None

    def load_prototypes(self, name: str, support_settings: Mapping[str, Any], extractor: str,
                        extractor_settings: Mapping[str, Any], device: str | torch.device = "cpu"
                        ) -> ClassPrototypes | None:
        """The class's prototypes for this extractor, or None when they were not (completely) built."""
        path, manifest, full = self._extractor_paths(name, support_settings, extractor, extractor_settings)
        if Manifest.load_if_complete(manifest, full) is None:
            return None
        tensors, _ = load_safetensors(path, device=str(device))
        return ClassPrototypes.from_tensors(tensors)

    def save_prototypes(self, name: str, support_settings: Mapping[str, Any], extractor: str,
                        extractor_settings: Mapping[str, Any], protos: ClassPrototypes,
                        data: Mapping[str, Any] | None = None) -> Path:
        path, manifest_path, full = self._extractor_paths(name, support_settings, extractor, extractor_settings)
        atomic_save_safetensors(path, protos.tensors(), {"class": name, "extractor": extractor})
        manifest = Manifest(full, data={"class": name, **{k: int(v.shape[0]) for k, v in protos.tensors().items()},
                                        **(data or {})})
        manifest.add_file(path, path.parent)
        return manifest.write(manifest_path)

    # -- support sets ------------------------------------------------------------------------------------
    def load_support(self, name: str, support_settings: Mapping[str, Any]) -> tuple[SupportSet, dict] | None:
        """(support set, manifest data) when complete, else None. Images are present only if they were kept."""
        folder = self.support_dir(name, support_settings)
        full = {"format": PROTOTYPE_FORMAT, **support_settings}
        manifest = Manifest.load_if_complete(folder / "support.json", full)
        if manifest is None:
            return None
        tensors, meta = load_safetensors(folder / "support.safetensors")
        hw = (int(meta["height"]), int(meta["width"]))
        images = None
        names = sorted(f for f in manifest.files if f.startswith("images/"))
        if names:
            images = torch.stack([torch.from_numpy(np.asarray(Image.open(folder / f).convert("RGB"), dtype=np.float32)
                                                   / 255.0).permute(2, 0, 1) for f in names])
        support = SupportSet(tensors["attribution"], _unpack(tensors["fg"], hw), _unpack(tensors["bg"], hw), images)
        return support, manifest.data

    def save_support(self, name: str, support_settings: Mapping[str, Any], support: SupportSet, *,
                     keep_images: bool = False, data: Mapping[str, Any] | None = None) -> Path:
        folder = self.support_dir(name, support_settings)
        folder.mkdir(parents=True, exist_ok=True)
        hw = tuple(support.fg.shape[-2:])
        path = atomic_save_safetensors(
            folder / "support.safetensors",
            {"attribution": support.attribution.float(), "fg": _pack(support.fg), "bg": _pack(support.bg)},
            {"class": name, "height": str(hw[0]), "width": str(hw[1])})
        manifest = Manifest({"format": PROTOTYPE_FORMAT, **support_settings},
                            data={"class": name, "n_images": int(support.fg.shape[0]), **(data or {})})
        manifest.add_file(path, folder)
        if keep_images and support.images is not None:
            (folder / "images").mkdir(exist_ok=True)
            for i, im in enumerate(support.images):
                png = folder / "images" / f"{i:03d}.png"
                arr = (im.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(arr, "RGB").save(buf, format="PNG")
                atomic_write(png, lambda f, b=buf.getvalue(): f.write(b))
                manifest.add_file(png, folder)
        return manifest.write(folder / "support.json")


def shard_classes(classes: list[str], shard: tuple[int, int] | None) -> list[str]:
    """The classes shard i of n builds: every n-th class starting at i (0-based), in vocabulary order."""
    if shard is None:
        return list(classes)
    i, n = shard
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard {i}/{n}: need 0 <= i < n")
    return list(classes[i::n])

