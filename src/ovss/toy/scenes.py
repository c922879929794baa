"""Procedural toy scenes with exact ground truth: the world every method can be run and scored in offline.

A scene is a few flat-coloured "things" (ball, box, kite, ...) over textured "stuff" (sky, grass, water,
sand, wall), drawn without anti-aliasing so that image and label maps agree pixel for pixel. Everything is
a function of the seed: the layout lives in resolution-free units (positions as fractions of the frame,
sizes in units of the short side), so the same seed at two sizes of one aspect ratio is the same scene
scaled. Which things are kept (tiny or mostly hidden ones are dropped) is decided once on a fixed reference
grid, so captions and object lists do not change with the output size.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

TOY_STUFF: tuple[str, ...] = ("sky", "grass", "water", "sand", "wall")
TOY_THINGS: tuple[str, ...] = ("ball", "box", "kite", "star", "ring", "heart", "triangle")
TOY_CLASSES: tuple[str, ...] = (*TOY_STUFF, *TOY_THINGS)
"""Label order of `Scene.labels_full`: stuff first, then things; no background."""
TOY_THINGS_WITH_BG: tuple[str, ...] = ("background", *TOY_THINGS)
"""Label order of `Scene.labels_things`: 0 = background (every stuff pixel), as in VOC / COCO-Object."""
TOY_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "blue": (40, 70, 220),
    "green": (40, 170, 60),
    "yellow": (240, 210, 40),
    "orange": (245, 140, 30),
    "purple": (140, 60, 190),
    "pink": (245, 130, 190),
    "white": (245, 245, 245),
    "black": (30, 30, 30),
    "brown": (130, 80, 40),
}

MIN_VISIBLE_FRACTION = 0.3
"""A thing with less than this share of its silhouette visible is dropped (from image, labels and caption)."""
MIN_VISIBLE_AREA = 0.004
"""A thing covering less than this share of the image is dropped (about 16 pixels at 64x64)."""
REFERENCE_SHORT_SIDE = 64
"""Short side of the grid on which the keep/drop decision is made, whatever the output size."""
MIN_SIDE = 8
"""Smallest image side: from here on, stuff always shows (four things cover at most 4 * pi * 1.7^2 < 64 pixels)."""

_SPLITS = {"train": range(0, 1_000_000), "val": range(1_000_000, 2_000_000), "test": range(2_000_000, 3_000_000)}
_STUFF_RGB = {"sky": (90, 150, 230), "grass": (70, 145, 50), "water": (35, 95, 165), "sand": (220, 195, 140),
              "wall": (165, 75, 55)}
_CLASHES = {"sky": {"blue", "white"}, "grass": {"green"}, "water": {"blue"}, "sand": {"brown"},
            "wall": {"red", "brown"}}
"""Thing colours not drawn in scenes showing that stuff, so that a thing never melts into its surroundings."""
_THING_EXTENT = 1.1  # every unit shape lies inside this radius (box corners reach 1.07)
_LATTICE = 128  # side of the wrapping value-noise lattice
_LAYOUT, _TEXTURE, _CAPTION = 0, 1, 2  # independent random streams per seed

_PLURAL = {"box": "boxes"}
_NUMBERS = {2: "two", 3: "three", 4: "four"}
_PREPOSITIONS = {
    "sky": ("in the sky", "up in the sky", "flying in the sky"),
    "grass": ("on the grass", "in the grass", "lying on the grass"),
    "water": ("on the water", "floating on the water", "in the water"),
    "sand": ("on the sand", "lying on the sand", "in the sand"),
    "wall": ("in front of a wall", "against the wall", "before a brick wall"),
}
_ABOVE_PHRASES = {"sky": ("under a blue sky", "below the sky", "with the sky above"),
                  "wall": ("in front of a wall", "with a wall behind")}
_PREFIXES = ("", "", "a photo of ", "a picture of ", "an image of ", "a toy scene of ")


@dataclass
class Scene:
    """One generated scene and its ground truth.

    `instances` numbers the things: 0 = stuff, i + 1 = `objects[i]` (in paint order, back to front). Each
    object is a dict: name, color, place (the stuff under its centre), bbox (x0, y0, x1, y1) of its visible
    pixels with exclusive ends, pixels (visible pixel count) and area (its unoccluded silhouette in pixels).
    """

    image: Image.Image
    labels_full: np.ndarray  # (H, W) uint8, indexes TOY_CLASSES
    labels_things: np.ndarray  # (H, W) uint8, indexes TOY_THINGS_WITH_BG
    instances: np.ndarray  # (H, W) uint8
    caption: str
    tags: list[str]  # class names present, in TOY_CLASSES order
    objects: list[dict]
    seed: int


@dataclass(frozen=True)
class _Thing:
    name: str
    color: str
    rgb: tuple[float, float, float]
    a: float  # centre as a fraction of the free horizontal range (the frame minus the thing's extent)
    b: float  # same, vertically
    radius: float  # in units of the short side
    angle: float
    stretch: float  # aspect of boxes and kites


@dataclass(frozen=True)
class _Band:
    """Lower edge of a stuff band: v = level + amplitude * sin(2 pi (frequency * u + phase)), u, v in [0, 1]."""

    level: float
    amplitude: float = 0.0
    frequency: float = 1.0
    phase: float = 0.0

    def at(self, u: np.ndarray) -> np.ndarray:
        return self.level + self.amplitude * np.sin(2 * np.pi * (self.frequency * u + self.phase))


@dataclass(frozen=True)
class _Layout:
    stuff: tuple[str, ...]  # bands top to bottom
    edges: tuple[_Band, ...]  # len(stuff) - 1 band edges
    things: tuple[_Thing, ...]


def split_seeds(split: str) -> range:
    """Disjoint seed ranges: train 0.., val 1,000,000.., test 2,000,000.. (a million scenes each)."""
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(_SPLITS)}")
    return _SPLITS[split]


def iter_scenes(split: str, n: int, size: int | tuple[int, int] = 64) -> Iterator[Scene]:
    """The first `n` scenes of a split."""
    seeds = split_seeds(split)
    if not 0 <= n <= len(seeds):
        raise ValueError(f"n must be in [0, {len(seeds)}], got {n}")
    for seed in seeds[:n]:
        yield make_scene(seed, size)


def make_scene(seed: int, size: int | tuple[int, int] = 64) -> Scene:
    """Generate the scene of `seed` at `size` (an int for a square, or (height, width) like the label maps)."""
    h, w = (int(size), int(size)) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
    if h < MIN_SIDE or w < MIN_SIDE:
        raise ValueError(f"size must be at least {MIN_SIDE} on each side, got {size!r}")
    layout = _make_layout(seed)
    rh, rw = _reference_size(h, w)
    ref = _rasterize(layout, rh, rw)
    keep = [k for k in range(len(layout.things))
            if ref.visible[k] >= max(MIN_VISIBLE_FRACTION * ref.area[k], MIN_VISIBLE_AREA * rh * rw)]
    if (h, w) == (rh, rw) and len(keep) == len(layout.things):
        ras = ref
    else:
        layout = replace(layout, things=tuple(layout.things[k] for k in keep))
        ras = _rasterize(layout, h, w)
    # At sizes below the reference a kept thing can still cover no pixel: drop it. It hid nothing, so the
    # other things' pixels stay as they are; only the instance ids are renumbered.
    shown = [k for k in range(len(layout.things)) if ras.visible[k] > 0]
    renumber = np.zeros(len(layout.things) + 1, dtype=np.uint8)
    renumber[[k + 1 for k in shown]] = np.arange(1, len(shown) + 1)
    instances = renumber[ras.instances]
    things = [layout.things[k] for k in shown]

    image = _paint(layout, ras, seed, h, w)
    stuff_lut = np.array([TOY_CLASSES.index(s) for s in layout.stuff], dtype=np.uint8)
    things_lut = np.array([0] + [TOY_THINGS_WITH_BG.index(t.name) for t in things], dtype=np.uint8)
    labels_things = things_lut[instances]
    labels_full = np.where(instances > 0, labels_things + (len(TOY_STUFF) - 1), stuff_lut[ras.stuff]).astype(np.uint8)

    present = np.bincount(labels_full.ravel(), minlength=len(TOY_CLASSES)) > 0
    tags = [c for c, p in zip(TOY_CLASSES, present) if p]
    shown_bands = [b for b, name in enumerate(layout.stuff) if name in tags]
    objects = []
    for i, (k, t) in enumerate(zip(shown, things)):
        ys, xs = np.nonzero(instances == i + 1)
        # The band under the centre; if things hide that band entirely, the nearest band still in view (some
        # band always shows, see MIN_SIDE).
        band = min(shown_bands, key=lambda b: abs(b - ras.place[k]))
        objects.append({
            "name": t.name, "color": t.color, "place": layout.stuff[band],
            "bbox": (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1),
            "pixels": int(ras.visible[k]), "area": int(ras.area[k]),
        })
    stuff_shown = [layout.stuff[b] for b in shown_bands]
    caption = _caption(objects, stuff_shown, np.random.default_rng([seed, _CAPTION]))
    return Scene(image=image, labels_full=labels_full, labels_things=labels_things, instances=instances,
                 caption=caption, tags=tags, objects=objects, seed=seed)


def _reference_size(h: int, w: int) -> tuple[int, int]:
    if h <= w:
        return REFERENCE_SHORT_SIDE, max(1, round(REFERENCE_SHORT_SIDE * w / h))
    return max(1, round(REFERENCE_SHORT_SIDE * h / w)), REFERENCE_SHORT_SIDE


# ---------------------------------------------------------------------------------------------- layout


def _make_layout(seed: int) -> _Layout:
    """Draw a scene in resolution-free units; consumes the same random numbers at every size."""
    rng = np.random.default_rng([seed, _LAYOUT])
    kind = rng.choice(3, p=[0.35, 0.45, 0.2])
    if kind == 0:  # one background stuff
        stuff: tuple[str, ...] = (str(rng.choice(TOY_STUFF)),)
        edges: tuple[_Band, ...] = ()
    elif kind == 1:  # horizon: sky (or a wall) above the ground
        top = "sky" if rng.random() < 0.75 else "wall"
        ground = str(rng.choice(("grass", "water", "sand") if top == "sky" else ("grass", "sand")))
        hills = {"grass": 0.05, "sand": 0.02, "water": 0.0}[ground] if top == "sky" else 0.0
        stuff = (top, ground)
        edges = (_Band(rng.uniform(0.3, 0.6), rng.uniform(0, hills), rng.uniform(0.5, 2), rng.random()),)
    else:  # shore: sky above water above sand
        level = rng.uniform(0.25, 0.4)
        stuff = ("sky", "water", "sand")
        edges = (_Band(level), _Band(rng.uniform(level + 0.2, 0.75), rng.uniform(0.01, 0.04),
                                     rng.uniform(1, 3), rng.random()))
    banned = set().union(*(_CLASHES[s] for s in stuff))
    colors = [c for c in TOY_COLORS if c not in banned]
    things = []
    for _ in range(int(rng.integers(1, 5))):
        name = str(rng.choice(TOY_THINGS))
        color = str(rng.choice(colors))
        rgb = tuple(float(np.clip(v + d, 0, 255)) for v, d in zip(TOY_COLORS[color], rng.uniform(-15, 15, 3)))
        tilt = {"star": math.pi, "triangle": 0.5, "ball": 0.0, "ring": 0.0}.get(name, 0.4)
        things.append(_Thing(name, color, rgb, a=rng.random(), b=rng.random(), radius=rng.uniform(0.09, 0.2),
                             angle=rng.uniform(-tilt, tilt), stretch=rng.uniform(0.8, 1.25)))
    return _Layout(stuff, edges, tuple(things))


# ------------------------------------------------------------------------------------------ rasterizing


@dataclass
class _Raster:
    stuff: np.ndarray  # (H, W) band index into layout.stuff
    instances: np.ndarray  # (H, W) uint8, 0 = stuff, k + 1 = layout.things[k]
    visible: np.ndarray  # (n,) visible pixels per thing
    area: np.ndarray  # (n,) silhouette pixels per thing
    place: list[int]  # band under each thing's centre
    windows: list[tuple[slice, slice, np.ndarray, np.ndarray]]  # rows, cols, silhouette mask, shading


def _rasterize(layout: _Layout, h: int, w: int) -> _Raster:
    """Label geometry at pixel centres (no anti-aliasing); later things occlude earlier ones."""
    s = min(h, w)
    u = (np.arange(w) + 0.5) / w
    v = (np.arange(h)[:, None] + 0.5) / h
    stuff = np.zeros((h, w), dtype=np.intp)
    for edge in layout.edges:
        stuff += v > edge.at(u)[None, :]
    instances = np.zeros((h, w), dtype=np.uint8)
    windows, area, place = [], [], []
    for k, t in enumerate(layout.things):
        cx, cy = _centre(t, h / s, w / s)
        place.append(int(sum(cy * s / h > e.at(np.array(cx * s / w)) for e in layout.edges)))
        reach = _THING_EXTENT * t.radius
        rows = slice(max(0, math.floor((cy - reach) * s)), min(h, math.ceil((cy + reach) * s) + 1))
        cols = slice(max(0, math.floor((cx - reach) * s)), min(w, math.ceil((cx + reach) * s) + 1))
        dx = ((np.arange(cols.start, cols.stop) + 0.5) / s - cx)[None, :] / t.radius
        dy = ((np.arange(rows.start, rows.stop) + 0.5) / s - cy)[:, None] / t.radius
        cos, sin = math.cos(t.angle), math.sin(t.angle)
        mask = _SHAPES[t.name](cos * dx + sin * dy, -sin * dx + cos * dy, t.stretch)
        shade = 1.0 - 0.1 * (dx + dy)  # light from the top left
        instances[rows, cols][mask] = k + 1
        windows.append((rows, cols, mask, shade))
        area.append(int(mask.sum()))
    visible = np.bincount(instances.ravel(), minlength=len(layout.things) + 1)[1:]
    return _Raster(stuff, instances, visible, np.array(area, dtype=np.int64), place, windows)


def _centre(t: _Thing, height: float, width: float) -> tuple[float, float]:
    """Centre in short-side units, keeping the whole thing inside a height x width frame."""
    m = _THING_EXTENT * t.radius
    return m + t.a * max(width - 2 * m, 0.0), m + t.b * max(height - 2 * m, 0.0)


def _convex(vertices: list[tuple[float, float]]) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Inside test for a convex polygon given in clockwise order on screen (y down)."""
    def inside(p: np.ndarray, q: np.ndarray) -> np.ndarray:
        result = np.ones(np.broadcast_shapes(p.shape, q.shape), dtype=bool)
        for (ax, ay), (bx, by) in zip(vertices, vertices[1:] + vertices[:1]):
            result &= (bx - ax) * (q - ay) - (by - ay) * (p - ax) >= 0
        return result
    return inside


_TRIANGLE = _convex([(0.0, -1.0), (0.866, 0.5), (-0.866, 0.5)])
_STAR_INNER = 0.45  # inner/outer radius; chunkier than a pentagram (0.38) so that arms survive at 64 px


def _kite(p: np.ndarray, q: np.ndarray, stretch: float) -> np.ndarray:
    return _convex([(0.0, -0.75), (0.6, -0.2), (0.0, 1.0), (-0.6, -0.2)])(p / stretch, q)


def _star(p: np.ndarray, q: np.ndarray, stretch: float) -> np.ndarray:
    """Five-pointed star, one tip up: fold every direction onto the tip-to-inner-corner edge."""
    sector = 2 * math.pi / 5
    alpha = np.mod(np.arctan2(q, p) + math.pi / 2, sector)
    phi = np.minimum(alpha, sector - alpha)
    d = np.hypot(p, q)
    px, py = d * np.cos(phi), d * np.sin(phi)
    bx, by = _STAR_INNER * math.cos(sector / 2), _STAR_INNER * math.sin(sector / 2)
    return (bx - 1) * py - by * (px - 1) >= 0


def _heart(p: np.ndarray, q: np.ndarray, stretch: float) -> np.ndarray:
    """The implicit heart (x^2 + y^2 - 1)^3 <= x^2 y^3, scaled into the unit disc, point down."""
    x, y = 1.2 * p, 0.12 - 1.2 * q
    return (x * x + y * y - 1) ** 3 <= x * x * y ** 3


_SHAPES: dict[str, Callable[[np.ndarray, np.ndarray, float], np.ndarray]] = {
    "ball": lambda p, q, stretch: p * p + q * q <= 1.0,
    "ring": lambda p, q, stretch: (p * p + q * q <= 1.0) & (p * p + q * q >= 0.55 ** 2),
    "box": lambda p, q, stretch: (np.abs(p) <= 0.72 * stretch) & (np.abs(q) <= 0.72 / stretch),
    "kite": _kite,
    "star": _star,
    "heart": _heart,
    "triangle": lambda p, q, stretch: _TRIANGLE(p, q),
}


# --------------------------------------------------------------------------------------------- painting


def _paint(layout: _Layout, ras: _Raster, seed: int, h: int, w: int) -> Image.Image:
    """Textured stuff, then flat shaded things in paint order.

    Bands are horizontal, so each texture is evaluated on a (rows, W) grid over its band's rows only, with
    separable noise: a 512x512 scene costs a few full-image array passes per texture.
    """
    rng = np.random.default_rng([seed, _TEXTURE])
    lattice = rng.random((_LATTICE, _LATTICE)).astype(np.float32)
    s = min(h, w)
    x = ((np.arange(w, dtype=np.float32) + 0.5) / s)[None, :]
    image = np.empty((h, w, 3), dtype=np.float32)
    for band, name in enumerate(layout.stuff):
        base = (np.array(_STUFF_RGB[name]) * rng.uniform(0.85, 1.1) + rng.uniform(-10, 10, 3)).astype(np.float32)
        offsets = rng.uniform(0, _LATTICE, (3, 2))
        rows = np.nonzero((ras.stuff == band).any(axis=1))[0]
        if rows.size == 0:
            continue
        r0, r1 = int(rows[0]), int(rows[-1]) + 1
        i = np.arange(r0, r1, dtype=np.float32)[:, None] + 0.5
        texture = _TEXTURES[name](x, i / s, i / h, base, _Noise(lattice, offsets))
        mask = ras.stuff[r0:r1] == band
        image[r0:r1][mask] = texture[mask]
    for t, (rows_, cols, mask, shade) in zip(layout.things, ras.windows):
        image[rows_, cols][mask] = np.array(t.rgb, dtype=np.float32) * np.clip(shade, 0.8, 1.2)[..., None][mask]
    return Image.fromarray(np.clip(image + 0.5, 0, 255).astype(np.uint8), "RGB")


@dataclass
class _Noise:
    """Smooth value noise from a wrapping random lattice, on a grid; octave i is shifted by offsets[i]."""

    lattice: np.ndarray
    offsets: np.ndarray

    def __call__(self, x: np.ndarray, y: np.ndarray, fx: float, fy: float, octave: int = 0) -> np.ndarray:
        """x: (1, W), y: (R, 1) -> (R, W); separable, so one gather per axis."""
        (cx0, cx1), (wx0, wx1) = self._axis(x[0] * fx + self.offsets[octave, 0])
        (cy0, cy1), (wy0, wy1) = self._axis(y[:, 0] * fy + self.offsets[octave, 1])
        rows = self.lattice[cy0] * wy0[:, None] + self.lattice[cy1] * wy1[:, None]
        return rows[:, cx0] * wx0 + rows[:, cx1] * wx1

    def _axis(self, g: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        """Lattice cells on both sides of each coordinate and their smoothstep weights."""
        cell = np.floor(g)
        t = (g - cell).astype(np.float32)
        t = t * t * (3 - 2 * t)
        cell = cell.astype(np.intp)
        n = self.lattice.shape[0]
        return (cell % n, (cell + 1) % n), (1 - t, t)


def _sky(x, y, v, base, noise: _Noise) -> np.ndarray:
    """Paler towards the horizon, with soft white clouds."""
    col = base + (np.array([235, 240, 250], np.float32) - base) * (0.45 * v)[..., None]
    cloud = 0.65 * noise(x, y, 2.5, 5.0) + 0.35 * noise(x, y, 7.0, 12.0, 1)
    cover = np.clip((cloud - 0.55) / 0.2, 0, 1)[..., None]
    return col + (np.array([248, 248, 250], np.float32) - col) * (0.85 * cover)


def _grass(x, y, v, base, noise: _Noise) -> np.ndarray:
    """Vertical blade streaks over darker and lighter patches."""
    blades = noise(x, y, 40.0, 5.0)
    patches = noise(x, y, 4.0, 4.0, 1)
    return base * ((0.65 + 0.5 * blades) * (0.85 + 0.3 * patches))[..., None]


def _water(x, y, v, base, noise: _Noise) -> np.ndarray:
    """Horizontal wave bands with bright crests."""
    wave = np.sin(2 * np.pi * (y * 12.0 + 0.8 * noise(x, y, 3.0, 3.0)))
    crest = np.clip((wave - 0.55) / 0.45, 0, 1)[..., None]
    col = base * (0.85 + 0.12 * wave)[..., None]
    return col + (np.array([200, 225, 240], np.float32) - col) * (0.6 * crest)


def _sand(x, y, v, base, noise: _Noise) -> np.ndarray:
    """Fine speckle over gentle diagonal ripples."""
    speckle = noise(x, y, 36.0, 36.0)
    ripple = np.sin(2 * np.pi * (4.0 * x + 8.0 * y + 0.6 * noise(x, y, 2.0, 2.0, 1)))
    return base * (0.84 + 0.24 * speckle + 0.05 * ripple)[..., None]


def _wall(x, y, v, base, noise: _Noise) -> np.ndarray:
    """Running-bond bricks of varying shade between light mortar lines."""
    rows, cols, mortar = 8.0, 4.0, 0.02
    row = np.floor(y * rows)
    bx = x * cols + 0.5 * (row % 2)
    brick = noise.lattice[row.astype(np.intp) % _LATTICE, np.floor(bx).astype(np.intp) % _LATTICE]
    col = base * (0.75 + 0.4 * brick + 0.15 * noise(x, y, 30.0, 30.0))[..., None]
    joint = ((bx % 1) < mortar * cols) | (((y * rows) % 1) < mortar * rows)
    return np.where(joint[..., None], np.array([205, 200, 190], np.float32), col)


_TEXTURES = {"sky": _sky, "grass": _grass, "water": _water, "sand": _sand, "wall": _wall}


# --------------------------------------------------------------------------------------------- captions


def plural(name: str) -> str:
    """A thing word's plural as captions spell it ("boxes", "balls")."""
    return _PLURAL.get(name, name + "s")


def _with_article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _caption(objects: list[dict], stuff: list[str], rng: np.random.Generator) -> str:
    """Plain English naming every thing (with its colour and count) and every stuff shown.

    Things are grouped by the stuff they sit on ("two red kites in the sky"); stuff without things is
    placed relative to the rest ("above the water", "under a blue sky"). Group, item and clause order vary.
    """
    groups: dict[str, dict[tuple[str, str], int]] = {}
    for o in objects:
        counts = groups.setdefault(o["place"], {})
        counts[o["color"], o["name"]] = counts.get((o["color"], o["name"]), 0) + 1
    hosts = [p for p in stuff if p in groups]
    clauses = []
    for place in rng.permutation(len(hosts)):
        items = [_with_article(f"{c} {n}") if k == 1 else f"{_NUMBERS[k]} {c} {plural(n)}"
                 for (c, n), k in groups[hosts[place]].items()]
        items = [items[i] for i in rng.permutation(len(items))]
        clauses.append((hosts[place], _join(items)))
    hosted = [stuff.index(p) for p in hosts]
    context = []
    for i, name in enumerate(stuff):
        if name in groups:
            continue
        if hosted and i < min(hosted):
            options = _ABOVE_PHRASES.get(name, (f"below the {name}",))
        elif hosted and i > max(hosted):
            options = (f"above the {name}", f"over the {name}")
        else:
            options = (f"near the {name}", f"with the {name} in between")
        context.append(str(rng.choice(options)))
    prefix = str(rng.choice(_PREFIXES))
    style = int(rng.integers(3)) if len(clauses) == 1 else 0
    if not clauses:  # only at sizes too small to show any thing
        return prefix + "the " + " and the ".join(stuff)
    place, items = clauses[0]
    if style == 1:  # stuff first: "the grass with a red ball, under a blue sky"
        return prefix + f"the {place} with {items}" + "".join(", " + c for c in context)
    if style == 2 and context:  # context first (no "a photo of"): "under a blue sky, a red ball on the grass"
        return ", ".join(context) + f", {items} {rng.choice(_PREPOSITIONS[place])}"
    body = _join([f"{items} {rng.choice(_PREPOSITIONS[place])}" for place, items in clauses])
    return prefix + body + "".join(" " + c for c in context)
