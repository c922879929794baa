"""Benchmark class names in label order (mmseg 0.x spellings), and named alternative spellings.

The canonical lists are what the `tcl` protocol feeds to the text encoder (evaluation.md §1.2); their
order IS the label order of the converted ground truth. Other repositories spell some classes
differently; those spellings are offered as named sets and applied only when asked for, because a
silent rename changes the numbers.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

BACKGROUND = "background"

VOC20: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
VOC21: tuple[str, ...] = (BACKGROUND, *VOC20)

# Alphabetical: the mmseg converter writes 1..59 in this order (0 = background). An older mmseg list put
# the VOC classes first and does not match the converted ids (evaluation.md §7 trap 1).
CONTEXT59: tuple[str, ...] = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle", "building",
    "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain", "dog",
    "door", "fence", "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light", "motorbike",
    "mountain", "mouse", "person", "plate", "platform", "pottedplant", "road", "rock", "sheep", "shelves",
    "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "tvmonitor", "wall",
    "water", "window", "wood",
)
CONTEXT60: tuple[str, ...] = (BACKGROUND, *CONTEXT59)

COCO_THINGS: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)
COCO_OBJECT: tuple[str, ...] = (BACKGROUND, *COCO_THINGS)
COCO_STUFF_ONLY: tuple[str, ...] = (
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard", "carpet",
    "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain",
    "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile",
    "floor-wood", "flower", "fog", "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other",
    "hill", "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin",
    "net", "paper", "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing",
    "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other",
    "skyscraper", "snow", "solid-other", "stairs", "stone", "straw", "structural-other", "table", "tent",
    "textile-other", "towel", "tree", "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel",
    "wall-stone", "wall-tile", "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)
# "-other" / "-stuff" suffixes are fed verbatim under `tcl` (trap 9).
COCO_STUFF: tuple[str, ...] = (*COCO_THINGS, *COCO_STUFF_ONLY)

CITYSCAPES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)

# "bed " keeps mmseg's trailing space (trap 7): CLIP's tokenizer strips it, name-keyed dictionaries do not.
ADE20K: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed ", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier",
    "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)

DATASET_CLASSES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "voc20": VOC20,
    "voc21": VOC21,
    "context59": CONTEXT59,
    "context60": CONTEXT60,
    "coco_object": COCO_OBJECT,
    "coco_stuff": COCO_STUFF,
    "cityscapes": CITYSCAPES,
    "ade20k": ADE20K,
})

# Which renaming table of a name set applies to a dataset key.
FAMILY: Mapping[str, str] = MappingProxyType({
    "voc20": "voc", "voc21": "voc", "context59": "context", "context60": "context",
    "coco_object": "coco", "coco_stuff": "coco", "cityscapes": "cityscapes", "ade20k": "ade",
})


@dataclass(frozen=True)
class NameSet:
    """Alternative spellings used by one source: canonical name -> alternative, per dataset family.

    A family missing from `renames` means the set does not cover that dataset (asking for it is an
    error); an empty table means the source uses the canonical names there.
    """

    name: str
    source: str
    renames: Mapping[str, Mapping[str, str]] = field(default_factory=dict)


_OVDIFF_VOC = {"aeroplane": "airplane", "diningtable": "table", "tvmonitor": "monitor", "pottedplant": "potted plant"}
# OVDiff's overlay for ADE/Context on top of its VOC fixes; the paper counts 14 fixes, the rest are unpublished.
_OVDIFF_OVERLAY = {
    "tank": "liquid tank", "blind": "window blinds", "hood": "cooker hood", "ashcan": "wastebin",
    "case": "shop case", "keyboard": "computer keyboard", "apparel": "clothing",
}


def _applicable(table: dict[str, str], names: tuple[str, ...]) -> dict[str, str]:
    return {k: v for k, v in table.items() if k in names}

NAME_SETS: Mapping[str, NameSet] = MappingProxyType({
    "ovdiff": NameSet(
        "ovdiff", "OVDiff class-name fixes (ovdiff.md §3 step 1): VOC fixes plus the ADE/Context overlay",
        {"voc": _OVDIFF_VOC, "context": _applicable({**_OVDIFF_VOC, **_OVDIFF_OVERLAY}, CONTEXT59),
         "ade": _applicable(_OVDIFF_OVERLAY, ADE20K)},
    ),
    "faseg": NameSet(
        "faseg", "FA-Seg candidate-list spellings (faseg.md §3.3): multi-word VOC names, PC-59 and COCO as is",
        {"voc": {"diningtable": "dining table", "pottedplant": "potted plant", "tvmonitor": "tv monitor"},
         "context": {}, "coco": {}},
    ),
    "diffsegmenter": NameSet(
        "diffsegmenter", "DiffSegmenter prompt aliases per preset (diffsegmenter.md §3.1); prompts only",
        {
            "voc": {"aeroplane": "plane", "bus": "buses", "diningtable": "table", "person": "people",
                    "pottedplant": "plant", "tvmonitor": "monitor"},
            "context": {"aeroplane": "airplane", "pottedplant": "plant", "tvmonitor": "monitor"},
            # "toothbrus" is the official typo, kept for parity.
            "coco": {"motorcycle": "motorbike", "airplane": "aeroplane", "couch": "sofa",
                     "potted plant": "pottedplant", "dining table": "diningtable", "tv": "tvmonitor",
                     "toothbrush": "toothbrus"},
        },
    ),
})


def list_name_sets() -> list[str]:
    return sorted(NAME_SETS)


def class_names(dataset: str, name_set: str | None = None) -> list[str]:
    """The label-ordered class names of `dataset`, optionally in a named alternative spelling."""
    if dataset not in DATASET_CLASSES:
        raise ValueError(f"unknown dataset {dataset!r}; available: {', '.join(DATASET_CLASSES)}")
    names = list(DATASET_CLASSES[dataset])
    if name_set is None:
        return names
    return rename(names, dataset, name_set)


def rename(names: list[str], dataset: str, name_set: str) -> list[str]:
    """Apply a named set's renaming table for `dataset` to `names`; unlisted names pass unchanged."""
    if name_set not in NAME_SETS:
        raise ValueError(f"unknown name set {name_set!r}; available: {', '.join(list_name_sets())}")
    ns = NAME_SETS[name_set]
    family = FAMILY.get(dataset)
    if family not in ns.renames:
        covered = sorted(k for k, f in FAMILY.items() if f in ns.renames)
        raise ValueError(f"name set {name_set!r} does not cover {dataset!r}; it covers: {', '.join(covered)}")
    table = ns.renames[family]
    return [table.get(n, n) for n in names]
