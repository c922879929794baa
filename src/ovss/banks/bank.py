"""FreeDA's collection of (textual key, visual prototype) pairs on disk: shards while building, one bank after.

Layout (docs/methods/freeda.md has the full description):

    BUILD/shard-00000-of-00002/manifest.json      one per shard: settings, caption range, finished count, chunks
    BUILD/shard-00000-of-00002/chunk-000000.safetensors
    BANK/manifest.json                            the merged bank: settings, row count, parts with sha256
    BANK/part-00000.safetensors                   prototypes (n, Dv) f32, keys (n, Dt) f32, caption_index (n,)
                                                  i64, mask_area (n,) f32; metadata "rows": JSON
                                                  {"nouns": [...], "caption_ids": [...]}
    BANK/index.faiss, BANK/index.json             written by ovss.banks.index

The unit of work is one caption. A shard owns a contiguous range of the caption list, aligned to the
builder's batch size, and appends chunks in caption order; every chunk file is written atomically before
the manifest that lists it, so a killed build resumes at the first caption no manifest records as finished.
Merging concatenates shards in caption order and re-cuts the rows into parts of a fixed size, so the merged
bank (files and manifest) does not depend on how many shards or workers built it.
"""
from __future__ import annotations

import hashlib
import json
import math
import struct
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ovss.banks.storage import Manifest, atomic_save_safetensors, load_safetensors, settings_hash

MANIFEST_NAME = "manifest.json"
#: Rows per chunk of a shard (spec §7: "fixed-size chunks, e.g. 4,096 entries"): what a crash can lose.
DEFAULT_CHUNK_ROWS = 4096
#: Rows per part of a merged bank (≈ 448 MB of ViT-L prototypes + keys per part).
DEFAULT_PART_ROWS = 65536

_TENSORS = ("prototypes", "keys", "caption_index", "mask_area")
ROWS_KEY = "rows"  # safetensors metadata key: JSON {"nouns": [...], "caption_ids": [...]}
_NP_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32, "F64": np.float64}


class BankError(RuntimeError):
    """A bank or shard that cannot be used as asked (other settings, incomplete, torn, overlapping)."""


@dataclass
class Entries:
    """A block of bank rows in memory, in bank order."""

    prototypes: torch.Tensor  # (n, Dv) float32, unnormalised (spec §3 step 6)
    keys: torch.Tensor  # (n, Dt) float32, unit norm
    caption_index: torch.Tensor  # (n,) int64: position of the source caption in the caption list (-1: unknown)
    mask_area: torch.Tensor  # (n,) float32: fraction of the generated image inside the weak mask
    nouns: list[str]
    caption_ids: list[str]

    def __post_init__(self) -> None:
        n = self.prototypes.shape[0]
        if not (self.keys.shape[0] == self.caption_index.shape[0] == self.mask_area.shape[0] == len(self.nouns)
                == len(self.caption_ids) == n):
            raise ValueError("Entries: every field needs one row per entry")

    def __len__(self) -> int:
        return int(self.prototypes.shape[0])

    @classmethod
    def empty(cls, proto_dim: int, key_dim: int) -> "Entries":
        return cls(torch.zeros(0, proto_dim), torch.zeros(0, key_dim), torch.zeros(0, dtype=torch.int64),
                   torch.zeros(0), [], [])

    @classmethod
    def concat(cls, blocks: Sequence["Entries"]) -> "Entries":
        if not blocks:
            raise ValueError("Entries.concat needs at least one block")
        return cls(torch.cat([b.prototypes for b in blocks]), torch.cat([b.keys for b in blocks]),
                   torch.cat([b.caption_index for b in blocks]), torch.cat([b.mask_area for b in blocks]),
                   [n for b in blocks for n in b.nouns], [c for b in blocks for c in b.caption_ids])

    def slice(self, start: int, end: int) -> "Entries":
        return Entries(self.prototypes[start:end], self.keys[start:end], self.caption_index[start:end],
                       self.mask_area[start:end], self.nouns[start:end], self.caption_ids[start:end])

    def save(self, path: Path) -> str:
        """Atomic safetensors write; returns the file's sha256."""
        tensors = {"prototypes": self.prototypes.float(), "keys": self.keys.float(),
                   "caption_index": self.caption_index.long(), "mask_area": self.mask_area.float()}
        # One metadata key: safetensors writes its metadata map in hash order, which varies between processes.
        meta = {ROWS_KEY: json.dumps({"nouns": self.nouns, "caption_ids": self.caption_ids})}
        atomic_save_safetensors(path, tensors, meta)
        return file_sha256(path)

    @classmethod
    def load(cls, path: Path) -> "Entries":
        tensors, meta = load_safetensors(path)
        missing = [k for k in _TENSORS if k not in tensors]
        if missing or ROWS_KEY not in meta:
            raise BankError(f"{path}: not a bank chunk (missing {missing or 'metadata'})")
        rows = json.loads(meta[ROWS_KEY])
        return cls(tensors["prototypes"], tensors["keys"], tensors["caption_index"], tensors["mask_area"],
                   rows["nouns"], rows["caption_ids"])


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- shards ---------------------------------------------------------------------------------------------


def shard_range(n_captions: int, shard: int, n_shards: int, align: int = 1) -> tuple[int, int]:
    """[start, end) of the captions of shard `shard` of `n_shards`: contiguous, starting on a multiple of
    `align` (the builder's batch size, so that every split sees the same batches), as even as possible."""
    blocks = math.ceil(n_captions / align)
    start = min(shard * blocks // n_shards * align, n_captions)
    end = min((shard + 1) * blocks // n_shards * align, n_captions)
    return start, end


def shard_dir(build_dir: str | Path, shard: int, n_shards: int) -> Path:
    return Path(build_dir) / f"shard-{shard:05d}-of-{n_shards:05d}"


class ShardWriter:
    """Appends one shard's entries in caption order, chunk by chunk, and records progress; resumable.

    `add(entries, n_captions)` buffers the entries of the next `n_captions` captions (possibly none, when a
    caption had no usable noun); a chunk is written once `chunk_rows` rows are buffered. Progress only moves
    when a chunk and then the manifest are on disk.
    """

    def __init__(self, root: str | Path, settings: dict[str, Any], shard: tuple[int, int],
                 captions: tuple[int, int], chunk_rows: int = DEFAULT_CHUNK_ROWS) -> None:
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self.root = Path(root)
        self.settings = settings
        self.shard = tuple(shard)
        self.captions = tuple(captions)
        self.chunk_rows = chunk_rows
        self.manifest = Manifest(settings, data={"kind": "shard", "shard": list(shard), "captions": list(captions),
                                                 "done": 0, "rows": 0, "complete": False, "chunks": [],
                                                 "seconds": 0.0})
        path = self.root / MANIFEST_NAME
        if path.exists():
            old = Manifest.read(path)
            if old.settings_hash != settings_hash(settings):
                raise BankError(f"{self.root} holds a shard built with other settings (hash {old.settings_hash}, "
                                f"now {settings_hash(settings)}); use another build folder or delete it")
            if old.data.get("shard") != list(shard) or old.data.get("captions") != list(captions):
                raise BankError(f"{self.root} holds shard {old.data.get('shard')} over captions "
                                f"{old.data.get('captions')}, not {list(shard)} over {list(captions)}")
            _check_files(self.root, old)
            self.manifest = old
        self._buffer: list[Entries] = []
        self._buffered_rows = 0
        self._pending = 0

    @property
    def done(self) -> int:
        """Captions of this shard already on disk (from its start)."""
        return int(self.manifest.data["done"])

    @property
    def next_caption(self) -> int:
        """Global index of the first caption not yet on disk."""
        return self.captions[0] + self.done + self._pending

    @property
    def complete(self) -> bool:
        return bool(self.manifest.data["complete"])

    def add(self, entries: Entries, n_captions: int, seconds: float = 0.0) -> None:
        if self.next_caption + n_captions > self.captions[1]:
            raise BankError(f"shard {self.shard}: {n_captions} more captions overrun its range {self.captions}")
        if len(entries):
            self._buffer.append(entries)
            self._buffered_rows += len(entries)
        self._pending += n_captions
        self.manifest.data["seconds"] = float(self.manifest.data["seconds"]) + seconds
        if self._buffered_rows >= self.chunk_rows:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as one chunk (if any) and record the buffered captions as finished."""
        if self._pending == 0:
            return
        data = self.manifest.data
        if self._buffered_rows:
            block = Entries.concat(self._buffer)
            name = f"chunk-{len(data['chunks']):06d}.safetensors"
            sha = block.save(self.root / name)
            self.manifest.add_file(self.root / name, self.root)
            start = self.captions[0] + self.done
            data["chunks"].append({"file": name, "rows": len(block), "sha256": sha,
                                   "captions": [start, start + self._pending]})
            data["rows"] = int(data["rows"]) + len(block)
            data["dims"] = [int(block.prototypes.shape[1]), int(block.keys.shape[1])]
        data["done"] = self.done + self._pending
        self._buffer, self._buffered_rows, self._pending = [], 0, 0
        self.manifest.write(self.root / MANIFEST_NAME)

    def finish(self) -> None:
        """Flush and mark the shard complete (all its captions are on disk)."""
        self.flush()
        if self.captions[0] + self.done != self.captions[1]:
            raise BankError(f"shard {self.shard}: finished at caption {self.captions[0] + self.done}, "
                            f"its range ends at {self.captions[1]}")
        self.manifest.data["complete"] = True
        self.manifest.write(self.root / MANIFEST_NAME)


def _check_files(root: Path, manifest: Manifest) -> None:
    for name, size in manifest.files.items():
        f = root / name
        if not f.is_file() or f.stat().st_size != size:
            raise BankError(f"{f} is missing or has the wrong size: the folder was changed after it was written")


def read_shard(root: str | Path) -> Manifest:
    root = Path(root)
    try:
        m = Manifest.read(root / MANIFEST_NAME)
    except FileNotFoundError:
        raise BankError(f"{root}: no {MANIFEST_NAME}; not a shard folder") from None
    if m.data.get("kind") != "shard":
        raise BankError(f"{root}: not a shard folder (kind {m.data.get('kind')!r})")
    return m


def find_shards(paths: Sequence[str | Path]) -> list[Path]:
    """Shard folders among `paths` (a path may be a shard folder or a folder of shard folders)."""
    out = []
    for p in map(Path, paths):
        if (p / MANIFEST_NAME).is_file():
            out.append(p)
        else:
            found = sorted(d for d in p.glob("shard-*") if (d / MANIFEST_NAME).is_file())
            if not found:
                raise BankError(f"{p}: neither a shard folder nor a folder holding shard-* folders")
            out += found
    return out


# -- merged bank ----------------------------------------------------------------------------------------


def merge_shards(shards: Sequence[str | Path], out_dir: str | Path, part_rows: int = DEFAULT_PART_ROWS) -> Path:
    """Concatenate complete shards in caption order into the bank at `out_dir`; returns its folder.

    Refuses shards with different settings hashes, incomplete shards, and ranges that overlap or leave gaps.
    The bank's manifest is removed first and written last, so an interrupted merge leaves no bank.
    """
    if part_rows < 1:
        raise ValueError(f"part_rows must be >= 1, got {part_rows}")
    folders = find_shards(shards)
    manifests = [read_shard(f) for f in folders]
    hashes = {m.settings_hash for m in manifests}
    if len(hashes) != 1:
        raise BankError(f"shards were built with different settings (hashes {sorted(hashes)}): refusing to merge")
    for folder, m in zip(folders, manifests):
        if not m.data.get("complete"):
            raise BankError(f"{folder}: shard not complete ({m.data.get('done')} of "
                            f"{m.data['captions'][1] - m.data['captions'][0]} captions); finish its build first")
        _check_files(folder, m)
    order = sorted(range(len(folders)), key=lambda i: manifests[i].data["captions"][0])
    total = int(manifests[0].settings.get("captions", {}).get("count", -1))
    pos = 0
    for i in order:
        start, end = manifests[i].data["captions"]
        if start != pos:
            what = "overlap" if start < pos else "a gap"
            raise BankError(f"shard ranges have {what} at caption {min(start, pos)} ({folders[i]})")
        pos = end
    if total >= 0 and pos != total:
        raise BankError(f"the shards cover captions [0, {pos}) of {total}: some shards are missing")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    writer = _PartWriter(out, part_rows)
    for i in order:
        for chunk in manifests[i].data["chunks"]:
            writer.add(Entries.load(folders[i] / chunk["file"]))
    return writer.finish(manifests[0].settings, {"built_seconds": sum(float(m.data.get("seconds", 0.0))
                                                                      for m in manifests)})


class _PartWriter:
    """Re-cuts a stream of Entries into fixed-size parts; writes the bank manifest last."""

    def __init__(self, out: Path, part_rows: int) -> None:
        self.out, self.part_rows = out, part_rows
        self.parts: list[dict[str, Any]] = []
        self.files: dict[str, int] = {}
        self.nouns: Counter[str] = Counter()
        self.dims: list[int] | None = None
        self._buffer: list[Entries] = []
        self._rows = 0

    def add(self, entries: Entries) -> None:
        if not len(entries):
            return
        dims = [int(entries.prototypes.shape[1]), int(entries.keys.shape[1])]
        if self.dims is not None and dims != self.dims:
            raise BankError(f"rows of dims {dims} after rows of dims {self.dims}")
        self.dims = dims
        self._buffer.append(entries)
        self._rows += len(entries)
        while self._rows >= self.part_rows:
            block = Entries.concat(self._buffer)
            self._write(block.slice(0, self.part_rows))
            rest = block.slice(self.part_rows, len(block))
            self._buffer, self._rows = ([rest] if len(rest) else []), len(rest)

    def _write(self, block: Entries) -> None:
        name = f"part-{len(self.parts):05d}.safetensors"
        sha = block.save(self.out / name)
        self.files[name] = (self.out / name).stat().st_size
        self.parts.append({"file": name, "rows": len(block), "sha256": sha})
        self.nouns.update(block.nouns)

    def finish(self, settings: dict[str, Any], extra: dict[str, Any]) -> Path:
        if self._rows:
            self._write(Entries.concat(self._buffer))
        for stale in self.out.glob("part-*.safetensors"):
            if stale.name not in self.files:
                stale.unlink()
        rows = sum(p["rows"] for p in self.parts)
        data = {"kind": "bank", "rows": rows, "dims": {"prototype": self.dims[0] if self.dims else 0,
                                                        "key": self.dims[1] if self.dims else 0},
                "parts": self.parts, "noun_counts": dict(sorted(self.nouns.items())), **extra}
        Manifest(settings, self.files, data).write(self.out / MANIFEST_NAME)
        return self.out


def write_bank(entries_stream: Iterator[Entries], out_dir: str | Path, settings: dict[str, Any],
               part_rows: int = DEFAULT_PART_ROWS, extra: dict[str, Any] | None = None) -> Path:
    """Write a bank directly from a stream of Entries (the converter's path; builds go through shards)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    writer = _PartWriter(out, part_rows)
    for block in entries_stream:
        writer.add(block)
    return writer.finish(settings, extra or {})


def _memmap_tensors(path: Path) -> dict[str, np.ndarray]:
    """Read-only numpy memory maps of every tensor of a safetensors file (its documented layout: u64 header
    length, JSON header with dtype/shape/data_offsets, then the raw little-endian data)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = np.dtype(_NP_DTYPES[info["dtype"]]).newbyteorder("<")
        shape = tuple(info["shape"])
        out[name] = (np.memmap(path, dtype=dtype, mode="r", offset=8 + n + start, shape=shape) if end > start
                     else np.zeros(shape, dtype=dtype))
    return out


class Bank:
    """A merged bank, read lazily: keys and prototypes are memory-mapped, never loaded whole.

    Row i of the bank is row i of the index built from it (ovss.banks.index).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        try:
            self.manifest = Manifest.read(self.root / MANIFEST_NAME)
        except FileNotFoundError:
            raise BankError(f"{self.root}: no bank here ({MANIFEST_NAME} missing; build one with `ovss bank build` "
                            "or convert the authors' release with `ovss bank convert`)") from None
        if self.manifest.data.get("kind") != "bank":
            raise BankError(f"{self.root}: {MANIFEST_NAME} describes a {self.manifest.data.get('kind')!r}, not a "
                            "merged bank (run `ovss bank merge`)")
        _check_files(self.root, self.manifest)
        self.parts: list[dict[str, Any]] = list(self.manifest.data["parts"])
        self.offsets = np.cumsum([0] + [int(p["rows"]) for p in self.parts])
        self._maps: dict[int, dict[str, np.ndarray]] = {}
        self._meta: dict[int, dict[str, list[str]]] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def settings(self) -> dict[str, Any]:
        return self.manifest.settings

    @property
    def settings_hash(self) -> str:
        return self.manifest.settings_hash

    @property
    def models(self) -> dict[str, str]:
        """role -> model source the bank was built with ("clip" embeds keys, "dinov2" the prototypes)."""
        return dict(self.settings.get("models", {}))

    @property
    def proto_dim(self) -> int:
        return int(self.manifest.data["dims"]["prototype"])

    @property
    def key_dim(self) -> int:
        return int(self.manifest.data["dims"]["key"])

    @property
    def noun_counts(self) -> dict[str, int]:
        return dict(self.manifest.data.get("noun_counts", {}))

    @property
    def fingerprint(self) -> str:
        """Hash of the parts' checksums: changes whenever any row changes (an index records it)."""
        return hashlib.sha256("".join(p["sha256"] for p in self.parts).encode()).hexdigest()[:16]

    def part(self, i: int) -> dict[str, np.ndarray]:
        if i not in self._maps:
            self._maps[i] = _memmap_tensors(self.root / self.parts[i]["file"])
        return self._maps[i]

    def key_blocks(self) -> Iterator[np.ndarray]:
        """The keys part by part, (rows, Dt) float32 memory maps, in row order."""
        for i in range(len(self.parts)):
            yield self.part(i)["keys"]

    def keys(self) -> np.ndarray:
        """All keys in memory (N, Dt); for small banks and brute-force checks."""
        return (np.concatenate([np.asarray(k) for k in self.key_blocks()]) if self.parts
                else np.zeros((0, self.key_dim), np.float32))

    def _gather(self, name: str, ids: np.ndarray, width: int | None) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).ravel()
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(f"bank row ids must lie in [0, {len(self)}); got {ids.min()}..{ids.max()}")
        shape = (ids.size,) if width is None else (ids.size, width)
        out = np.empty(shape, dtype=np.float32 if name != "caption_index" else np.int64)
        which = np.searchsorted(self.offsets, ids, side="right") - 1
        for p in np.unique(which):
            sel = which == p
            out[sel] = self.part(int(p))[name][ids[sel] - self.offsets[p]]
        return out

    def prototypes(self, ids: np.ndarray) -> np.ndarray:
        """Prototype rows (len(ids), Dv) float32, read through the memory maps."""
        return self._gather("prototypes", ids, self.proto_dim)

    def key_rows(self, ids: np.ndarray) -> np.ndarray:
        return self._gather("keys", ids, self.key_dim)

    def metadata(self, i: int) -> dict[str, list[str]]:
        """Part i's per-row nouns and caption ids."""
        if i not in self._meta:
            _, meta = load_safetensors_metadata(self.root / self.parts[i]["file"])
            self._meta[i] = json.loads(meta[ROWS_KEY])
        return self._meta[i]

    def nouns(self, ids: np.ndarray) -> list[str]:
        ids = np.asarray(ids, dtype=np.int64).ravel()
        which = np.searchsorted(self.offsets, ids, side="right") - 1
        return [self.metadata(int(p))["nouns"][int(i - self.offsets[p])] for i, p in zip(ids, which)]

    def entries(self) -> Entries:
        """The whole bank in memory (tests, small banks)."""
        blocks = [Entries.load(self.root / p["file"]) for p in self.parts]
        return Entries.concat(blocks) if blocks else Entries.empty(self.proto_dim, self.key_dim)

    def verify(self) -> None:
        """Recompute every part's sha256 against the manifest (reads the whole bank)."""
        for p in self.parts:
            if file_sha256(self.root / p["file"]) != p["sha256"]:
                raise BankError(f"{self.root / p['file']}: checksum mismatch; the bank is corrupt")


def load_safetensors_metadata(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """(header without metadata, metadata) of a safetensors file, without reading its tensors."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    meta = header.pop("__metadata__", {}) or {}
    return header, meta
