"""The paper's model for every role of every method, and a lazy loader for one method's roles.

A method names roles ("diffusion", "captioner", ...), never checkpoints, so users swap any of them
(`models={"diffusion": "path/or/hub-id"}`) and tests swap all of them (`models="tiny"`).
"""
from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch

from ovss.models.devices import resolve_device, resolve_dtype
from ovss.models.loading import TOY_DIR, Component, load_component

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"    # the mirror of the withdrawn runwayml/stable-diffusion-v1-5
SD21_BASE = "stabilityai/stable-diffusion-2-1-base"
RF2_SD15 = "XCLIU/2_rectified_flow_from_sd_1_5"         # InstaFlow 2-RF, not XCLIU/instaflow_0_9B_from_sd_1_5
BLIP_LARGE = "Salesforce/blip-image-captioning-large"
CLIP_B16 = "openai/clip-vit-base-patch16"
CLIP_L14 = "openai/clip-vit-large-patch14"
DINO_B8 = "facebook/dino-vitb8"
DINOV2_L = "facebook/dinov2-large"
SAM_H = "facebook/sam-vit-huge"

#: method -> role -> (kind, paper hub id). FreeDA's ViT-B variant swaps in facebook/dinov2-base and
#: openai/clip-vit-base-patch16; OVDiff's default mask source (CutLER) is not on the hub, SAM is its ablation.
PRESETS: dict[str, dict[str, tuple[str, str]]] = {
    "faseg": {"diffusion": ("diffusion", RF2_SD15), "captioner": ("blip", BLIP_LARGE), "tagger": ("clip", CLIP_B16)},
    "diffsegmenter": {"diffusion": ("diffusion", SD15), "captioner": ("blip", BLIP_LARGE),
                      "filter": ("clip", CLIP_B16)},
    "ovdiff": {"diffusion": ("diffusion", SD15), "dino": ("dino", DINO_B8), "clip": ("clip", CLIP_B16),
               "sam": ("sam", SAM_H)},
    "freeda": {"diffusion": ("diffusion", SD21_BASE), "dinov2": ("dinov2", DINOV2_L), "clip": ("clip", CLIP_L14)},
}

#: models="toy": method -> role -> folder of the shipped toy models (ovss.models.loading.TOY_DIR). FA-Seg's
#: diffusion model is the rectified-flow UNet (its paper uses InstaFlow's 2-RF); the others use the ε UNet.
TOY_PRESETS: dict[str, dict[str, str]] = {
    "faseg": {"diffusion": "diffusion_rf", "captioner": "blip", "tagger": "clip"},
    "diffsegmenter": {"diffusion": "diffusion", "captioner": "blip", "filter": "clip"},
    "ovdiff": {"diffusion": "diffusion", "dino": "dino", "clip": "clip", "sam": "sam"},
    "freeda": {"diffusion": "diffusion", "dinov2": "dinov2", "clip": "clip"},
}

#: models="toy": config defaults that put a method's geometry at the toy world's scale (64-px images: the
#: 448-px crops, windows and strides of OVDiff's and FreeDA's protocols scaled by 1/7, DINO inputs at the toy
#: DINO's 64 px; OVDiff's SD layers are the same blocks of the toy UNet, which has 2 attentions per up block
#: where SD-1.5 has 3) and point FreeDA at the shipped toy bank. OVDiff's negative prompt ("text, low quality,
#: blurry, cartoon, ...") is made of words the toy text tower never saw, so here it is not "low quality" but
#: untrained embeddings, and guiding away from them left the toy UNet's support images without a single thing
#: (docs/toy-world.md); its toy counterpart is the empty prompt. FreeDA's β = 0.8 was set with OpenAI's CLIP
#: (logit scale 100); the toy CLIP's is 18.04, so its raw cosines, FreeDA's global term, spread 5.5x wider and
#: outweighed the local term (74 % of thing pixels went to a stuff class): the toy β is the temperature-matched
#: one (`freeda.temperature_matched_beta`, 0.957; tested against clip/'s weights), and FreeDA's background
#: threshold, which the paper leaves to calibrate, was calibrated on val scenes 50-79 (not the reported ones).
#: Options the caller passes win. FA-Seg and DiffSegmenter need none: they already work at the diffusion model's
#: native size.
TOY_CONFIG: dict[str, dict[str, object]] = {
    "ovdiff": {"short_side": 64, "windows": (64, 48), "stride": 32, "clip_window_size": 64, "dino_max_side": 64,
               "dino_long_cap": 114, "negative_prompt": "",
               "sd_layers": ("down_blocks.0.attentions.0", "mid_block.attentions.0", "up_blocks.1.attentions.0",
                             "up_blocks.1.attentions.1", "up_blocks.2.attentions.0", "up_blocks.2.attentions.1",
                             "up_blocks.3.attentions.1")},
    "freeda": {"bank": str(TOY_DIR / "freeda_bank"), "short_side": 64, "crop": 64, "stride": 32, "dino_size": 64,
               "beta": 0.957, "bg_threshold": 0.475},
}

#: Kinds the papers run in float32 whatever the diffusion dtype (TagCLIP, BLIP, OVDiff's and FreeDA's
#: DINO/CLIP features); only the diffusion models follow the method's dtype (fp16 on CUDA).
FULL_PRECISION_KINDS = frozenset({"clip", "blip", "dinov2", "dino", "sam"})

_SHORTCUTS = ("tiny", "toy", "random")
#: Folders up to this size are digested by content; bigger ones by file names and sizes (a 4 GB checkpoint
#: would take seconds to hash at every run).
_CONTENT_DIGEST_MAX_BYTES = 256 * 2**20


@functools.lru_cache(maxsize=32)
def folder_digest(folder: Path) -> str:
    """12 hex digits over the folder's files (relative names, sizes and, for small folders, contents)."""
    sizes = {p: p.stat().st_size for p in sorted(Path(folder).rglob("*")) if p.is_file()}
    by_content = sum(sizes.values()) <= _CONTENT_DIGEST_MAX_BYTES
    h = hashlib.sha256()
    for p, size in sizes.items():
        h.update(f"{p.relative_to(folder).as_posix()}\t{size}\n".encode())
        if by_content:
            h.update(p.read_bytes())
    return h.hexdigest()[:12]


class ModelSet:
    """Lazy, cached models for one method: `models[role]` loads a role on first access only.

    models: None -> the paper's hub ids (PRESETS); "tiny" -> seeded random tiny models; "toy" -> the shipped
    toy-world models; "random" -> full-size random-weight diffusion models (benchmarks; other roles then fail
    when loaded); a dict -> the preset with those roles replaced (hub id, local folder, "tiny", "toy", "random").
    dtype applies to the diffusion models; the other kinds load in float32 (FULL_PRECISION_KINDS) unless
    `dtypes` names a dtype for their role.
    """

    def __init__(self, method: str, models: None | str | Mapping[str, str] = None, *,
                 device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                 dtypes: Mapping[str, str | torch.dtype] | None = None) -> None:
        if method not in PRESETS:
            raise ValueError(f"no model preset for method {method!r}; methods with presets: {', '.join(PRESETS)}")
        preset = PRESETS[method]
        self.method = method
        self._kinds = {role: kind for role, (kind, _) in preset.items()}
        self._sources = {role: hub_id for role, (_, hub_id) in preset.items()}
        if isinstance(models, str):
            if models not in _SHORTCUTS:
                raise ValueError(f"models={models!r} is not understood: use None (the paper's models), "
                                 f"\"tiny\", \"toy\", \"random\" or a dict role -> hub id / local folder")
            self._sources = dict.fromkeys(preset, models)
        elif isinstance(models, Mapping):
            self._check_roles(models)
            self._sources.update({role: str(src) for role, src in models.items()})
        elif models is not None:
            raise TypeError(f"models must be None, a string or a dict, not {type(models).__name__}")
        self._check_roles(dtypes or {})
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self._dtypes = {role: resolve_dtype(dtypes[role], self.device) if dtypes and role in dtypes
                        else torch.float32 if kind in FULL_PRECISION_KINDS else self.dtype
                        for role, kind in self._kinds.items()}
        self._cache: dict[str, Component] = {}

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(self._kinds)

    def __getitem__(self, role: str) -> Component:
        if role not in self._cache:
            self._check_roles([role])
            source = self._sources[role]
            folder = self._toy_folder(role) if source == "toy" else role
            self._cache[role] = load_component(self._kinds[role], source, device=self.device,
                                               dtype=self._dtypes[role], role=folder)
        return self._cache[role]

    def _toy_folder(self, role: str) -> str:
        """The shipped toy folder that plays `role` for this method (TOY_PRESETS; default: the role's name)."""
        return TOY_PRESETS.get(self.method, {}).get(role, role)

    def is_loaded(self, role: str) -> bool:
        return role in self._cache

    def sources(self) -> dict[str, str]:
        """role -> source as given (hub id, folder, "tiny", "toy"), for reports."""
        return dict(self._sources)

    def fingerprint(self, role: str) -> str:
        """The role's source for cache keys: for weights in a folder ("toy", a local path) the source plus a
        digest of the folder's files, so cached prototypes are rebuilt when those weights change (a new ovss
        release's toy models, a re-trained local checkpoint); hub ids as given (a revision pins them)."""
        self._check_roles([role])
        source = self._sources[role]
        if source == "toy":
            folder = TOY_DIR / self._toy_folder(role)
        elif source not in _SHORTCUTS and Path(source).is_dir():
            folder = Path(source)
        else:
            return source
        return f"{source}@{folder_digest(folder)}"

    def kind(self, role: str) -> str:
        self._check_roles([role])
        return self._kinds[role]

    def dtype_of(self, role: str) -> torch.dtype:
        self._check_roles([role])
        return self._dtypes[role]

    def _check_roles(self, roles) -> None:
        unknown = [r for r in roles if r not in self._kinds]
        if unknown:
            raise ValueError(f"unknown model role(s) {', '.join(map(repr, unknown))} for {self.method}; "
                             f"valid roles: {', '.join(self._kinds)}")

    def __repr__(self) -> str:
        return f"ModelSet({self.method!r}, {self._sources}, device={self.device}, dtype={self.dtype})"

