"""Convert the authors' released FreeDA collection into an ovss bank.

The release (ViT-L only) is a faiss index `knn.index` over the textual keys plus one `.npy` file per visual
prototype (1-D, 1024 float32). Row i of the index is the i-th prototype file in lexicographically sorted
order of the file names (freeda.md §3, trap 8); keys come back with `reconstruct_n`. The converter keeps
that order and keeps non-finite prototypes, which occupy retrieval slots in the official run (trap 9), and
copies the index itself (HNSW or flat) so that retrieval is the authors' own. File stems are read as
`<gen_id>_<noun>` (the official intermediate naming) into the per-row caption id and noun.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ovss.banks.bank import DEFAULT_PART_ROWS, Bank, BankError, Entries, file_sha256, write_bank
from ovss.banks.index import INDEX_FILE, save_index
from ovss.models.presets import CLIP_L14, DINOV2_L

log = logging.getLogger(__name__)

RELEASE_INDEX = "knn.index"
_READ_ROWS = 16384


def release_files(prototypes_dir: str | Path) -> list[Path]:
    """The release's prototype files in index-row order (sorted file names)."""
    files = sorted(Path(prototypes_dir).glob("*.npy"), key=lambda p: p.name)
    if not files:
        raise BankError(f"{prototypes_dir}: no .npy prototype files")
    return files


def convert_release(release_index: str | Path, prototypes_dir: str | Path, out_dir: str | Path, *,
                    clip: str = CLIP_L14, dinov2: str = DINOV2_L, part_rows: int = DEFAULT_PART_ROWS) -> Bank:
    """Write the release as a bank at `out_dir` (parts + manifest + the release's index); returns it.

    clip / dinov2: the models that made the keys and prototypes (recorded; inference warns on a mismatch).
    """
    import faiss

    index_path = Path(release_index)
    if index_path.is_dir():
        index_path = index_path / RELEASE_INDEX
    index = faiss.read_index(str(index_path))
    files = release_files(prototypes_dir)
    if len(files) != index.ntotal:
        raise BankError(f"{index_path} holds {index.ntotal} keys but {prototypes_dir} has {len(files)} prototype "
                        "files: row i must be the i-th sorted file")
    settings = {"source": "freeda-release", "models": {"clip": clip, "dinov2": dinov2},
                "release_index_sha256": file_sha256(index_path), "rows": int(index.ntotal)}

    def stream() -> Iterator[Entries]:
        for start in range(0, len(files), _READ_ROWS):
            names = files[start:start + _READ_ROWS]
            protos = np.stack([np.load(f).astype(np.float32).reshape(-1) for f in names])
            keys = index.reconstruct_n(start, len(names)).astype(np.float32)
            stems = [f.stem for f in names]
            yield Entries(torch.from_numpy(protos), torch.from_numpy(keys),
                          torch.full((len(names),), -1, dtype=torch.int64), torch.full((len(names),), float("nan")),
                          [s.rsplit("_", 1)[-1] for s in stems], [s.rsplit("_", 1)[0] for s in stems])

    bank = Bank(write_bank(stream(), out_dir, settings, part_rows))
    n_bad = sum(int((~np.isfinite(bank.prototypes(np.arange(s, min(s + _READ_ROWS, len(bank)))))).any(1).sum())
                for s in range(0, len(bank), _READ_ROWS))
    if n_bad:
        log.warning("%d released prototypes are not finite; kept in place (inference drops them after retrieval)",
                    n_bad)
    kind = "hnsw" if hasattr(index, "hnsw") else "flat"
    save_index(bank, index, kind, {"source": str(index_path)})
    log.info("converted %d rows; index (%s) copied to %s", len(bank), kind, bank.root / INDEX_FILE)
    return bank
