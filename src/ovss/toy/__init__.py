"""The toy world: procedural scenes with exact ground truth, so every method can be run and scored offline."""
from ovss.toy.scenes import (
    MIN_SIDE,
    MIN_VISIBLE_AREA,
    MIN_VISIBLE_FRACTION,
    REFERENCE_SHORT_SIDE,
    TOY_CLASSES,
    TOY_COLORS,
    TOY_STUFF,
    TOY_THINGS,
    TOY_THINGS_WITH_BG,
    Scene,
    iter_scenes,
    make_scene,
    split_seeds,
)

__all__ = [
    "MIN_SIDE", "MIN_VISIBLE_AREA", "MIN_VISIBLE_FRACTION", "REFERENCE_SHORT_SIDE",
    "TOY_CLASSES", "TOY_COLORS", "TOY_STUFF", "TOY_THINGS", "TOY_THINGS_WITH_BG",
    "Scene", "iter_scenes", "make_scene", "split_seeds",
]
