"""Dataset readers on tiny synthetic copies of each on-disk layout (evaluation.md §1.1), and the name lists."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovss.data import LayoutError, class_names, get_dataset, list_datasets
from ovss.data.names import DATASET_CLASSES, FAMILY, NAME_SETS
from ovss.viz import palette

W, H = 8, 6
RNG = np.random.default_rng(0)
COCO_UNUSED = {11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90}


def write_jpg(path: Path, size=(W, H)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def write_gray(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.frombytes("L", (arr.shape[1], arr.shape[0]), arr.astype(np.uint8).tobytes()).save(path)


def write_palette(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.frombytes("P", (arr.shape[1], arr.shape[0]), arr.astype(np.uint8).tobytes())
    im.putpalette(palette(256).ravel().tolist())
    im.save(path)


def label_map(values, shape=(H, W)) -> np.ndarray:
    flat = np.resize(np.asarray(values), shape[0] * shape[1])
    return flat.reshape(shape)


# -- fixtures in each layout ------------------------------------------------------------------------
def make_voc(root: Path, ids=("2007_000033", "2007_000042", "2008_000001")) -> dict[str, np.ndarray]:
    base = root / "VOCdevkit" / "VOC2012"
    labels = {}
    for k, i in enumerate(ids):
        write_jpg(base / "JPEGImages" / f"{i}.jpg")
        labels[i] = label_map([0, 1, 15, 20, 255, k + 2])
        write_palette(base / "SegmentationClass" / f"{i}.png", labels[i])
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")
    return labels


def make_context(root: Path) -> np.ndarray:
    base = root / "VOCdevkit" / "VOC2010"
    write_jpg(base / "JPEGImages" / "2008_000002.jpg")
    lab = label_map([0, 1, 30, 59, 0, 2])
    write_gray(base / "SegmentationClassContext" / "2008_000002.png", lab)
    (base / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (base / "ImageSets" / "SegmentationContext" / "val.txt").write_text("2008_000002\n")
    return lab


def make_coco(root: Path) -> np.ndarray:
    """One image whose raw stuffthingmap holds every used raw id (0..181 minus 11) and 255."""
    base = root / "coco_stuff164k"
    used = [i for i in range(182) if i not in COCO_UNUSED]
    raw = label_map(used + [255], shape=(12, 16))
    write_jpg(base / "images" / "val2017" / "000000000139.jpg", size=(16, 12))
    write_gray(base / "annotations" / "val2017" / "000000000139.png", raw)
    return raw


# -- VOC ----------------------------------------------------------------------------------------------
def test_voc_palette_indices_are_kept(tmp_path):
    labels = make_voc(tmp_path)
    ds = get_dataset("voc21", tmp_path)
    assert len(ds) == 3 and ds.num_classes == 21 and ds.has_background
    assert ds.class_names[0] == "background" and ds.class_names[-1] == "tvmonitor"
    s = ds[0]
    assert s.id == "2007_000033" and s.image_path.suffix == ".jpg"
    with Image.open(s.label_path) as im:
        assert im.mode == "P"  # a real palette PNG: RGB conversion would give colours, not indices
    lab = ds.load_label(s)
    assert lab.dtype == np.int64 and lab.shape == (H, W)
    np.testing.assert_array_equal(lab, labels[s.id])
    img = ds.load_image(s)
    assert img.mode == "RGB" and img.size == (W, H)


def test_voc20_reduce_zero_label(tmp_path):
    labels = make_voc(tmp_path)
    ds = get_dataset("voc20", tmp_path)
    assert ds.num_classes == 20 and not ds.has_background and ds.reduce_zero_label
    for s in ds:
        raw = labels[s.id]
        expected = np.where((raw == 0) | (raw == 255), 255, raw - 1)
        np.testing.assert_array_equal(ds.load_label(s), expected)
    lab = ds.load_label(ds[0])
    assert lab.max() == 255 and set(np.unique(lab[lab != 255])) <= set(range(20))
    assert 19 in lab  # tvmonitor (raw 20) is the last scored class


def test_voc_rgb_label_is_refused(tmp_path):
    make_voc(tmp_path)
    ds = get_dataset("voc21", tmp_path)
    with Image.open(ds[0].label_path) as im:
        im.convert("RGB").save(ds[0].label_path)
    with pytest.raises(ValueError, match="palette"):
        ds.load_label(ds[0])


def test_limit_and_root_at_dataset_folder(tmp_path):
    make_voc(tmp_path)
    ds = get_dataset("voc21", tmp_path, limit=2)
    assert [s.id for s in ds] == ["2007_000033", "2007_000042"]
    direct = get_dataset("voc21", tmp_path / "VOCdevkit" / "VOC2012", limit=1)
    assert len(direct) == 1 and direct[0].label_path == ds[0].label_path
    with pytest.raises(ValueError):
        get_dataset("voc21", tmp_path, limit=0)


def test_wrong_layout_error_names_expected_paths(tmp_path):
    with pytest.raises(LayoutError) as err:
        get_dataset("voc21", tmp_path)
    msg = str(err.value)
    for p in ("VOCdevkit/VOC2012/JPEGImages/*.jpg", "VOCdevkit/VOC2012/SegmentationClass/*.png",
              "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt"):
        assert p in msg
    (tmp_path / "VOCdevkit" / "VOC2012" / "JPEGImages").mkdir(parents=True)
    with pytest.raises(LayoutError) as err:
        get_dataset("voc21", tmp_path)
    msg = str(err.value)
    assert f"Missing under {tmp_path / 'VOCdevkit' / 'VOC2012'}" in msg
    assert "SegmentationClass" in msg.split("Missing under")[1] and "JPEGImages" not in msg.split("Missing under")[1]
    with pytest.raises(LayoutError, match="annotations/validation"):
        get_dataset("ade20k", tmp_path)


def test_missing_label_file_fails(tmp_path):
    make_voc(tmp_path)
    gone = tmp_path / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "2007_000042.png"
    gone.unlink()
    with pytest.raises(LayoutError, match="2007_000042.png"):
        get_dataset("voc21", tmp_path)
    assert len(get_dataset("voc21", tmp_path, limit=1)) == 1  # the limited run never needs that file


def test_class_names_override(tmp_path):
    make_voc(tmp_path)
    ds = get_dataset("voc21", tmp_path, class_names=class_names("voc21", "ovdiff"))
    assert ds.class_names[1] == "airplane" and "potted plant" in ds.class_names
    assert get_dataset("voc21", tmp_path).class_names[1] == "aeroplane"  # never renamed silently
    with pytest.raises(ValueError, match="20 class names"):
        get_dataset("voc21", tmp_path, class_names=class_names("voc20"))


# -- Context --------------------------------------------------------------------------------------
def test_context_background_and_reduce_zero_label(tmp_path):
    raw = make_context(tmp_path)
    c60 = get_dataset("context60", tmp_path)
    c59 = get_dataset("context59", tmp_path)
    assert (c60.num_classes, c59.num_classes) == (60, 59) and c60.has_background and not c59.has_background
    np.testing.assert_array_equal(c60.load_label(c60[0]), raw)
    np.testing.assert_array_equal(c59.load_label(c59[0]), np.where(raw == 0, 255, raw - 1))
    # Alphabetical order matches the converted ids: 1 = aeroplane, 59 = wood.
    assert c60.class_names[1] == "aeroplane" and c60.class_names[59] == "wood"
    assert c59.class_names[58] == "wood"


def test_context_without_converted_pngs_explains_conversion(tmp_path):
    base = tmp_path / "VOCdevkit" / "VOC2010"
    (base / "JPEGImages").mkdir(parents=True)
    (base / "trainval_merged.json").write_text("{}")
    with pytest.raises(LayoutError, match="SegmentationClassContext") as err:
        get_dataset("context60", tmp_path)
    assert "trainval_merged.json" in str(err.value)


# -- COCO -----------------------------------------------------------------------------------------
def test_coco_stuff_raw_to_171_train_ids(tmp_path):
    raw = make_coco(tmp_path)
    ds = get_dataset("coco_stuff", tmp_path, split="val")
    assert ds.num_classes == 171 and not ds.has_background and ds.split == "val2017"
    s = ds[0]
    assert s.id == "000000000139" and s.label_path.name == "000000000139.png"
    lab = ds.load_label(s)
    for r in np.unique(raw):
        got = np.unique(lab[raw == r])
        want = 255 if r == 255 else r - sum(u < r for u in COCO_UNUSED)  # rank among the used ids
        assert got.tolist() == [want]
    assert sorted(np.unique(lab[lab != 255])) == list(range(171))
    assert ds.class_names[79] == "toothbrush" and ds.class_names[80] == "banner"
    # Raw id 90 is unused; 91 (banner, COCO id 92) is the first stuff class.
    assert np.unique(lab[raw == 91]).tolist() == [80]


def test_coco_object_rule(tmp_path):
    raw = make_coco(tmp_path)
    ds = get_dataset("coco_object", tmp_path)
    assert ds.num_classes == 81 and ds.has_background
    lab = ds.load_label(ds[0])
    assert not (lab == 255).any()  # nothing is ignored
    things = raw <= 90
    expected_things = raw - np.vectorize(lambda r: sum(u < r for u in COCO_UNUSED))(raw) + 1
    np.testing.assert_array_equal(lab[things], expected_things[things])
    assert (lab[~things] == 0).all()  # stuff and unlabeled 255 -> background
    assert sorted(np.unique(lab)) == list(range(81))


def test_coco_prefers_converted_files(tmp_path):
    make_coco(tmp_path)
    ann = tmp_path / "coco_stuff164k" / "annotations" / "val2017"
    converted = label_map([3, 170, 255], shape=(12, 16))
    write_gray(ann / "000000000139_labelTrainIds.png", converted)
    obj = label_map([0, 80, 7], shape=(12, 16))
    write_gray(ann / "000000000139_instanceTrainIds.png", obj)
    stuff = get_dataset("coco_stuff", tmp_path)
    assert stuff[0].label_path.name.endswith("_labelTrainIds.png")
    np.testing.assert_array_equal(stuff.load_label(stuff[0]), converted)
    objects = get_dataset("coco_object", tmp_path)
    np.testing.assert_array_equal(objects.load_label(objects[0]), obj)


# -- Cityscapes -------------------------------------------------------------------------------------
LOOKUP = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
          27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def test_cityscapes_label_ids_lookup(tmp_path):
    base = tmp_path / "cityscapes"
    stem = "frankfurt_000000_000294"
    write_jpg(base / "leftImg8bit" / "val" / "frankfurt" / f"{stem}_leftImg8bit.png")
    ids = label_map(list(range(36)) + [255], shape=(H, W))
    write_gray(base / "gtFine" / "val" / "frankfurt" / f"{stem}_gtFine_labelIds.png", ids)
    ds = get_dataset("cityscapes", tmp_path)
    assert len(ds) == 1 and ds[0].id == stem and ds.num_classes == 19
    lab = ds.load_label(ds[0])
    np.testing.assert_array_equal(lab, np.vectorize(lambda v: LOOKUP.get(int(v), 255))(ids))
    assert (lab == 255).sum() == np.isin(ids, list(LOOKUP), invert=True).sum()
    train_ids = label_map([0, 18, 255], shape=(H, W))
    write_gray(base / "gtFine" / "val" / "frankfurt" / f"{stem}_gtFine_labelTrainIds.png", train_ids)
    ds = get_dataset("cityscapes", tmp_path)
    np.testing.assert_array_equal(ds.load_label(ds[0]), train_ids)


# -- ADE20K -----------------------------------------------------------------------------------------
def test_ade20k_validation_split_and_reduce_zero_label(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    for name in ("ADE_val_00000002", "ADE_val_00000001"):
        write_jpg(base / "images" / "validation" / f"{name}.jpg")
        write_gray(base / "annotations" / "validation" / f"{name}.png", label_map([0, 1, 8, 150]))
    ds = get_dataset("ade20k", tmp_path)
    assert ds.split == "validation" and [s.id for s in ds] == ["ADE_val_00000001", "ADE_val_00000002"]
    lab = ds.load_label(ds[0])
    np.testing.assert_array_equal(lab, label_map([255, 0, 7, 149]))
    assert ds.class_names[7] == "bed " and ds.num_classes == 150
    assert len(get_dataset("ade20k", tmp_path, split="val")) == 2


# -- names ------------------------------------------------------------------------------------------
def test_class_lists():
    assert list_datasets() == ["voc20", "voc21", "context59", "context60", "coco_object", "coco_stuff",
                               "cityscapes", "ade20k"]
    counts = {k: len(v) for k, v in DATASET_CLASSES.items()}
    assert counts == {"voc20": 20, "voc21": 21, "context59": 59, "context60": 60, "coco_object": 81,
                      "coco_stuff": 171, "cityscapes": 19, "ade20k": 150}
    for k, names in DATASET_CLASSES.items():
        assert len(set(names)) == len(names), k
    assert class_names("voc21")[1:] == class_names("voc20")
    assert class_names("context60")[1:] == class_names("context59") == sorted(class_names("context59"))
    assert class_names("coco_object")[1:] == class_names("coco_stuff")[:80]
    assert "building-other" in class_names("coco_stuff")


def test_alternative_name_sets():
    assert class_names("voc21", "diffsegmenter")[1:7] == ["plane", "bicycle", "bird", "boat", "bottle", "buses"]
    assert "toothbrus" in class_names("coco_object", "diffsegmenter")
    assert class_names("voc20", "faseg")[10] == "dining table"
    assert class_names("context59", "faseg") == class_names("context59")
    ade = class_names("ade20k", "ovdiff")
    assert "liquid tank" in ade and "wastebin" in ade and "tank" not in ade
    assert "computer keyboard" in class_names("context59", "ovdiff")
    for ns in NAME_SETS.values():
        for key, family in FAMILY.items():
            if family not in ns.renames:
                with pytest.raises(ValueError, match="does not cover"):
                    class_names(key, ns.name)
                continue
            renamed = class_names(key, ns.name)
            assert len(set(renamed)) == len(renamed), (ns.name, key)
        for family, table in ns.renames.items():
            canon = {n for k, f in FAMILY.items() if f == family for n in DATASET_CLASSES[k]}
            assert set(table) <= canon, (ns.name, family, set(table) - canon)
    with pytest.raises(ValueError, match="unknown name set"):
        class_names("voc21", "clip")
