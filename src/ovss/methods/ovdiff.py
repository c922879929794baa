"""OVDiff: segmentation by matching dense features against prototypes built from generated support sets
(Karazija et al., ECCV 2024; official code karazijal/sdov). Spec: ovdiff.md.

Offline, per class: sample N = 32 Stable Diffusion images of "A good picture of a ⟨class⟩", read the class
tokens' cross-attention (DAAM) to split each into foreground and background, and pool frozen features (SD
`to_q` queries at t = 200, DINO keys, CLIP keys) into class / instance / K-means part prototypes. The
prototypes live in a cache on disk (ovss.banks.prototypes) and serve every vocabulary that contains the class.
Online: a CLIP category pre-filter, a "stuff" filter on background prototypes, cosine matching over sliding
windows for every extractor, averaged; background wins where a background prototype matches best.

CutLER (the paper's default Γ) needs detectron2 and a checkpoint outside the hub, so the default masks are the
paper's attention-only variant (multi-Otsu thresholds); `mask_source="sam"` puts transformers' SAM in
CutLER's place with the official instance-weighting rule. docs/methods/ovdiff.md lists every option.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from ovss.attention import attention_layers
from ovss.banks.prototypes import ClassPrototypes, PrototypeCache, SupportSet, shard_classes
from ovss.candidates.clip_filter import CLIP_MEAN, CLIP_STD, encode_texts
from ovss.data.names import NAME_SETS
from ovss.dense.kmeans import kmeans
from ovss.dense.labels import labels_with_background, labels_without_background, resize_scores
from ovss.dense.sam import SAM_IOU, SAM_NMS, SAM_POINTS, SAM_STABILITY, sam_instances
from ovss.dense.windows import resize_image, resize_short_side_truncate, window_set
from ovss.diffusion.sampling import sample
from ovss.features import clip_keys, normalise, unet_queries, vit_keys
from ovss.methods.base import Method, SegmentRequest
from ovss.models.devices import model_device_dtype
from ovss.registry import register
from ovss.result import Segmentation
from ovss.text.classes import validate_classes

log = logging.getLogger(__name__)

# -- the paper's constants (ovdiff.md §3, §4) -----------------------------------------------------------------
SUPPORT_PROMPT = "A good picture of a {}"
NEGATIVE_PROMPT = "text, low quality, blurry, cartoon, meme, low resolution, bad, poor, faded"
N_SUPPORT = 32
SUPPORT_BATCH = 8  # the official noise is drawn batch by batch, so image k depends on this
SUPPORT_SEED = 42  # one CPU generator per class, the same seed for every class
SAMPLING_STEPS = 30
GUIDANCE = 8.0
#: fixed thresholds on the 512² attribution: Γ found no instance / multi-Otsu failed (fg above, bg below)
FG_FIXED, BG_FIXED = 0.5, 0.2
MINMAX_EPS = 1e-6  # denominator clamp of the attribution min-max
NORM_EPS = 1e-6  # norm clamp of prototype / feature L2 normalisation
SD_TIMESTEP = 200
SD_NOISE_SEED = 43
#: `to_q` of these attn2 layers (…transformer_blocks.0.attn2), concatenated in this order: 7680-d in SD-1.5
SD_LAYERS = ("down_blocks.0.attentions.0", "mid_block.attentions.0", "up_blocks.1.attentions.0",
             "up_blocks.1.attentions.1", "up_blocks.1.attentions.2", "up_blocks.2.attentions.0",
             "up_blocks.2.attentions.1", "up_blocks.2.attentions.2", "up_blocks.3.attentions.2")
CLIP_KEY_LAYER = 10  # keys of block index 10 of 12
K_PARTS = 32
FILTER_ETA = 10  # at most η classes survive the filter's probability cut
STUFF_THRESHOLD = 0.85
WINDOWS = (448, 336)
STRIDE = 224
SHORT_SIDE = 448
SD_WINDOW = None  # None: the UNet's native size (512 for SD)
CLIP_WINDOW = 448
DINO_MAX_SIDE, DINO_LONG_CAP = 448, 800
THRESHOLD_BACKGROUND = 0.72  # fg cosine threshold of the no-background-prototype ablation (grid-searched)

#: the paper's ChatGPT "stuff" answer as encoded in the official code (Tab. C.9); every other name is a thing
STUFF_CLASSES = frozenset({
    "background", "bedclothes", "ceiling", "cloth", "curtain", "fence", "floor", "grass", "ground", "mountain",
    "platform", "road", "rock", "sidewalk", "sky", "snow", "track", "wall", "water", "wood", "step", "trade name",
    "lake", "blanket", "tray", "glass"})

#: every known OVDiff class-name fix (VOC + the ADE/Context overlay), from the shared name tables
CLASS_NAME_FIXES = {k: v for table in NAME_SETS["ovdiff"].renames.values() for k, v in table.items()}

EXTRACTOR_ROLES = {"sd": "diffusion", "dino": "dino", "clip": "clip"}
PROTOTYPE_KINDS = ("mean", "instance", "part")


@dataclass
class OVDiffConfig:
    """Defaults follow the official code (ovdiff.md §5 "Default" column); §6 ablations are options."""

    # where prototypes live; None: $OVSS_CACHE/ovdiff, else ~/.cache/ovss/ovdiff
    cache_dir: str | None = None
    build_missing: bool = True  # build prototypes of classes missing from the cache on first use
    # -- support sets --
    n_support: int = N_SUPPORT
    support_batch: int = SUPPORT_BATCH
    sampling_batch_size: int | None = None  # prompts per UNet call; None: support_batch (results do not depend on it)
    steps: int = SAMPLING_STEPS
    guidance: float = GUIDANCE
    negative_prompt: str = NEGATIVE_PROMPT
    prompt_template: str = SUPPORT_PROMPT
    scheduler: Literal["dpmsolver++", "ddim", "default"] = "dpmsolver++"
    seed: int = SUPPORT_SEED
    seed_mode: Literal["same", "per_class"] = "same"  # per_class: seed + a hash of the class name
    support_noise: Literal["official", "per_image"] = "official"  # one generator per class, or seed+k per image
    support_size: int | None = None  # support images are support_size²; None: the UNet's native size (512)
    attention_upsample: Literal["bicubic", "bilinear"] = "bicubic"  # DAAM: bicubic to the latent grid, clamp 0
    keep_images: bool = False  # also store the support PNGs (then new extractors need no resampling)
    class_name_fixes: bool = True
    mask_source: Literal["attention", "sam"] = "attention"
    cutler_fallback: Literal["fixed", "multiotsu"] = "fixed"  # mask_source="sam" with no instance found
    bg_refine: bool = True  # bg ∧ (A512 < 0.2), eroded once (the official code); False: the paper's rule
    sam_points_per_side: int = SAM_POINTS
    sam_pred_iou_thresh: float = SAM_IOU
    sam_stability_thresh: float = SAM_STABILITY
    sam_nms_thresh: float = SAM_NMS
    sam_points_batch: int = 64
    # -- features and prototypes --
    feature_extractors: tuple[str, ...] = ("sd", "dino", "clip")
    sd_layers: tuple[str, ...] = SD_LAYERS
    sd_timestep: int = SD_TIMESTEP
    sd_noise_seed: int | None = SD_NOISE_SEED  # None: the global RNG (the official inference behaviour)
    clip_layer: int = CLIP_KEY_LAYER
    k_parts: int = K_PARTS
    mask_resize: Literal["bilinear", "nearest"] = "bilinear"  # bilinear then non-zero (the official growth)
    feature_batch_size: int = 8
    # -- inference --
    short_side: int | None = SHORT_SIDE  # LANCZOS resize before windowing; None: use the image as given
    windows: tuple[int, ...] = WINDOWS
    stride: int = STRIDE
    whole_image_window: bool = True
    sd_window_size: int | None = SD_WINDOW
    clip_window_size: int = CLIP_WINDOW
    dino_max_side: int = DINO_MAX_SIDE
    dino_long_cap: int = DINO_LONG_CAP
    category_filter: bool = True
    filter_eta: int = FILTER_ETA
    filter_logit_scale: float = 1.0  # softmax of raw cosines (official); the paper's CLIP would use 100
    stuff_bypass_filter: bool = True
    filter_bg_prototypes: bool = True  # unselected classes lose their bg prototypes too
    stuff_classes: tuple[str, ...] | None = None  # None: the paper's list (STUFF_CLASSES)
    stuff_filter: bool = True
    stuff_threshold: float = STUFF_THRESHOLD
    stuff_filter_mode: Literal["stuff_fg", "all_fg"] = "stuff_fg"
    stuff_bg: bool = False  # stuff classes also contribute background prototypes
    stuff_parts: bool = True
    prototypes: tuple[str, ...] = PROTOTYPE_KINDS
    background: Literal["prototypes", "threshold"] = "prototypes"
    bg_threshold: float = THRESHOLD_BACKGROUND  # background="threshold" only
    final_threshold: float | None = 0.0  # scores ≤ this are zeroed before the argmax; None: plain argmax

    def __post_init__(self) -> None:
        choices = {"scheduler": ("dpmsolver++", "ddim", "default"), "seed_mode": ("same", "per_class"),
                   "support_noise": ("official", "per_image"), "attention_upsample": ("bicubic", "bilinear"),
                   "mask_source": ("attention", "sam"), "cutler_fallback": ("fixed", "multiotsu"),
                   "mask_resize": ("bilinear", "nearest"), "stuff_filter_mode": ("stuff_fg", "all_fg"),
                   "background": ("prototypes", "threshold")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"ovdiff: {name}={getattr(self, name)!r}; choose one of {allowed}")
        for name in ("feature_extractors", "sd_layers", "windows", "prototypes", "stuff_classes"):
            value = getattr(self, name)  # a single --set value arrives as a scalar, a list as a list
            if value is not None:
                setattr(self, name, (value,) if isinstance(value, (str, int)) else tuple(value))
        bad = [e for e in self.feature_extractors if e not in EXTRACTOR_ROLES]
        if bad or not self.feature_extractors:
            raise ValueError(f"ovdiff: feature_extractors {self.feature_extractors}; "
                             f"choose from {tuple(EXTRACTOR_ROLES)}")
        bad = [p for p in self.prototypes if p not in PROTOTYPE_KINDS]
        if bad or not self.prototypes:
            raise ValueError(f"ovdiff: prototypes {self.prototypes}; choose from {PROTOTYPE_KINDS}")
        if not self.windows and not self.whole_image_window:
            raise ValueError("ovdiff: windows=() needs whole_image_window=True (nothing would be scored)")
        if self.n_support < 1 or self.support_batch < 1 or self.k_parts < 1 or self.filter_eta < 1:
            raise ValueError("ovdiff: n_support, support_batch, k_parts and filter_eta must be >= 1")


# ---------------------------------------------------------------------------------------------------------
# Prompt and tokens (§3 step 1)
# ---------------------------------------------------------------------------------------------------------
def target_token_positions(tokenizer, prompt: str, name: str) -> list[int]:
    """Positions (BOS = 0) of `name`'s sub-tokens in `prompt`: the first occurrence of its first sub-token,
    then as many consecutive positions as the name has sub-tokens (so "picture frame" attaches to the
    "picture" of "A good picture of a ...", as in the official code)."""
    ids = list(tokenizer(prompt)["input_ids"])[:77]
    name_ids = list(tokenizer(name, add_special_tokens=False)["input_ids"])
    if not name_ids:
        raise ValueError(f"class name {name!r} produces no tokens")
    if name_ids[0] not in ids:
        raise ValueError(f"class name {name!r} is not found in the prompt {prompt!r} (truncated?)")
    start = ids.index(name_ids[0])
    positions = list(range(start, start + len(name_ids)))
    if positions[-1] >= 77:
        raise ValueError(f"class name {name!r} runs past the 77-token limit in {prompt!r}")
    return positions


# ---------------------------------------------------------------------------------------------------------
# Attribution and masks (§3 steps 4-5)
# ---------------------------------------------------------------------------------------------------------
def minmax_maps(a: torch.Tensor) -> torch.Tensor:
    """Min-max each (h, w) map of (N, h, w), the denominator clamped at 1e-6 (official)."""
    lo = a.amin(dim=(-2, -1), keepdim=True)
    hi = a.amax(dim=(-2, -1), keepdim=True)
    return (a - lo) / (hi - lo).clamp(min=MINMAX_EPS)


def normalise_attribution(a: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (N, a, a) -> (A64 = min-max A, A512 = min-max of A64 upsampled bilinearly to size²)."""
    a64 = minmax_maps(a.float())
    up = F.interpolate(a64[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    return a64, minmax_maps(up)


def multiotsu_thresholds(a64: torch.Tensor) -> tuple[float, float]:
    """(t_bg, t_fg): 3-class multi-Otsu over all maps of the class jointly; (0.2, 0.5) if it fails."""
    from skimage.filters import threshold_multiotsu

    try:
        t = threshold_multiotsu(a64.detach().cpu().numpy().ravel(), classes=3)
    except ValueError:
        return BG_FIXED, FG_FIXED
    return float(t[0]), float(t[1])


def attention_masks(a512: torch.Tensor, thresholds: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """The −CutLER variant: fg = A512 > t_fg, bg = A512 < t_bg (thresholds from the 64² maps, trap 4)."""
    t_bg, t_fg = thresholds
    return a512 > t_fg, a512 < t_bg


def erode_cross(mask: torch.Tensor) -> torch.Tensor:
    """One binary erosion of an (H, W) mask with a 3×3 cross; outside the image counts as set."""
    m = F.pad(mask.float()[None, None], (1, 1, 1, 1), value=1.0)[0, 0] > 0
    return m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]


def instance_masks(instances: torch.Tensor, a512: torch.Tensor, *, fallback: tuple[float, float] = (BG_FIXED, FG_FIXED),
                   bg_refine: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The official promptable-Γ rule on one image: instances (R, H, W) bool, A512 (H, W) -> (fg, bg).

    Stack [no-instance region, instance_1..R], weight each by its mean attribution, sort by decreasing
    weight, give each pixel to the mask with the largest r·w_r (first in sorted order on ties). fg = pixels
    won by the top-weight mask; bg = pixels won by the last sorted mask that wins anywhere, then (bg_refine)
    ∧ A512 < 0.2 and eroded once. R = 0: fg = A512 > fallback[1], bg = A512 < fallback[0].
    """
    if instances.shape[0] == 0:
        return a512 > fallback[1], a512 < fallback[0]
    stack = torch.cat([~instances.any(0, keepdim=True), instances.bool()]).float()
    area = stack.sum(dim=(1, 2))
    weight = torch.nan_to_num((stack * a512).sum(dim=(1, 2)) / area, nan=0.0)
    order = torch.argsort(-weight, stable=True)
    winner = (stack[order] * weight[order][:, None, None]).argmax(0)
    fg = winner == 0
    bg = winner == int(winner.max())
    if bg_refine:
        bg = erode_cross(bg & (a512 < BG_FIXED))
    return fg, bg


# ---------------------------------------------------------------------------------------------------------
# Prototypes (§3 steps 7-8)
# ---------------------------------------------------------------------------------------------------------
def downsample_masks(masks: torch.Tensor, hw: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """(N, H, W) bool -> (N, h, w) bool. bilinear: resize (align_corners=False) then every non-zero cell is
    set, which grows masks slightly (official); nearest: pixel-centre nearest resize (as PIL)."""
    m = masks.float()[:, None]
    if mode == "nearest":
        return F.interpolate(m, size=hw, mode="nearest-exact")[:, 0] > 0.5
    return F.interpolate(m, size=hw, mode="bilinear", align_corners=False)[:, 0] > 0


def _side_prototypes(vectors: list[torch.Tensor], dim: int, k: int, seed: int) -> tuple[torch.Tensor, ...]:
    """(mean [1|0, D], instances [n, D], parts [≤K, D]) of one side (fg or bg) from per-image vectors."""
    empty = torch.zeros(0, dim)
    everything = torch.cat(vectors) if vectors else empty
    if everything.shape[0] == 0:
        return empty, empty, empty
    mean = everything.mean(0, keepdim=True)
    inst = torch.stack([v.mean(0) if len(v) else torch.full((dim,), float("nan"), device=v.device) for v in vectors])
    inst = inst[torch.isfinite(inst).all(1)]
    parts = kmeans(everything, min(k, everything.shape[0]), seed=seed).centers
    return mean.cpu(), inst.cpu(), parts.cpu()


def class_prototypes(fg_vectors: list[torch.Tensor], bg_vectors: list[torch.Tensor], *, dim: int,
                     k_parts: int = K_PARTS, seed: int = 0) -> ClassPrototypes:
    """Class mean (all selected vectors of all images), one mean per image (empty -> dropped), and K-means
    parts on the raw vectors, for fg and bg; unnormalised float32."""
    fg = _side_prototypes(fg_vectors, dim, k_parts, seed)
    bg = _side_prototypes(bg_vectors, dim, k_parts, seed)
    return ClassPrototypes(*fg, *bg)


@dataclass
class PrototypeBank:
    """One extractor's prototypes for a vocabulary: protos (2 = [bg, fg], C, n_max, D) L2-normalised, valid
    (2, C, n_max) marks real rows (padding and removed prototypes are invalid)."""

    protos: torch.Tensor
    valid: torch.Tensor


def _kinds(p: ClassPrototypes, side: str, kinds: Sequence[str], parts: bool) -> torch.Tensor:
    rows = {"mean": getattr(p, f"{side}_mean"), "instance": getattr(p, f"{side}_inst"),
            "part": getattr(p, f"{side}_parts")}
    return torch.cat([rows[k].float() for k in PROTOTYPE_KINDS if k in kinds and (k != "part" or parts)])


def assemble_prototypes(per_class: Sequence[ClassPrototypes], is_stuff: Sequence[bool], *,
                        kinds: Sequence[str] = PROTOTYPE_KINDS, background: bool = True, stuff_filter: bool = True,
                        threshold: float = STUFF_THRESHOLD, mode: str = "stuff_fg", stuff_bg: bool = False,
                        stuff_parts: bool = True) -> PrototypeBank:
    """§4 step 2: fg set = [class, instances, parts] (as `kinds` selects); bg likewise, none for stuff classes.

    Stuff filter ("stuff_fg"): a thing class keeps a bg prototype only if its cosine to every fg prototype of
    every stuff class is ≤ threshold; a class with a single bg prototype keeps it (official early return).
    "all_fg": every class's bg prototypes (stuff classes keep theirs) against all *other* classes' fg ones.
    """
    dim = per_class[0].dim if per_class else 0
    fg = [_kinds(p, "fg", kinds, stuff_parts or not s) for p, s in zip(per_class, is_stuff)]
    keep_bg = [background and (stuff_bg or mode == "all_fg" or not s) for s in is_stuff]
    bg = [_kinds(p, "bg", kinds, stuff_parts or not s) if k else torch.zeros(0, dim)
          for p, s, k in zip(per_class, is_stuff, keep_bg)]
    if stuff_filter and background:
        unit = [F.normalize(f, dim=-1, eps=NORM_EPS) for f in fg]
        for c in range(len(bg)):
            if bg[c].shape[0] <= 1:
                continue
            if mode == "stuff_fg":
                if is_stuff[c]:
                    continue
                ref = [unit[j] for j in range(len(fg)) if is_stuff[j]]
            else:
                ref = [unit[j] for j in range(len(fg)) if j != c]
            ref_t = torch.cat(ref) if ref else torch.zeros(0, dim)
            if ref_t.shape[0] == 0:
                continue
            cos = F.normalize(bg[c], dim=-1, eps=NORM_EPS) @ ref_t.T
            bg[c] = bg[c][cos.amax(1) <= threshold]
    n_max = max([1] + [x.shape[0] for x in fg + bg])
    protos = torch.zeros(2, len(per_class), n_max, dim)
    valid = torch.zeros(2, len(per_class), n_max, dtype=torch.bool)
    for side, sets in ((0, bg), (1, fg)):
        for c, rows in enumerate(sets):
            protos[side, c, :rows.shape[0]] = F.normalize(rows, dim=-1, eps=NORM_EPS)
            valid[side, c, :rows.shape[0]] = True
    return PrototypeBank(protos, valid)


# ---------------------------------------------------------------------------------------------------------
# Matching (§4 step 4)
# ---------------------------------------------------------------------------------------------------------
def match_scores(features: torch.Tensor, bank: PrototypeBank, selected: torch.Tensor, *, background: bool = True,
                 filter_bg: bool = True, class_chunk: int = 32) -> torch.Tensor:
    """features (D, h, w) -> scores (background + C, h, w): [max_c bg[c], fg[1..C]] with fg[c] / bg[c] the
    best cosine over c's fg / bg prototypes. Padding and removed prototypes, and every prototype of a class
    the filter did not select (its bg ones too unless filter_bg=False), count as −1."""
    d, h, w = features.shape
    f = F.normalize(features.float().reshape(d, h * w), dim=0, eps=NORM_EPS)
    protos = bank.protos.to(f.device)
    valid = bank.valid.to(f.device)
    sel = selected.to(f.device).bool()
    n_classes = protos.shape[1]
    fg_best = torch.empty(n_classes, h * w, device=f.device)
    bg_best = torch.full((h * w,), -1.0, device=f.device)
    for c0 in range(0, n_classes, class_chunk):
        cs = slice(c0, c0 + class_chunk)
        cos = torch.einsum("scnd,dp->scnp", protos[:, cs], f)
        ok = valid[:, cs].clone()
        ok[1] &= sel[cs, None]
        if filter_bg:
            ok[0] &= sel[cs, None]
        cos = torch.where(ok[..., None], cos, torch.full_like(cos, -1.0))
        best = cos.amax(2)  # (2, c, hw)
        fg_best[cs] = best[1]
        if background and best.shape[1]:
            bg_best = torch.maximum(bg_best, best[0].amax(0))
    out = torch.cat([bg_best[None], fg_best]) if background else fg_best
    return out.reshape(-1, h, w)


def decide(scores: torch.Tensor, final_threshold: float | None) -> torch.Tensor:
    """§4 step 7: scores ≤ threshold are zeroed, then argmax over [background, classes]; ties (including
    all-zero pixels) go to the lower index, i.e. background. None: plain argmax."""
    if final_threshold is not None:
        scores = torch.where(scores > final_threshold, scores, torch.zeros_like(scores))
    return scores.argmax(0)


# ---------------------------------------------------------------------------------------------------------
# Category filter (§4 step 1)
# ---------------------------------------------------------------------------------------------------------
def subset_prompts(names: Sequence[str]) -> list[tuple[list[int], str]]:
    """Every non-empty subset of `names` (positions into it, kept in the given order) as "a X and a Y"."""
    out = []
    for mask in range(1, 2 ** len(names)):
        members = [j for j in range(len(names)) if mask >> j & 1]
        out.append((members, " and ".join(f"a {names[j]}" for j in members)))
    return out


@torch.no_grad()
def category_filter(clip, image: Image.Image, names: Sequence[str], is_stuff: Sequence[bool], *,
                    eta: int = FILTER_ETA, logit_scale: float = 1.0, stuff_bypass: bool = True,
                    filter_size: int = 512) -> list[int]:
    """Indices (ascending) of the classes the CLIP pre-filter keeps for `image` (the working image).

    p = softmax(scale · cos(image, "a {name}")) over the non-stuff candidates; keep p ≥ 1/|candidates|, at
    most η (most probable first); then the subset whose "a X and a Y" prompt is closest to the image wins.
    Stuff classes bypass the filter. No candidate at all: everything is kept (a project guard).
    """
    cand = [i for i in range(len(names)) if not (stuff_bypass and is_stuff[i])]
    always = [i for i in range(len(names)) if stuff_bypass and is_stuff[i]]
    if not cand:
        return list(range(len(names)))
    model = clip.model
    device, dtype = model_device_dtype(model)
    side = model.config.vision_config.image_size
    sq = np.asarray(image.convert("RGB").resize((filter_size, filter_size), Image.LANCZOS), dtype=np.float32) / 255
    x = torch.from_numpy(sq).permute(2, 0, 1)[None].to(device)
    x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=False)
    x = normalise(x, CLIP_MEAN, CLIP_STD).to(dtype)
    img = F.normalize(model.get_image_features(pixel_values=x).pooler_output.float(), dim=-1)[0]
    texts = encode_texts(clip, [f"a {names[i]}" for i in cand])
    p = torch.softmax(logit_scale * (texts @ img), dim=0)
    kept = [j for j in range(len(cand)) if float(p[j]) >= 1.0 / len(cand)]
    if len(kept) > eta:
        kept = sorted(kept, key=lambda j: -float(p[j]))[:eta]
    kept_idx = [cand[j] for j in kept]
    subsets = subset_prompts([names[i] for i in kept_idx])
    sims = encode_texts(clip, [s for _, s in subsets]) @ img
    best = subsets[int(sims.argmax())][0]
    return sorted({kept_idx[j] for j in best} | set(always))


# ---------------------------------------------------------------------------------------------------------
# Windows (§4 steps 3-5)
# ---------------------------------------------------------------------------------------------------------
def _resize_tensor(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(3, h, w) -> (3, H, W), bilinear, no antialias (the official tensor resizes)."""
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    return F.interpolate(x[None], size=hw, mode="bilinear", align_corners=False, antialias=False)[0]


def _lanczos_tensor(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """PIL LANCZOS on float channels (mode "F"), for DINO's resize to a multiple of the patch size."""
    chans = [np.asarray(Image.fromarray(c.cpu().numpy().astype(np.float32), "F").resize((hw[1], hw[0]), Image.LANCZOS))
             for c in x]
    return torch.from_numpy(np.stack(chans)).to(x.device)


@register("ovdiff")
class OVDiff(Method):
    """OVDiff. `segment(image, classes)` labels every pixel with a class or background; prototypes of classes
    missing from the cache are built first (minutes per class on a GPU; `ovss prototypes build` does it ahead)."""

    Config = OVDiffConfig
    roles = ("diffusion", "dino", "clip", "sam")
    cuda_dtype = "float16"
    default_batch_size = 1
    paper_protocol = "ovdiff"
    own_geometry = True  # LANCZOS to short side 448, windows 448/336 + whole image, inside segment()
    name_set = "ovdiff"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        root = self.config.cache_dir or Path(os.environ.get("OVSS_CACHE", "~/.cache/ovss")) / "ovdiff"
        self.cache = PrototypeCache(root)
        self._class_protos: dict[tuple[str, str], ClassPrototypes] = {}
        self._banks: dict[tuple, dict[str, PrototypeBank]] = {}

    def required_roles(self) -> tuple[str, ...]:
        cfg = self.config
        roles = {EXTRACTOR_ROLES[e] for e in cfg.feature_extractors}
        if cfg.category_filter:
            roles.add("clip")
        if cfg.build_missing:
            roles.add("diffusion")
        if cfg.mask_source == "sam" and cfg.build_missing:
            roles.add("sam")
        return tuple(sorted(roles))

    # -- names and keys ------------------------------------------------------------------------------------
    def prompt_name(self, name: str) -> str:
        return CLASS_NAME_FIXES.get(name, name) if self.config.class_name_fixes else name

    def is_stuff(self, name: str) -> bool:
        stuff = STUFF_CLASSES if self.config.stuff_classes is None else frozenset(self.config.stuff_classes)
        return name.lower() in {s.lower() for s in stuff}

    @property
    def support_size(self) -> int:
        return self.config.support_size or self.models["diffusion"].native_resolution

    def class_seed(self, name: str) -> int:
        if self.config.seed_mode == "same":
            return self.config.seed
        return self.config.seed + int(hashlib.sha256(name.encode("utf-8")).hexdigest()[:8], 16)

    def support_settings(self, name: str) -> dict:
        """Everything that changes a class's support set (the cache key of its folder)."""
        cfg = self.config
        s = {"prompt": cfg.prompt_template.format(self.prompt_name(name)),
             "diffusion": self.models.fingerprint("diffusion"),
             "dtype": str(self.models.dtype_of("diffusion")), "scheduler": cfg.scheduler, "steps": cfg.steps,
             "guidance": float(cfg.guidance), "negative_prompt": cfg.negative_prompt, "n_support": cfg.n_support,
             "support_batch": cfg.support_batch, "seed": self.class_seed(name), "support_noise": cfg.support_noise,
             "size": self.support_size, "attention_upsample": cfg.attention_upsample, "mask_source": cfg.mask_source}
        if cfg.mask_source == "sam":
            s.update(sam=self.models.fingerprint("sam"), sam_points_per_side=cfg.sam_points_per_side,
                     sam_pred_iou_thresh=cfg.sam_pred_iou_thresh, sam_stability_thresh=cfg.sam_stability_thresh,
                     sam_nms_thresh=cfg.sam_nms_thresh, cutler_fallback=cfg.cutler_fallback, bg_refine=cfg.bg_refine)
        return s

    def extractor_settings(self, extractor: str) -> dict:
        """Everything that changes one extractor's prototypes given the support set."""
        cfg = self.config
        s = {"model": self.models.fingerprint(EXTRACTOR_ROLES[extractor]), "k_parts": cfg.k_parts,
             "mask_resize": cfg.mask_resize, "kmeans": "torch-lloyd-kmeans++", "kmeans_seed": 0}
        if extractor == "sd":
            s.update(dtype=str(self.models.dtype_of("diffusion")), layers=list(cfg.sd_layers),
                     timestep=cfg.sd_timestep, noise_seed=cfg.sd_noise_seed)
        elif extractor == "clip":
            s.update(layer=cfg.clip_layer)
        return s

    # -- offline: support sets and prototypes --------------------------------------------------------------
    def build_prototypes(self, classes: Sequence[str] | str, *, shard: tuple[int, int] | None = None,
                         progress: bool = False) -> dict[str, str]:
        """Make sure every class (of this shard) has prototypes in the cache: class -> "cached" | "built".

        Classes already complete are not touched; a class interrupted mid-build is redone from its last
        complete stage (its support set when the images were kept, else from sampling).
        """
        names = shard_classes(validate_classes(classes), shard)
        status = {}
        overall = tqdm(names, desc="ovdiff prototypes", unit="class", disable=not progress, position=0)
        for name in overall:
            overall.set_postfix_str(name, refresh=False)
            status[name] = self._ensure_class(name, progress)
        return status

    def _ensure_class(self, name: str, progress: bool) -> str:
        cfg = self.config
        ss = self.support_settings(name)
        missing = [e for e in cfg.feature_extractors
                   if not self.cache.has_prototypes(name, ss, e, self.extractor_settings(e))]
        if not missing:
            return "cached"
        loaded = self.cache.load_support(name, ss)
        sampling = loaded is None or loaded[0].images is None
        n_batches = math.ceil(cfg.n_support / (cfg.sampling_batch_size or cfg.support_batch))
        total = (n_batches * cfg.steps if sampling else 0) + cfg.n_support * len(missing)
        with tqdm(total=total, desc=name, unit="step", leave=False, disable=not progress, position=1) as bar:
            if sampling:
                support, data = self._sample_support(name, bar.update)
                self.cache.save_support(name, ss, support, keep_images=cfg.keep_images, data=data)
            else:
                support = loaded[0]
            for extractor in missing:
                t0 = time.perf_counter()
                protos = self.support_prototypes(extractor, support, bar.update)
                self.cache.save_prototypes(name, ss, extractor, self.extractor_settings(extractor), protos,
                                           {"seconds": round(time.perf_counter() - t0, 3)})
        return "built"

    def _support_noise(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """Official: one CPU generator per class draws (support_batch, C, h, w) batch by batch."""
        cfg = self.config
        dtype = self.models["diffusion"].unet.dtype
        g = torch.Generator("cpu").manual_seed(self.class_seed(name))
        draws = [torch.randn((min(cfg.support_batch, cfg.n_support - s), *shape), generator=g, dtype=dtype)
                 for s in range(0, cfg.n_support, cfg.support_batch)]
        return torch.cat(draws).float()

    def _sample_support(self, name: str, tick: Callable[[int], object] | None = None) -> tuple[SupportSet, dict]:
        """§3 steps 1-5 for one class: sample, DAAM maps, fg/bg masks."""
        cfg = self.config
        dm = self.models["diffusion"]
        prompt_name = self.prompt_name(name)
        prompt = cfg.prompt_template.format(prompt_name)
        positions = target_token_positions(dm.tokenizer, prompt, prompt_name)
        size = self.support_size
        shape = (dm.unet.config.in_channels, size // dm.vae_factor, size // dm.vae_factor)
        cross_factors = sorted({f for kind, f in attention_layers(dm.unet).values() if kind == "cross"})
        noise = dict(latents=self._support_noise(name, shape)) if cfg.support_noise == "official" else dict(
            seeds=[self.class_seed(name) + k for k in range(cfg.n_support)])
        t0 = time.perf_counter()
        result = sample(dm, [prompt] * cfg.n_support, steps=cfg.steps, guidance=cfg.guidance,
                        negative_prompt=cfg.negative_prompt, scheduler=cfg.scheduler, height=size, width=size,
                        capture_cross=cross_factors, token_positions=[positions] * cfg.n_support,
                        upsample=cfg.attention_upsample, batch_size=cfg.sampling_batch_size or cfg.support_batch,
                        progress=tick, **noise)
        seconds = time.perf_counter() - t0
        attribution = torch.stack([m.mean(0) for m in result.cross])  # average over the name's sub-tokens
        a64, a512 = normalise_attribution(attribution, size)
        thresholds = multiotsu_thresholds(a64)
        data = {"prompt": prompt, "token_positions": positions, "seconds_sampling": round(seconds, 3),
                "multiotsu": list(thresholds)}
        if cfg.mask_source == "attention":
            fg, bg = attention_masks(a512, thresholds)
        else:
            fallback = thresholds if cfg.cutler_fallback == "multiotsu" else (BG_FIXED, FG_FIXED)
            fgs, bgs, counts = [], [], []
            for img, a in zip(result.images, a512):
                pil = Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), "RGB")
                inst = sam_instances(self.models["sam"], pil, points_per_side=cfg.sam_points_per_side,
                                     pred_iou_thresh=cfg.sam_pred_iou_thresh,
                                     stability_thresh=cfg.sam_stability_thresh, nms_thresh=cfg.sam_nms_thresh,
                                     points_batch=cfg.sam_points_batch)
                f_, b_ = instance_masks(inst, a, fallback=fallback, bg_refine=cfg.bg_refine)
                fgs.append(f_)
                bgs.append(b_)
                counts.append(int(inst.shape[0]))
            fg, bg = torch.stack(fgs), torch.stack(bgs)
            data["instances"] = counts
        data["empty_fg"] = int((~fg.flatten(1).any(1)).sum())
        # 8-bit, as the official support PNGs: features are then the same from memory or from kept files
        images = (result.images * 255).round() / 255
        return SupportSet(attribution, fg, bg, images), data

    def extract(self, extractor: str, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, D, h, w) float32 features of one named extractor."""
        cfg = self.config
        if extractor == "sd":
            return unet_queries(self.models["diffusion"], pixels.to(self.device), layers=cfg.sd_layers,
                                timestep=cfg.sd_timestep, noise_seed=cfg.sd_noise_seed)
        if extractor == "dino":
            return vit_keys(self.models["dino"], pixels)
        if extractor == "clip":
            return clip_keys(self.models["clip"], pixels, cfg.clip_layer)
        raise ValueError(f"unknown feature extractor {extractor!r}")

    def support_prototypes(self, extractor: str, support: SupportSet,
                           tick: Callable[[int], object] | None = None) -> ClassPrototypes:
        """§3 steps 6-8 for one extractor: features of every support image with a non-empty fg mask, pooled
        under the downsampled masks, into class / instance / part prototypes."""
        cfg = self.config
        if support.images is None:
            raise ValueError("support_prototypes needs the support images")
        keep = [i for i in range(support.fg.shape[0]) if bool(support.fg[i].any())]
        skipped = support.fg.shape[0] - len(keep)
        if tick is not None and skipped:
            tick(skipped)
        fg_vecs, bg_vecs = [], []
        dim = 0
        for s in range(0, len(keep), cfg.feature_batch_size):
            idx = keep[s:s + cfg.feature_batch_size]
            feats = self.extract(extractor, support.images[idx])
            dim = feats.shape[1]
            hw = tuple(feats.shape[-2:])
            fgm = downsample_masks(support.fg[idx], hw, cfg.mask_resize).to(feats.device)
            bgm = downsample_masks(support.bg[idx], hw, cfg.mask_resize).to(feats.device)
            flat = feats.flatten(2).transpose(1, 2)  # (b, hw, D)
            for j in range(len(idx)):
                fg_vecs.append(flat[j][fgm[j].flatten()])
                bg_vecs.append(flat[j][bgm[j].flatten()])
            if tick is not None:
                tick(len(idx))
        if not keep:
            dim = self._extractor_dim(extractor)
        return class_prototypes(fg_vecs, bg_vecs, dim=dim, k_parts=cfg.k_parts)

    def _extractor_dim(self, extractor: str) -> int:
        side = self.support_size
        return self.extract(extractor, torch.zeros(1, 3, side, side)).shape[1]

    # -- online --------------------------------------------------------------------------------------------
    def prototypes_for(self, names: Sequence[str], extractor: str) -> list[ClassPrototypes]:
        """Prototypes of `names` for one extractor, from memory, the cache, or built now (build_missing)."""
        todo = [n for n in names if (n, extractor) not in self._class_protos]
        if todo:
            missing = [n for n in todo if not self.cache.has_prototypes(
                n, self.support_settings(n), extractor, self.extractor_settings(extractor))]
            if missing and not self.config.build_missing:
                raise RuntimeError(f"ovdiff: no prototypes for {missing} in {self.cache.root}; build them with "
                                   f"`ovss prototypes build -c \"{','.join(missing)}\" --cache {self.cache.root}` "
                                   "or set build_missing=True")
            if missing:
                log.info("ovdiff: building prototypes for %d class(es) into %s", len(missing), self.cache.root)
                self.build_prototypes(missing)
            for n in todo:
                protos = self.cache.load_prototypes(n, self.support_settings(n), extractor,
                                                    self.extractor_settings(extractor))
                if protos is None:
                    raise RuntimeError(f"ovdiff: prototypes of {n!r} ({extractor}) vanished from {self.cache.root}")
                self._class_protos[(n, extractor)] = protos
        return [self._class_protos[(n, extractor)] for n in names]

    def banks(self, vocab: Sequence[str], background: bool) -> dict[str, PrototypeBank]:
        """Per extractor, the vocabulary's assembled prototypes (stuff filter and padding depend on it)."""
        key = (tuple(vocab), background)
        if key not in self._banks:
            cfg = self.config
            stuff = [self.is_stuff(n) for n in vocab]
            use_bg = background and cfg.background == "prototypes"
            self._banks[key] = {e: assemble_prototypes(
                self.prototypes_for(vocab, e), stuff, kinds=cfg.prototypes, background=use_bg,
                stuff_filter=cfg.stuff_filter, threshold=cfg.stuff_threshold, mode=cfg.stuff_filter_mode,
                stuff_bg=cfg.stuff_bg, stuff_parts=cfg.stuff_parts) for e in cfg.feature_extractors}
        return self._banks[key]

    def _window_input(self, extractor: str, crop: torch.Tensor) -> torch.Tensor:
        """§4 step 4: SD squashes to its size², CLIP to 448², DINO keeps ≤ 448 crops (else short side 448,
        long ≤ 800) and is brought to a multiple of its patch with LANCZOS."""
        cfg = self.config
        if extractor == "sd":
            side = cfg.sd_window_size or self.models["diffusion"].native_resolution
            return _resize_tensor(crop, (side, side))
        if extractor == "clip":
            return _resize_tensor(crop, (cfg.clip_window_size, cfg.clip_window_size))
        h, w = crop.shape[-2:]
        if max(h, w) > cfg.dino_max_side:
            s = min(cfg.dino_max_side / min(h, w), cfg.dino_long_cap / max(h, w))
            crop = _resize_tensor(crop, (int(h * s + 0.5), int(w * s + 0.5)))
            h, w = crop.shape[-2:]
        p = self.models["dino"].model.config.patch_size
        hw = (max(p, h // p * p), max(p, w // p * p))
        return crop if hw == (h, w) else _lanczos_tensor(crop, hw)

    @torch.no_grad()
    def score_image(self, image: Image.Image, vocab: Sequence[str], selected: torch.Tensor,
                    background: bool) -> torch.Tensor:
        """§4 steps 3-5 on the working image: the mean over (extractor, window) of clamped score maps,
        (background + C, H, W)."""
        cfg = self.config
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).to(self.device)
        h, w = x.shape[-2:]
        wins = window_set(h, w, cfg.windows, cfg.stride, whole_image=cfg.whole_image_window)
        banks = self.banks(vocab, background)
        use_bg = background and cfg.background == "prototypes"
        k = len(vocab) + use_bg
        canvas = torch.zeros(k, h, w, device=self.device)
        count = torch.zeros(h, w, device=self.device)
        for extractor in cfg.feature_extractors:
            inputs = [self._window_input(extractor, x[:, y1:y2, x1:x2]) for y1, y2, x1, x2 in wins]
            groups: dict[tuple[int, int], list[int]] = {}
            for i, t in enumerate(inputs):
                groups.setdefault(tuple(t.shape[-2:]), []).append(i)
            for idx in groups.values():
                for s in range(0, len(idx), cfg.feature_batch_size):
                    part = idx[s:s + cfg.feature_batch_size]
                    feats = self.extract(extractor, torch.stack([inputs[i] for i in part]))
                    for i, f in zip(part, feats):
                        y1, y2, x1, x2 = wins[i]
                        sc = match_scores(f, banks[extractor], selected, background=use_bg,
                                          filter_bg=cfg.filter_bg_prototypes)
                        sc = F.interpolate(sc[None], size=(y2 - y1, x2 - x1), mode="bilinear",
                                           align_corners=False)[0].clamp_(-1.0, 1.0)
                        canvas[:, y1:y2, x1:x2] += sc.to(canvas.device)
                        count[y1:y2, x1:x2] += 1
        return (canvas / count).cpu()

    def working_image(self, image: Image.Image) -> Image.Image:
        """§4 step 0: LANCZOS to short side 448 (torchvision's truncating rule); unchanged when already there."""
        if self.config.short_side is None:
            return image
        return resize_image(image, resize_short_side_truncate(image.size, self.config.short_side), "pil_lanczos")

    def select_classes(self, image: Image.Image, vocab: Sequence[str], given: Sequence[str] | None) -> list[int]:
        if given is not None:
            return [vocab.index(n) for n in given]
        if not self.config.category_filter:
            return list(range(len(vocab)))
        cfg = self.config
        return category_filter(self.models["clip"], image, [self.prompt_name(n) for n in vocab],
                               [self.is_stuff(n) for n in vocab], eta=cfg.filter_eta,
                               logit_scale=cfg.filter_logit_scale, stuff_bypass=cfg.stuff_bypass_filter)

    def _segment_batch(self, images: list[Image.Image], request: SegmentRequest) -> list[Segmentation]:
        cfg = self.config
        vocab = list(request.classes)
        out = []
        for i, image in enumerate(images):
            work = self.working_image(image)
            chosen = self.select_classes(work, vocab, None if request.given is None else request.given[i])
            selected = torch.zeros(len(vocab), dtype=torch.bool)
            selected[chosen] = True
            scores = self.score_image(work, vocab, selected, request.background)
            size_hw = (image.height, image.width)
            classes = request.output_classes
            meta = {"method": self.name, "selected": [vocab[j] for j in chosen],
                    "extractors": list(cfg.feature_extractors), "working_size": list(work.size)}
            if not request.background:
                labels = labels_without_background(resize_scores(scores, size_hw))
                out.append(Segmentation(labels.numpy(), scores.numpy(), classes, meta))
                continue
            if cfg.background == "threshold":
                tau = request.threshold(cfg.bg_threshold)
                labels = labels_with_background(resize_scores(scores, size_hw), tau, ties="background")
                scores = torch.cat([torch.full((1, *scores.shape[1:]), tau), scores])
                meta["bg_threshold"] = tau
            else:
                labels = decide(resize_scores(scores, size_hw), cfg.final_threshold)
            out.append(Segmentation(labels.numpy().astype(np.int64), scores.numpy(), classes, meta))
        return out
