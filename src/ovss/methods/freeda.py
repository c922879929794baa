"""FreeDA: retrieval of diffusion-generated DINOv2 prototypes, superpixel-level local scores mixed with a
CLIP global score (Barsellotti et al., CVPR 2024; official code aimagelab/freeda, inference only).

Defaults reproduce the official inference (freeda.md §4, §5): seven templates averaged raw then normalised,
K = 350 exact cosine neighbours, the plain mean of the retrieved raw prototypes, Felzenszwalb superpixels on
each crop, DINOv2-L at 518², region pooling with bilinear `align_corners=True` point sampling (regions that
miss every sample point keep the dense score), local = sigmoid(cos), global = raw CLIP cosine per crop,
s = 0.8·l + 0.2·g, 448/224 sliding windows. The bank comes from `ovss bank build` or `ovss bank convert`
(ovss.banks); docs/methods/freeda.md lists every option.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ovss.banks.bank import Bank
from ovss.banks.index import HNSW_EF_SEARCH, KeyIndex, open_index
from ovss.candidates.clip_filter import CLIP_MEAN, CLIP_STD
from ovss.dense.labels import labels_with_background, labels_without_background, resize_scores
from ovss.dense.superpixels import felzenszwalb_params, pool_regions, region_weights, superpixels
from ovss.dense.windows import resize_image, resize_short_side, slide_inference
from ovss.features import dinov2_patch_tokens, normalise
from ovss.methods.base import Method, SegmentRequest
from ovss.registry import register
from ovss.result import Segmentation
from ovss.text.nouns import singular

log = logging.getLogger(__name__)

#: The seven templates of the official configs, used for class queries and (assumed) for bank keys.
FREEDA_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.", "a bad photo of a {}.", "a origami {}.", "a photo of the large {}.", "a {} in a video game.",
    "art of the {}.", "a photo of the small {}.",
)
#: K retrieved keys per class (paper §4.1).
K = 350
#: β of Eq. 5 in every official config (the paper's text says 0.7 for VOC; spec §5 row 1, trap 2).
BETA = 0.8
#: The official configs' background threshold (freeda.md §4 step 10: almost never fires; calibrate it).
BG_THRESHOLD = 0.4
#: Class-embedding normalisation guard of the official code.
TEXT_NORM_EPS = 1e-6
_TEXT_CHUNK = 256

Aggregation = Literal["mean_embedding", "mean_similarity", "max_similarity"]


# ---------------------------------------------------------------------------------------------------
# Encoders (shared with the bank builder, which must embed keys exactly as queries are embedded)
# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def clip_text_raw(clip: Any, texts: Sequence[str]) -> torch.Tensor:
    """Projected CLIP text embeddings (N, E) float32, unnormalised; every text padded/truncated to 77 tokens
    (as open_clip tokenises), so an embedding never depends on the other texts of its batch."""
    model, tok = clip.model, clip.tokenizer
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(texts), _TEXT_CHUNK):
        enc = tok(list(texts[i:i + _TEXT_CHUNK]), padding="max_length", max_length=77, truncation=True,
                  return_tensors="pt")
        feats = model.get_text_features(input_ids=enc["input_ids"].to(device),
                                        attention_mask=enc["attention_mask"].to(device)).pooler_output
        out.append(feats.float().cpu())
    return torch.cat(out) if out else torch.zeros(0, model.config.projection_dim)


def class_embeddings(clip: Any, names: Sequence[str], templates: Sequence[str] = FREEDA_TEMPLATES) -> torch.Tensor:
    """T (N, E): the mean of the raw template embeddings of each name, normalised once (spec §4 step 1, trap 3)."""
    raw = clip_text_raw(clip, [t.format(n) for n in names for t in templates])
    return F.normalize(raw.view(len(names), len(templates), -1).mean(1), dim=-1, eps=TEXT_NORM_EPS)


@torch.no_grad()
def clip_image_embedding(clip: Any, pixels: torch.Tensor, antialias: bool = False) -> torch.Tensor:
    """Normalised CLIP image embeddings (B, E) of images (B, 3, H, W) in [0, 1], squashed to the model's size
    with bicubic, align_corners=False, no antialiasing and no clamping (spec §4 step 5, trap 6)."""
    model = clip.model
    p = next(model.parameters())
    side = model.config.vision_config.image_size
    x = F.interpolate(pixels.float(), size=(side, side), mode="bicubic", align_corners=False, antialias=antialias)
    x = normalise(x, CLIP_MEAN, CLIP_STD)
    feats = model.get_image_features(pixel_values=x.to(device=p.device, dtype=p.dtype)).pooler_output
    return F.normalize(feats.float().cpu(), dim=-1)


# ---------------------------------------------------------------------------------------------------
# Scoring arithmetic (pure functions, tested against the spec's formulas)
# ---------------------------------------------------------------------------------------------------
def aggregate_scores(features: torch.Tensor, prototypes: list[torch.Tensor], mode: Aggregation) -> torch.Tensor:
    """Cosine scores (M, N) of M feature vectors against N classes, each class given by its retrieved
    prototypes (n_c, D) (finite rows only).

    mean_embedding (Eq. 4, default): cos(x, mean_k p_k), the mean of the *raw* prototypes (trap 4).
    mean_similarity / max_similarity (Table 5): mean / max over k of cos(x, p_k).
    """
    x = F.normalize(features.float(), dim=-1)
    if mode == "mean_embedding":
        centres = torch.stack([p.float().mean(0) for p in prototypes])
        return x @ F.normalize(centres, dim=-1).T
    if mode not in ("mean_similarity", "max_similarity"):
        raise ValueError(f"unknown aggregation {mode!r}")
    cols = []
    for p in prototypes:
        sims = x @ F.normalize(p.float(), dim=-1).T
        cols.append(sims.mean(1) if mode == "mean_similarity" else sims.max(1).values)
    return torch.stack(cols, dim=1)


def activation(cos: torch.Tensor, kind: str) -> torch.Tensor:
    """The local activation: sigmoid(cos) in the official code, the plain cosine as the paper writes it."""
    return torch.sigmoid(cos) if kind == "sigmoid" else cos


def region_local_scores(labels: np.ndarray, dense: torch.Tensor, region: torch.Tensor, covered: torch.Tensor,
                        uncovered: str = "dense") -> torch.Tensor:
    """Per-pixel local scores (N, h, w): a pixel takes its superpixel's score (region (R, N)) when that region
    is covered, else the dense score (dense (N, h, w)); `uncovered="nearest_region"` gives it the score of
    the spatially nearest pixel of a covered region instead."""
    lab = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    pixel_covered = covered[lab]
    per_pixel = region.T[:, lab]  # (N, h, w)
    if uncovered == "nearest_region" and bool(pixel_covered.any()) and not bool(pixel_covered.all()):
        from scipy.ndimage import distance_transform_edt

        _, (iy, ix) = distance_transform_edt(~pixel_covered.numpy(), return_indices=True)
        nearest = lab[torch.from_numpy(iy), torch.from_numpy(ix)]
        return region.T[:, nearest]
    return torch.where(pixel_covered[None], per_pixel, dense)


def mix_scores(local: torch.Tensor, global_: torch.Tensor, beta: float = BETA) -> torch.Tensor:
    """Eq. 5: s = β·l + (1−β)·g, with g (N,) broadcast over the crop."""
    return beta * local + (1 - beta) * global_.view(-1, 1, 1).to(local)


#: OpenAI CLIP's learned logit scale (it trained into its clamp, 100): the CLIP that BETA was set with.
OPENAI_CLIP_LOGIT_SCALE = 100.0


def temperature_matched_beta(logit_scale: float, beta: float = BETA,
                             reference: float = OPENAI_CLIP_LOGIT_SCALE) -> float:
    """β for a CLIP of another temperature that keeps Eq. 5's balance between the local and the global term.

    The global term is a raw cosine, and how far apart a CLIP's class cosines lie for the same confidence goes as
    1 / its logit scale (softmax over scale·cos): a CLIP with scale 18 spreads them 5.5x wider than OpenAI's, so
    at the paper's β its global term outweighs the local one. Scaling the global weight's odds (1 − β) / β by
    logit_scale / reference puts the two terms back in the paper's proportion."""
    odds = (1 - beta) / beta * logit_scale / reference
    return 1 / (1 + odds)


# ---------------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------------
@dataclass
class FreeDAConfig:
    """Every field defaults to the official inference (freeda.md §5 lists the paper-style options)."""

    bank: str | None = None  # folder of a bank made by `ovss bank build` / `ovss bank convert`
    k: int = K
    beta: float = BETA
    aggregation: Aggregation = "mean_embedding"
    superpixel: Literal["felzenszwalb", "slic", "watershed", "none"] = "felzenszwalb"
    felzenszwalb: str | tuple[float, ...] = "default"  # preset (dataset key) or (scale, sigma, min_size)
    region_pool: Literal["bilinear", "area"] = "bilinear"
    uncovered: Literal["dense", "nearest_region"] = "dense"
    local_activation: Literal["sigmoid", "identity"] = "sigmoid"
    global_scope: Literal["crop", "image"] = "crop"
    clip_antialias: bool = False
    index: Literal["auto", "flat", "hnsw"] = "auto"  # auto: the index saved beside the bank, else exact
    hnsw_ef_search: int = HNSW_EF_SEARCH
    templates: tuple[str, ...] = FREEDA_TEMPLATES
    bg_threshold: float = BG_THRESHOLD  # on the mixed score; a class wins only when its score is above it
    dino_size: int = 518
    short_side: int | None = 448  # segment(): image resized to this short side (None: as given), then
    crop: int = 448  # cut into crop² windows at this stride (the TCL protocol)
    stride: int = 224

    def __post_init__(self) -> None:
        self.templates = tuple(self.templates)
        if not isinstance(self.felzenszwalb, str):
            self.felzenszwalb = tuple(self.felzenszwalb)
        felzenszwalb_params(self.felzenszwalb)
        for name, allowed in (
                ("aggregation", ("mean_embedding", "mean_similarity", "max_similarity")),
                ("superpixel", ("felzenszwalb", "slic", "watershed", "none")), ("region_pool", ("bilinear", "area")),
                ("uncovered", ("dense", "nearest_region")), ("local_activation", ("sigmoid", "identity")),
                ("global_scope", ("crop", "image")), ("index", ("auto", "flat", "hnsw"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"freeda: {name}={getattr(self, name)!r}; choose one of {allowed}")
        if self.k < 1 or self.crop < 1 or self.stride < 1:
            raise ValueError("freeda: k, crop and stride must be >= 1")


@dataclass
class Vocabulary:
    """What one class list costs once (spec §4 steps 1-3): T, the retrieved prototypes, retrieval stats."""

    names: list[str]
    text: torch.Tensor  # (N, E) normalised
    prototypes: list[torch.Tensor]  # per class (n_c, Dv): finite retrieved prototypes
    stats: dict[str, dict[str, float]] = field(default_factory=dict)


@register("freeda")
class FreeDA(Method):
    """FreeDA. `segment(image, classes)` labels the image over `classes` with the bank given as `bank=DIR`."""

    Config = FreeDAConfig
    roles = ("dinov2", "clip")  # the "diffusion" role is used by `ovss bank build` only
    cuda_dtype = "float32"
    paper_protocol = "tcl"

    def __init__(self, config: FreeDAConfig, models=None, *, device=None, dtype=None) -> None:
        if config.bank is None:
            raise ValueError("freeda needs a bank: bank='DIR' (build one with `ovss bank build`, or convert the "
                             "authors' release with `ovss bank convert`; see docs/methods/freeda.md)")
        self.bank = Bank(config.bank)  # before the models load: a wrong path fails in a second
        super().__init__(config, models, device=device, dtype=dtype)
        self._check_bank()
        self.index: KeyIndex = open_index(self.bank, kind=None if config.index == "auto" else config.index,
                                          ef_search=config.hnsw_ef_search)
        self._vocab: dict[tuple[str, ...], Vocabulary] = {}

    def _check_bank(self) -> None:
        clip, dino = self.models["clip"].model, self.models["dinov2"].model
        if self.bank.key_dim != clip.config.projection_dim or self.bank.proto_dim != dino.config.hidden_size:
            raise ValueError(f"freeda: the bank holds {self.bank.key_dim}-d keys and {self.bank.proto_dim}-d "
                             f"prototypes, the models give {clip.config.projection_dim}-d CLIP and "
                             f"{dino.config.hidden_size}-d DINOv2 features: use the models it was built with "
                             f"({self.bank.models})")
        for role in ("clip", "dinov2"):
            ours = self.models.fingerprint(role)  # source, plus a weights digest for folders (as the build records)
            if role in self.bank.models and self.bank.models[role] != ours:
                log.warning("freeda: the bank's %s is %r but this run uses %r: keys and queries must come from "
                            "the same model (trap: retrieval is meaningless otherwise)", role,
                            self.bank.models[role], ours)

    # -- per vocabulary ---------------------------------------------------------------------------------
    def vocabulary(self, classes: Sequence[str]) -> Vocabulary:
        """T, the retrieved finite prototypes per class, and retrieval stats (cached per class list)."""
        key = tuple(classes)
        if key not in self._vocab:
            self._vocab[key] = self._build_vocabulary(list(classes))
        return self._vocab[key]

    def _build_vocabulary(self, names: list[str]) -> Vocabulary:
        cfg = self.config
        text = class_embeddings(self.models["clip"], names, cfg.templates)
        scores, ids = self.index.search(text.numpy(), cfg.k)
        protos, stats = [], {}
        nouns = {singular(n) for n in self.bank.noun_counts}
        for c, name in enumerate(names):
            row = ids[c]
            end = int(np.argmax(row < 0)) if (row < 0).any() else len(row)  # a list stops at the first −1
            valid = row[:end]
            p = torch.from_numpy(self.bank.prototypes(valid)) if end else torch.zeros(0, self.bank.proto_dim)
            finite = torch.isfinite(p).all(1)
            if not bool(finite.any()):
                raise ValueError(f"freeda: class {name!r} retrieved no finite prototype from {self.bank.root}")
            protos.append(p[finite])
            stats[name] = {"retrieved": int(finite.sum()), "top1": float(scores[c, 0]),
                           "last": float(scores[c, end - 1])}
            if nouns and not any(singular(w) in nouns for w in name.lower().split()):
                log.warning("freeda: %r never occurs as a noun in the bank; its prototypes come from related "
                            "nouns only (top-1 key similarity %.3f)", name, scores[c, 0])
        return Vocabulary(names, text, protos, stats)

    # -- per crop ---------------------------------------------------------------------------------------
    def global_scores(self, pixels: torch.Tensor, vocab: Vocabulary) -> torch.Tensor:
        """g (N,): raw cosine between CLIP's embedding of the image (3, H, W) in 0–255 and each class."""
        img = clip_image_embedding(self.models["clip"], pixels[None] / 255.0, self.config.clip_antialias)
        return (img @ vocab.text.T)[0]

    @torch.no_grad()
    def score_crop(self, crop: Image.Image | torch.Tensor, classes: Sequence[str], *,
                   global_scores: torch.Tensor | None = None) -> torch.Tensor:
        """Mixed scores s (N, h, w) of one crop (a PIL image, or a (3, h, w) tensor with values 0–255).

        global_scores: g for `global_scope="image"` (one CLIP pass on the whole image); the eval runner's
        window path calls this without it, which only the default per-crop scope supports.
        """
        cfg = self.config
        x = (torch.from_numpy(np.asarray(crop.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)
             if isinstance(crop, Image.Image) else crop.float())
        vocab = self.vocabulary(list(classes))
        if global_scores is None:
            if cfg.global_scope == "image":
                raise ValueError("freeda: global_scope='image' needs the whole image's CLIP scores; use segment()")
            global_scores = self.global_scores(x, vocab)
        h, w = x.shape[-2:]
        # The scoring arithmetic after DINOv2 is small (1369 patches, a few hundred regions): CPU.
        feats = dinov2_patch_tokens(self.models["dinov2"], x[None].cpu() / 255.0, cfg.dino_size)[0].cpu()  # (g, g, D)
        g = feats.shape[0]
        flat = feats.reshape(g * g, -1)
        dense = activation(aggregate_scores(flat, vocab.prototypes, cfg.aggregation), cfg.local_activation)
        dense = F.interpolate(dense.T.reshape(1, -1, g, g), size=(h, w), mode="bilinear", align_corners=True)[0]
        labels = superpixels(x.permute(1, 2, 0).cpu().numpy(), cfg.superpixel, felzenszwalb=cfg.felzenszwalb)
        if labels is None:
            local = dense
        else:
            weights = region_weights(labels, (g, g), cfg.region_pool)
            covered = weights.sum(1) > 0
            region = activation(aggregate_scores(pool_regions(flat, weights), vocab.prototypes, cfg.aggregation),
                                cfg.local_activation)
            local = region_local_scores(labels, dense, region, covered, cfg.uncovered)
        return mix_scores(local, global_scores, cfg.beta)

    # -- whole images -----------------------------------------------------------------------------------
    def _segment_batch(self, images: list[Image.Image], request: SegmentRequest) -> list[Segmentation]:
        given = request.given or [None] * len(images)
        return [self._segment_one(im, request, g) for im, g in zip(images, given)]

    @torch.no_grad()
    def _segment_one(self, image: Image.Image, request: SegmentRequest, given: list[str] | None = None
                     ) -> Segmentation:
        """given: this image's candidate list (e.g. ground-truth labels); other classes score 0 and never win."""
        cfg, names = self.config, request.classes
        vocab = self.vocabulary(names)
        work = image if cfg.short_side is None else resize_image(
            image, resize_short_side(image.size, cfg.short_side), "mmcv_bilinear")
        x = torch.from_numpy(np.asarray(work.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)
        g = self.global_scores(x, vocab) if cfg.global_scope == "image" else None
        canvas = slide_inference(lambda crop: self.score_crop(crop, names, global_scores=g), x, cfg.crop,
                                 cfg.stride, len(names))
        if given is not None:
            excluded = torch.tensor([n not in given for n in names])
            canvas[excluded] = 0
        size_hw = (image.height, image.width)
        scores = resize_scores(canvas, size_hw)
        if given is not None:  # a copy: resize_scores returns its input when the size already matches
            scores = scores.clone()
            scores[excluded] = torch.finfo(scores.dtype).min
        meta = {"method": self.name, "bank": str(self.bank.root), "k": cfg.k, "retrieval": vocab.stats,
                "candidates": [n for n in names if given is None or n in given]}
        if request.background:
            tau = request.threshold(cfg.bg_threshold)
            labels = labels_with_background(scores, tau, ties="background").numpy()
            low = torch.cat([torch.full((1, *canvas.shape[1:]), tau), canvas])
            meta["bg_threshold"] = tau
            return Segmentation(labels, low.numpy(), request.output_classes, meta)
        return Segmentation(labels_without_background(scores).numpy(), canvas.numpy(), list(names), meta)
