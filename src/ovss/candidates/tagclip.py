"""TagCLIP: a training-free multi-label tagger on a frozen CLIP ViT (tagclip.md; linyq2117/TagCLIP @ c32b640).

The official code produced the published tags, so it is followed step for step, quirks included (they can be
switched off with `official_quirks=False`). It runs on a transformers `CLIPModel` through this module's own
vision loop, because transformers' layers use SDPA and drop the attention weights DMAR needs, and its position
interpolation is bicubic where TagCLIP's is bilinear and fp16-rounded.

Stages (tagclip.md §3): coarse patch classification with a self-only last block -> DMAR (attention votes and
per-class boxes) -> CWR (masked-CLS re-classification of a crop per confident class) -> midpoint selection.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from ovss.candidates.clip_filter import CLIP_MEAN, CLIP_STD, IMAGENET_TEMPLATES, class_text_features
from ovss.features import normalise
from ovss.models.devices import model_device_dtype

#: §3.1: the 5 scene templates appended to OpenAI's 80 ImageNet templates.
SCENE_TEMPLATES: tuple[str, ...] = (
    "there is a {} in the scene.", "there is the {} in the scene.", "this is a {} in the scene.",
    "this is the {} in the scene.", "this is one {} in the scene.",
)
TAGCLIP_TEMPLATES: tuple[str, ...] = IMAGENET_TEMPLATES + SCENE_TEMPLATES
#: sha256 prefix of the 85 templates joined by "\n" (tagclip.md §3.1).
TEMPLATES_SHA256_PREFIX = "f87d863dc7a96d46"

#: §3.1: the official VOC background words; COCO's 23 are these minus the two that are COCO classes.
VOC_BACKGROUND: tuple[str, ...] = (
    "ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "river", "sea", "railway",
    "railroad", "keyboard", "helmet", "cloud", "house", "mountain", "ocean", "road", "rock", "street", "valley",
    "bridge", "sign",
)

SELF_MASK = -100.0     # §2: last-block logit mask off the diagonal (main pass only)
CWR_CLS_MASK = -1000.0  # §3.4: CLS-query mask outside the class region (all blocks, crops only)
MIN_VOTES = 4          # §3.3: an affinity pair must stand out in at least 4 of the 12 layers
CWR_KEEP = 0.5         # §3.4: min-max level that defines the class region
CWR_BLEND = 0.5        # §3.4: score = 0.5 * DMAR score + 0.5 * crop probability


@dataclass(frozen=True)
class TagCLIPPreset:
    """Per-dataset settings (tagclip.md §3.6).

    avg_layers: (start, stop) slice of block indices averaged into Ahat; (-4, -1) is blocks 8–10 of 12.
    cwr_ratio / select_ratio: midpoint ratios of the CWR candidate threshold τ and of the final selection θ.
    auto_background: whether background="auto" adds the §3.1 background words (COCO-Stuff uses none).
    """

    avg_layers: tuple[int, int] = (-4, -1)
    cwr_ratio: float = 0.5
    select_ratio: float = 0.5
    auto_background: bool = True


PRESETS: dict[str, TagCLIPPreset] = {
    "default": TagCLIPPreset(),
    "voc": TagCLIPPreset(),
    "coco": TagCLIPPreset(),
    "context": TagCLIPPreset(),  # project default: no official Context support exists
    "coco_stuff": TagCLIPPreset(avg_layers=(0, -1), cwr_ratio=0.1, select_ratio=0.1, auto_background=False),
}


def get_preset(preset: str | TagCLIPPreset) -> TagCLIPPreset:
    if isinstance(preset, TagCLIPPreset):
        return preset
    try:
        return PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown TagCLIP preset {preset!r}; valid: {', '.join(PRESETS)}") from None


def background_words(classes: Sequence[str]) -> list[str]:
    """The VOC-25 words minus any that equal a class name or one whitespace-separated word of one.

    This rule reproduces both official lists (VOC 25, COCO 23) and gives 13 words for Context-59.
    """
    taken = {w.lower() for c in classes for w in [c, *c.split()]}
    return [w for w in VOC_BACKGROUND if w not in taken]


def resolve_background(classes: Sequence[str], background: Sequence[str] | str, preset: TagCLIPPreset
                       ) -> list[str]:
    if isinstance(background, str):
        if background == "auto":
            return background_words(classes) if preset.auto_background else []
        if background == "none":
            return []
        raise ValueError(f'background must be "auto", "none" or a list of words, not {background!r}')
    return list(background)


# -- image side ------------------------------------------------------------------------------------------

def preprocess(image: Image.Image, patch: int = 16, max_tokens: int | None = None) -> torch.Tensor:
    """(1, 3, ⌈H/p⌉·p, ⌈W/p⌉·p) normalised float32: PIL bicubic resize up to a multiple of the patch size.

    No crop, padding or size cap (official); `max_tokens` optionally shrinks the grid, keeping the aspect
    ratio, to at most that many patches.
    """
    w, h = image.size
    hp, wp = math.ceil(h / patch), math.ceil(w / patch)
    if max_tokens is not None and hp * wp > max_tokens:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        scale = math.sqrt(max_tokens / (hp * wp))
        while hp * wp > max_tokens:
            hp, wp = max(1, math.ceil(h * scale / patch)), max(1, math.ceil(w * scale / patch))
            scale *= 0.99
    rgb = image.convert("RGB").resize((wp * patch, hp * patch), Image.BICUBIC)
    x = torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float().div(255)
    return normalise(x[None], CLIP_MEAN, CLIP_STD)


def resize_position_table(table: torch.Tensor, hp: int, wp: int) -> torch.Tensor:
    """Bilinear (align_corners=False, no antialias) resize of a (1+n², D) table's grid; the CLS row is kept."""
    n = math.isqrt(table.shape[0] - 1)
    grid = table[1:].T.reshape(1, -1, n, n)
    grid = F.interpolate(grid, size=(hp, wp), mode="bilinear", align_corners=False)
    return torch.cat([table[:1], grid.reshape(table.shape[1], hp * wp).T])


def position_table(vision_model: Any, hp: int, wp: int, *, round_fp16: bool = True) -> torch.Tensor:
    """The position table for an hp×wp grid: the original at the native grid, else resized and fp16-rounded."""
    table = vision_model.embeddings.position_embedding.weight
    n = math.isqrt(table.shape[0] - 1)
    if (hp, wp) == (n, n):
        return table
    resized = resize_position_table(table, hp, wp)
    return resized.half().to(table.dtype) if round_fp16 else resized


def self_attention(attn: Any, h: torch.Tensor, mask: torch.Tensor | None = None, *,
                   need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CLIP attention with an additive logit mask; optionally the head-mean softmax **before** the mask.

    Returns (out_proj output (B, L, D), recorded attention (B, L, L) or None). Without weights it uses SDPA.
    """
    b, n, d = h.shape
    heads, hd = attn.num_heads, attn.head_dim
    q, k, v = (proj(h).view(b, n, heads, hd).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    if need_weights:
        logits = ((q * attn.scale) @ k.transpose(-1, -2)).float()
        record = logits.softmax(-1).mean(1)
        probs = (logits if mask is None else logits + mask.float()).softmax(-1)
        out = probs.to(v.dtype) @ v
    else:
        record = None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask.to(q.dtype),
                                             scale=attn.scale)
    return attn.out_proj(out.transpose(1, 2).reshape(b, n, d)), record


def vision_tokens(model: Any, pixels: torch.Tensor, *, masks: Sequence[torch.Tensor | None] | None = None,
                  record: Callable[[int, torch.Tensor], None] | None = None, round_fp16: bool = True
                  ) -> torch.Tensor:
    """`visual_projection(post_layernorm(x))` for **every** token (B, L, E) of a CLIPModel's vision tower.

    masks[i] is added to block i's logits; record(i, attention) receives each block's unmasked head-mean
    attention. With neither, this equals transformers' vision forward.
    """
    vm = model.vision_model
    emb = vm.embeddings
    _, dtype = model_device_dtype(model)
    patches = emb.patch_embedding(pixels.to(dtype))
    b, _, hp, wp = patches.shape
    x = torch.cat([emb.class_embedding.expand(b, 1, -1), patches.flatten(2).transpose(1, 2)], dim=1)
    x = vm.pre_layrnorm(x + position_table(vm, hp, wp, round_fp16=round_fp16))
    for i, layer in enumerate(vm.encoder.layers):
        out, att = self_attention(layer.self_attn, layer.layer_norm1(x), None if masks is None else masks[i],
                                  need_weights=record is not None)
        if record is not None:
            record(i, att)
        x = x + out
        x = x + layer.mlp(layer.layer_norm2(x))
    return model.visual_projection(vm.post_layernorm(x))


@torch.no_grad()
def main_pass(model: Any, pixels: torch.Tensor, preset: TagCLIPPreset, *, round_fp16: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Main pass on one image: (L2-normalised tokens (L, E) float32, Ahat (P, P) float32).

    The last block attends self-only (mask −100 off the diagonal, CLS included); votes and the layer average
    are accumulated on the fly from the unmasked recorded attention, patch rows/columns only, without
    renormalisation.
    """
    layers = model.vision_model.encoder.layers
    n_layers = len(layers)
    device, dtype = model_device_dtype(model)
    patch = model.vision_model.config.patch_size
    n_tok = 1 + (pixels.shape[-2] // patch) * (pixels.shape[-1] // patch)
    avg = set(range(n_layers)[slice(*preset.avg_layers)])
    if not avg:
        raise ValueError(f"preset averages no layers of a {n_layers}-block model")
    votes = torch.zeros(n_tok - 1, n_tok - 1, dtype=torch.int16, device=device)
    acc = torch.zeros(n_tok - 1, n_tok - 1, dtype=torch.float32, device=device)

    def record(i: int, att: torch.Tensor) -> None:
        a = att[0, 1:, 1:]
        votes.add_(a > a.mean())
        if i in avg:
            acc.add_(a)

    self_mask = torch.full((n_tok, n_tok), SELF_MASK, dtype=dtype, device=device).fill_diagonal_(0.0)
    masks = [None] * (n_layers - 1) + [self_mask]
    tokens = vision_tokens(model, pixels.to(device), masks=masks, record=record, round_fp16=round_fp16)[0]
    ahat = (votes >= MIN_VOTES) * (acc / len(avg))
    return F.normalize(tokens.float(), dim=-1), ahat


# -- DMAR ------------------------------------------------------------------------------------------------

def box_mask(cam: np.ndarray, *, clamp: bool = True) -> np.ndarray:
    """Union of the boxes of the 8-connected components of a class map above its mean (tagclip.md §3.3).

    The map is min-max scaled, cut to uint8 and thresholded at floor(255·mean) (OpenCV semantics). Box ends
    are clamped to H−1 / W−1 as in the official code (`clamp`), so the last row and column never belong to a
    box. A map that is not positive anywhere, or constant, gives no box.
    """
    cam = np.asarray(cam, dtype=np.float32)
    out = np.zeros(cam.shape, dtype=bool)
    if cam.size == 0 or not cam.max() > 0:
        return out
    x = cam - cam.min()
    rng = x.max()
    if not rng > 0:
        return out
    x = x / rng
    u8 = np.floor(x * 255).astype(np.uint8)
    threshold = np.floor(255 * x.mean())
    labels, _ = ndimage.label(u8 > threshold, structure=np.ones((3, 3), dtype=bool))
    h, w = cam.shape
    for rows, cols in ndimage.find_objects(labels):
        y1, x1 = (min(rows.stop, h - 1), min(cols.stop, w - 1)) if clamp else (rows.stop, cols.stop)
        out[rows.start:y1, cols.start:x1] = True
    return out


def refine(ahat: torch.Tensor, p0: torch.Tensor, grid: tuple[int, int], *, clamp: bool = True
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DMAR: (R1, boxes (P, K) bool, R2) with R1 = Ahat·P0 and R2 = Ahat·(P0 ⊙ boxes), all K columns."""
    r1 = ahat @ p0
    cams = r1.T.reshape(-1, *grid).cpu().numpy()
    boxes = torch.from_numpy(np.stack([box_mask(c, clamp=clamp).reshape(-1) for c in cams], axis=1))
    boxes = boxes.reshape(r1.shape).to(p0.device)
    return r1, boxes, ahat @ (p0 * boxes)


# -- CWR -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CropPlan:
    """One CWR re-identification: class index, patch box [y1, y2) × [x1, x2), kept 14×14 tokens (row-major)."""

    cls: int
    rows: tuple[int, int]
    cols: tuple[int, int]
    keep: torch.Tensor


def cwr_plan(r2: torch.Tensor, scores: torch.Tensor, n_fg: int, grid: tuple[int, int], *, ratio: float = 0.5,
             crop_grid: int = 14, official_quirks: bool = True) -> list[CropPlan]:
    """Crops for the foreground classes scoring above τ = min + ratio·(max − min) of the whole R2.

    A degenerate box (the class region only in the last patch row or column, after clamping) ends CWR for
    every later candidate, as in the official code; with official_quirks=False it is skipped instead and
    boxes are not clamped.
    """
    hp, wp = grid
    tau = r2.min() + ratio * (r2.max() - r2.min())
    plans = []
    for c in range(n_fg):
        if not scores[c] > tau:
            continue
        col = r2[:, c]
        lo, hi = col.min(), col.max()
        region = ((col - lo) / (hi - lo) > CWR_KEEP).view(hp, wp) if hi > lo else col.new_zeros(hp, wp).bool()
        rows, cols = region.any(1).nonzero().flatten().tolist(), region.any(0).nonzero().flatten().tolist()
        y1 = rows[0] if rows else 0
        x1 = cols[0] if cols else 0
        y2, x2 = (rows[-1] + 1, cols[-1] + 1) if rows else (0, 0)
        if official_quirks:
            y2, x2 = min(y2, hp - 1), min(x2, wp - 1)
        if y1 >= y2 or x1 >= x2:
            if official_quirks:
                break
            continue
        sub = region[y1:y2, x1:x2][None, None].float()
        keep = F.interpolate(sub, size=(crop_grid, crop_grid), mode="nearest")[0, 0].reshape(-1) > 0.5
        plans.append(CropPlan(c, (y1, y2), (x1, x2), keep.cpu()))
    return plans


def cwr_mask(keep: torch.Tensor) -> torch.Tensor:
    """(L, L) additive mask: only the CLS query row, −1000 at the dropped patch keys; CLS→CLS stays 0."""
    n_tok = keep.numel() + 1
    mask = torch.zeros(n_tok, n_tok)
    mask[0, 1:][~keep] = CWR_CLS_MASK
    return mask


@torch.no_grad()
def cwr_scores(model: Any, pixels: torch.Tensor, plans: Sequence[CropPlan], text: torch.Tensor,
               scores: torch.Tensor) -> torch.Tensor:
    """Blend each planned class's score 50/50 with its probability on the masked-CLS crop (all crops batched)."""
    out = scores.clone()
    if not plans:
        return out
    device, dtype = model_device_dtype(model)
    vm = model.vision_model
    size, patch = vm.config.image_size, vm.config.patch_size
    crops = torch.cat([
        F.interpolate(pixels[:, :, patch * p.rows[0]:patch * p.rows[1], patch * p.cols[0]:patch * p.cols[1]],
                      size=(size, size), mode="bilinear", align_corners=False)
        for p in plans])
    masks = torch.stack([cwr_mask(p.keep) for p in plans])[:, None].to(device=device, dtype=dtype)
    cls = vision_tokens(model, crops.to(device), masks=[masks] * len(vm.encoder.layers))[:, 0]
    probs = (model.logit_scale.exp().float() * F.normalize(cls.float(), dim=-1) @ text.T).softmax(-1)
    for i, p in enumerate(plans):
        out[p.cls] = (1 - CWR_BLEND) * out[p.cls] + CWR_BLEND * probs[i, p.cls].to(out.device)
    return out


# -- selection and the public entry points ---------------------------------------------------------------

def select_tags(scores: torch.Tensor, ratio: float = 0.5) -> list[int]:
    """Indices with score > min + ratio·(max − min), strictly, ascending; [argmax] if none passes."""
    if scores.numel() == 0:
        return []
    theta = scores.min() + ratio * (scores.max() - scores.min())
    tags = (scores > theta).nonzero().flatten().tolist()
    return tags or [int(scores.argmax())]


@dataclass
class TagCLIPTrace:
    """Every intermediate of one image (tagclip.md §3 notation), for stage-by-stage parity checks."""

    pixels: torch.Tensor
    grid: tuple[int, int]
    text: torch.Tensor
    p0: torch.Tensor
    ahat: torch.Tensor
    r1: torch.Tensor
    boxes: torch.Tensor
    r2: torch.Tensor
    dmar_scores: torch.Tensor
    plans: list[CropPlan]
    scores: torch.Tensor
    labels: list[int]


@torch.no_grad()
def trace(model: Any, image: Image.Image, text: torch.Tensor, n_fg: int, preset: TagCLIPPreset, *,
          official_quirks: bool = True, max_tokens: int | None = None) -> TagCLIPTrace:
    """Run TagCLIP on one image against precomputed text rows (n_fg foreground rows first, then background)."""
    vm = model.vision_model
    patch = vm.config.patch_size
    pixels = preprocess(image, patch, max_tokens)
    grid = (pixels.shape[-2] // patch, pixels.shape[-1] // patch)
    feats, ahat = main_pass(model, pixels, preset, round_fp16=official_quirks)
    p0 = (model.logit_scale.exp().float() * feats[1:] @ text.T).softmax(-1)
    r1, boxes, r2 = refine(ahat, p0, grid, clamp=official_quirks)
    dmar_scores = r2[:, :n_fg].max(0).values
    plans = cwr_plan(r2, dmar_scores, n_fg, grid, ratio=preset.cwr_ratio,
                     crop_grid=vm.config.image_size // patch, official_quirks=official_quirks)
    scores = cwr_scores(model, pixels, plans, text, dmar_scores)
    return TagCLIPTrace(pixels, grid, text, p0, ahat, r1, boxes, r2, dmar_scores, plans, scores,
                        select_tags(scores, preset.select_ratio))


def _text_rows(clip: Any, classes: Sequence[str], background: Sequence[str] | str, preset: TagCLIPPreset
               ) -> torch.Tensor:
    names = list(classes) + resolve_background(classes, background, preset)
    return class_text_features(clip, names, TAGCLIP_TEMPLATES)


def tag(clip: Any, image: Image.Image, classes: Sequence[str], background: Sequence[str] | str = "auto", *,
        preset: str | TagCLIPPreset = "default", official_quirks: bool = True, max_tokens: int | None = None
        ) -> tuple[list[int], torch.Tensor]:
    """(selected class indices ascending, per-class final scores (len(classes),) float32 on the CPU).

    Pass the official prompt spellings (diningtable, pottedplant, tvmonitor, ...) to reproduce the published
    tags; indices map back to any display names. background: "auto" (§3.1 rule), "none" or a word list.
    """
    cfg = get_preset(preset)
    if not classes:
        return [], torch.zeros(0)
    out = trace(clip.model, image, _text_rows(clip, classes, background, cfg), len(classes), cfg,
                official_quirks=official_quirks, max_tokens=max_tokens)
    return out.labels, out.scores.cpu()


def tag_many(clip: Any, images: Sequence[Image.Image], classes: Sequence[str],
             background: Sequence[str] | str = "auto", *, preset: str | TagCLIPPreset = "default",
             official_quirks: bool = True, max_tokens: int | None = None) -> list[list[int]]:
    """`tag` for each image (one image per pass: sizes differ), sharing the text features."""
    cfg = get_preset(preset)
    if not classes:
        return [[] for _ in images]
    text = _text_rows(clip, classes, background, cfg)
    return [trace(clip.model, im, text, len(classes), cfg, official_quirks=official_quirks,
                  max_tokens=max_tokens).labels for im in images]
