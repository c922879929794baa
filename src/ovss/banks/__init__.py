"""Feature caches on disk: generic atomic storage (storage.py) and OVDiff's per-class prototypes (prototypes.py)."""
from ovss.banks.prototypes import ClassPrototypes, PrototypeCache, SupportSet, shard_classes
from ovss.banks.storage import Manifest, atomic_save_safetensors, load_safetensors, parse_shard, settings_hash

__all__ = ["ClassPrototypes", "Manifest", "PrototypeCache", "SupportSet", "atomic_save_safetensors",
           "load_safetensors", "parse_shard", "settings_hash", "shard_classes"]
