"""The retrieval index over a bank's keys: exact inner product by default, HNSW as the paper's ablation.

Keys are unit-norm, so inner product is cosine (freeda.md §3 step 8). The index is saved beside the bank
(`index.faiss` + `index.json`, which records the bank's fingerprint so a stale index is refused) and read
back memory-mapped where faiss allows it. Without faiss the exact search falls back to a blocked numpy
matmul + top-k over the memory-mapped keys, which returns the same neighbour sets (freeda.md §2).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ovss.banks.bank import Bank, BankError
from ovss.io import atomic_path, write_json

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
INDEX_META = "index.json"
IndexKind = Literal["flat", "hnsw"]
INDEX_KINDS = ("flat", "hnsw")
#: HNSW graph degree (spec §7 sizes assume M = 32) and build-time exploration depth.
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 200
#: efSearch the official code sets when it reads an HNSW index (freeda.md §5 row 10).
HNSW_EF_SEARCH = 50_000
_ADD_ROWS = 65536  # keys added to the index per call (bounds the copy out of the memory maps)


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


@dataclass
class KeyIndex:
    """Search a bank's keys: `search(queries (N, D), k) -> (scores (N, k) float32, ids (N, k) int64)`.

    ids of −1 (fewer than k entries, or an approximate index that found fewer) mark the end of a list.
    """

    kind: str
    index: Any | None = None  # a faiss index, or None for the numpy fallback
    bank: Bank | None = None
    ef_search: int | None = None

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal) if self.index is not None else len(self.bank)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2:
            raise ValueError(f"queries must be (N, D), got {q.shape}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if self.index is not None:
            if self.ef_search is not None and hasattr(self.index, "hnsw"):
                self.index.hnsw.efSearch = max(int(self.ef_search), k)
            scores, ids = self.index.search(q, k)
            return scores.astype(np.float32), ids.astype(np.int64)
        return brute_force_search(self.bank.key_blocks(), q, k)


def brute_force_search(key_blocks, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner product over key blocks (numpy); pads with score −inf and id −1 past the end."""
    n = queries.shape[0]
    best_s = np.full((n, 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((n, 0), dtype=np.int64)
    offset = 0
    for block in key_blocks:
        block = np.asarray(block, dtype=np.float32)
        s = queries @ block.T
        ids = np.broadcast_to(np.arange(offset, offset + block.shape[0]), s.shape)
        best_s = np.concatenate([best_s, s], axis=1)
        best_i = np.concatenate([best_i, ids], axis=1)
        if best_s.shape[1] > k:
            top = np.argpartition(-best_s, k - 1, axis=1)[:, :k]
            best_s = np.take_along_axis(best_s, top, 1)
            best_i = np.take_along_axis(best_i, top, 1)
        offset += block.shape[0]
    order = np.argsort(-best_s, axis=1, kind="stable")
    best_s, best_i = np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)
    if best_s.shape[1] < k:
        pad = k - best_s.shape[1]
        best_s = np.concatenate([best_s, np.full((n, pad), -np.inf, np.float32)], 1)
        best_i = np.concatenate([best_i, np.full((n, pad), -1, np.int64)], 1)
    return best_s.astype(np.float32), best_i


def build_index(bank: Bank | str | Path, kind: IndexKind = "flat", *, hnsw_m: int = HNSW_M,
                ef_construction: int = HNSW_EF_CONSTRUCTION) -> Path:
    """Build the faiss index of `bank`'s keys and save it beside the bank; returns the index file."""
    faiss = _faiss()
    if faiss is None:
        raise RuntimeError("building an index needs faiss: pip install 'ovss[faiss]' (faiss-cpu)")
    bank = bank if isinstance(bank, Bank) else Bank(bank)
    if kind == "flat":
        index = faiss.IndexFlatIP(bank.key_dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(bank.key_dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
    else:
        raise ValueError(f"unknown index kind {kind!r}; use one of {INDEX_KINDS}")
    for block in bank.key_blocks():
        for start in range(0, block.shape[0], _ADD_ROWS):
            index.add(np.ascontiguousarray(block[start:start + _ADD_ROWS], dtype=np.float32))
    return save_index(bank, index, kind, {"hnsw_m": hnsw_m, "ef_construction": ef_construction}
                      if kind == "hnsw" else {})


def save_index(bank: Bank, index: Any, kind: str, params: dict[str, Any]) -> Path:
    """Write a faiss index beside `bank` (a fresh temporary name, fsynced, then renamed) with its JSON
    description. faiss writes to a path: `serialize_index` + `atomic_write` would hold the index twice in memory."""
    faiss = _faiss()
    path = bank.root / INDEX_FILE
    with atomic_path(path, durable=True) as tmp:
        faiss.write_index(index, str(tmp))
    write_json(bank.root / INDEX_META, {"kind": kind, "rows": int(index.ntotal), "dim": int(index.d),
                                        "bank": bank.fingerprint, **params})
    return path


def open_index(bank: Bank, *, kind: IndexKind | None = None, ef_search: int = HNSW_EF_SEARCH,
               mmap: bool = True) -> KeyIndex:
    """The saved index of `bank` (memory-mapped when faiss allows it), checked against the bank's rows.

    kind: None takes whatever is saved (exact when nothing is: a flat index is built in memory, or the numpy
    fallback without faiss); "flat"/"hnsw" refuse a saved index of the other kind.
    """
    faiss = _faiss()
    path, meta_path = bank.root / INDEX_FILE, bank.root / INDEX_META
    if path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("bank") != bank.fingerprint or int(meta.get("rows", -1)) != len(bank):
            raise BankError(f"{path} was built for other bank rows; rebuild it with `ovss bank index {bank.root}`")
        if kind is not None and meta.get("kind") != kind:
            raise BankError(f"{path} is a {meta.get('kind')!r} index, {kind!r} was asked for; rebuild it with "
                            f"`ovss bank index {bank.root} --kind {kind}`")
        if faiss is None:
            if meta.get("kind") != "flat":
                raise RuntimeError(f"{path} is an HNSW index: reading it needs faiss (pip install 'ovss[faiss]')")
            return KeyIndex("flat", None, bank)
        flag = getattr(faiss, "IO_FLAG_MMAP_IFC", getattr(faiss, "IO_FLAG_MMAP", 0)) if mmap else 0
        index = faiss.read_index(str(path), flag)
        if index.ntotal != len(bank) or index.d != bank.key_dim:
            raise BankError(f"{path} holds {index.ntotal} × {index.d} keys, the bank {len(bank)} × {bank.key_dim}")
        return KeyIndex(str(meta.get("kind")), index, bank, ef_search if hasattr(index, "hnsw") else None)
    if kind == "hnsw":
        raise BankError(f"{bank.root} has no saved HNSW index; build it with `ovss bank index {bank.root} "
                        "--kind hnsw`")
    if faiss is None:
        return KeyIndex("flat", None, bank)
    log.info("no saved index in %s: building an exact one in memory", bank.root)
    index = faiss.IndexFlatIP(bank.key_dim)
    for block in bank.key_blocks():
        index.add(np.ascontiguousarray(block, dtype=np.float32))
    return KeyIndex("flat", index, bank)
