"""The toy world's scene generator: determinism, ground-truth consistency, captions, sizes, splits."""
import re
from collections import Counter

import numpy as np
import pytest

from ovss.dense.labels import resize_labels
from ovss.toy import (
    MIN_VISIBLE_AREA,
    MIN_SIDE,
    MIN_VISIBLE_FRACTION,
    TOY_CLASSES,
    TOY_COLORS,
    TOY_STUFF,
    TOY_THINGS,
    TOY_THINGS_WITH_BG,
    iter_scenes,
    make_scene,
    split_seeds,
)

NUMBER_WORDS = {"a": 1, "an": 1, "two": 2, "three": 3, "four": 4}


def plural(name: str) -> str:
    return name + "es" if name.endswith("x") else name + "s"


def names_class(caption: str, name: str) -> bool:
    return re.search(rf"\b({name}|{plural(name)})\b", caption) is not None


@pytest.fixture(scope="module")
def scenes():
    """200 scenes at the default size: also the speed sanity check (a few hundred ms in all)."""
    return list(iter_scenes("val", 200))


def test_class_names_are_single_clip_tokens():
    from ovss.text.clip_bpe import BOS_ID, EOS_ID, clip_tokenizer

    tok = clip_tokenizer()
    for name in (*TOY_CLASSES, *TOY_COLORS):
        ids = tok(name).input_ids
        assert len(ids) == 3 and ids[0] == BOS_ID and ids[-1] == EOS_ID, (name, ids)
    assert TOY_CLASSES == (*TOY_STUFF, *TOY_THINGS)
    assert TOY_THINGS_WITH_BG == ("background", *TOY_THINGS)
    assert len(set(TOY_CLASSES)) == len(TOY_CLASSES)


def test_same_seed_same_scene_and_different_seeds_differ():
    a, b = make_scene(123), make_scene(123)
    assert a.image.tobytes() == b.image.tobytes()
    assert np.array_equal(a.labels_full, b.labels_full) and np.array_equal(a.labels_things, b.labels_things)
    assert a.caption == b.caption and a.objects == b.objects and a.tags == b.tags and a.seed == 123
    others = [make_scene(s) for s in range(124, 134)]
    assert all(o.image.tobytes() != a.image.tobytes() for o in others)
    assert len({o.caption for o in [a, *others]}) > 8


def test_tags_labels_and_caption_agree(scenes):
    for sc in scenes:
        present = {TOY_CLASSES[i] for i in np.unique(sc.labels_full)}
        assert set(sc.tags) == present, sc.seed
        assert sc.tags == [c for c in TOY_CLASSES if c in present]
        for name in TOY_CLASSES:
            assert names_class(sc.caption, name) == (name in present), (sc.seed, name, sc.caption)
        assert {o["name"] for o in sc.objects} == present & set(TOY_THINGS)
        assert 1 <= len(sc.objects) <= 4 and any(s in present for s in TOY_STUFF)


def test_caption_names_every_thing_with_colour_and_grammatical_count(scenes):
    mention = re.compile(rf"\b({'|'.join(NUMBER_WORDS)}) ({'|'.join(TOY_COLORS)}) (\w+)\b")
    for sc in scenes:
        found = Counter()
        for number, color, noun in mention.findall(sc.caption):
            if noun in TOY_STUFF:  # "under a blue sky"
                continue
            n = NUMBER_WORDS[number]
            names = [t for t in TOY_THINGS if noun == (t if n == 1 else plural(t))]
            assert len(names) == 1, (sc.seed, sc.caption)  # "two balls", never "two ball" or "a balls"
            if n == 1:
                assert (number == "an") == (color[0] in "aeiou"), sc.caption
            found[color, names[0]] += n
        assert found == Counter((o["color"], o["name"]) for o in sc.objects), (sc.seed, sc.caption)
        for (color, name, place), n in Counter((o["color"], o["name"], o["place"]) for o in sc.objects).items():
            if n > 1:  # same-looking things in one place are counted, not listed
                assert f"{['', '', 'two', 'three', 'four'][n]} {color} {plural(name)}" in sc.caption, sc.caption


def test_two_label_maps_agree(scenes):
    n_stuff = len(TOY_STUFF)
    for sc in scenes:
        full, things = sc.labels_full, sc.labels_things
        assert full.dtype == np.uint8 and things.dtype == np.uint8 and full.shape == things.shape == (64, 64)
        assert full.max() < len(TOY_CLASSES) and things.max() < len(TOY_THINGS_WITH_BG)
        assert np.array_equal(things == 0, full < n_stuff)
        is_thing = full >= n_stuff
        assert np.array_equal(things[is_thing].astype(int), full[is_thing].astype(int) - n_stuff + 1)
        for k in np.unique(things[is_thing]):
            assert TOY_THINGS_WITH_BG[k] == TOY_CLASSES[k - 1 + n_stuff]


def test_occlusion_bookkeeping(scenes):
    occluded = 0
    for sc in scenes:
        assert np.array_equal(sc.instances > 0, sc.labels_things > 0)
        assert sc.instances.max() == len(sc.objects)
        per_class = Counter()
        for i, o in enumerate(sc.objects, start=1):
            mine = sc.instances == i
            assert o["pixels"] == mine.sum() > 0
            ys, xs = np.nonzero(mine)
            assert o["bbox"] == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert np.all(sc.labels_full[mine] == TOY_CLASSES.index(o["name"]))
            # 64x64 is the reference grid, so the drop rule holds exactly here.
            assert o["pixels"] >= max(MIN_VISIBLE_FRACTION * o["area"], MIN_VISIBLE_AREA * 64 * 64)
            occluded += o["pixels"] < o["area"]
            per_class[o["name"]] += o["pixels"]
        label_counts = np.bincount(sc.labels_full.ravel(), minlength=len(TOY_CLASSES))
        assert per_class == Counter({t: int(label_counts[TOY_CLASSES.index(t)])
                                     for t in TOY_THINGS if label_counts[TOY_CLASSES.index(t)]})
    assert occluded > 10  # things do overlap


def test_objects_drawn_in_their_named_colour(scenes):
    palette = np.array(list(TOY_COLORS.values()), dtype=float)
    for sc in scenes[:60]:
        rgb = np.asarray(sc.image, dtype=float)
        for i, o in enumerate(sc.objects, start=1):
            mean = rgb[sc.instances == i].mean(axis=0)
            assert list(TOY_COLORS)[np.argmin(((palette - mean) ** 2).sum(1))] == o["color"], (sc.seed, o)


def test_variety(scenes):
    seen = Counter(t for sc in scenes for t in sc.tags)
    assert set(seen) == set(TOY_CLASSES)
    assert {len(sc.objects) for sc in scenes} == {1, 2, 3, 4}
    n_stuff = Counter(sum(t in TOY_STUFF for t in sc.tags) for sc in scenes)
    assert n_stuff[1] > 20 and n_stuff[2] > 20 and n_stuff[3] > 10
    assert len({sc.caption.split()[0] for sc in scenes}) > 5  # phrase order varies


def test_stuff_colour_families_and_textures():
    """Stuff is recognisable by colour and by texture, judged by mean colour and mean neighbour differences."""
    colour = {
        "sky": lambda r, g, b: b > r and b > g - 5,
        "grass": lambda r, g, b: g > r and g > b,
        "water": lambda r, g, b: b > r and b > g,
        "sand": lambda r, g, b: r > b + 40 and g > b + 20,
        "wall": lambda r, g, b: r > g + 30 and r > b + 30,
    }
    texture = {
        "sky": lambda dx, dy, std: dx < 3 and dy < 5,  # smooth gradient and soft clouds
        "grass": lambda dx, dy, std: dx > 3 * dy and dx > 2.5,  # vertical blades
        "water": lambda dx, dy, std: dy > 5 * dx and dy > 10,  # horizontal waves
        "sand": lambda dx, dy, std: 2.5 < dx < 1.6 * dy and dy < 1.6 * dx,  # isotropic speckle
        "wall": lambda dx, dy, std: std > 25 and dx > 4 and dy > 8,  # bricks and mortar
    }
    checked = Counter()
    for sc in iter_scenes("test", 60, 96):
        rgb = np.asarray(sc.image, dtype=float)
        gray = rgb.mean(axis=2)
        for name in TOY_STUFF:
            region = sc.labels_full == TOY_CLASSES.index(name)
            if region.sum() < 1500:
                continue
            assert colour[name](*rgb[region].mean(axis=0)), (sc.seed, name, rgb[region].mean(axis=0))
            dx = np.abs(np.diff(gray, axis=1))[region[:, 1:] & region[:, :-1]].mean()
            dy = np.abs(np.diff(gray, axis=0))[region[1:] & region[:-1]].mean()
            assert texture[name](dx, dy, gray[region].std()), (sc.seed, name, dx, dy, gray[region].std())
            checked[name] += 1
    assert set(checked) == set(TOY_STUFF)


@pytest.mark.parametrize("small,large", [(64, 128), ((48, 80), (96, 160))])
def test_same_seed_at_two_sizes_is_the_same_scene_scaled(small, large):
    for seed in range(20):
        a, b = make_scene(seed, small), make_scene(seed, large)
        assert a.caption == b.caption and a.tags == b.tags
        assert [(o["name"], o["color"], o["place"]) for o in a.objects] == \
               [(o["name"], o["color"], o["place"]) for o in b.objects]
        shrunk = resize_labels(b.labels_full, a.labels_full.shape)
        assert (shrunk == a.labels_full).mean() > 0.95, seed
        ratio = b.labels_full.size / a.labels_full.size
        for oa, ob in zip(a.objects, b.objects):
            assert ob["pixels"] == pytest.approx(ratio * oa["pixels"], rel=0.3, abs=3 * ratio)


@pytest.mark.parametrize(
    "size,hw", [(32, (32, 32)), ((40, 100), (40, 100)), ((120, 50), (120, 50)), (17, (17, 17)), (8, (8, 8))]
)
def test_any_size(size, hw):
    for seed in range(10):
        sc = make_scene(seed, size)
        assert sc.image.mode == "RGB" and sc.image.size == (hw[1], hw[0])
        assert sc.labels_full.shape == sc.labels_things.shape == sc.instances.shape == hw
        assert set(sc.tags) == {TOY_CLASSES[i] for i in np.unique(sc.labels_full)}
        for name in TOY_CLASSES:
            assert names_class(sc.caption, name) == (name in sc.tags), (size, seed, sc.caption)
        for i, o in enumerate(sc.objects, start=1):
            assert o["pixels"] == (sc.instances == i).sum() > 0


def test_bad_size_rejected():
    with pytest.raises(ValueError):
        make_scene(0, MIN_SIDE - 1)
    with pytest.raises(ValueError):
        make_scene(0, (10, -1))


def test_splits_are_disjoint_and_iterated_in_order():
    ranges = {s: split_seeds(s) for s in ("train", "val", "test")}
    sets = [set(range(r.start, r.start + 1000)) | set(range(r.stop - 1000, r.stop)) for r in ranges.values()]
    for r1 in ranges.values():
        for r2 in ranges.values():
            assert r1 is r2 or r1.stop <= r2.start or r2.stop <= r1.start
    assert not (sets[0] & sets[1]) and not (sets[1] & sets[2]) and not (sets[0] & sets[2])
    got = list(iter_scenes("test", 3, 32))
    assert [sc.seed for sc in got] == list(ranges["test"][:3])
    assert got[1].caption == make_scene(ranges["test"][1], 32).caption
    with pytest.raises(ValueError):
        split_seeds("validation")
