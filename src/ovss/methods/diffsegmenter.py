"""DiffSegmenter (and DiffSegmenter++): one Stable Diffusion UNet pass per candidate class, read from the class
token's cross-attention and completed by the 64² self-attention (arXiv 2309.02773; official code
VCG-team/DiffSegmenter).

Per candidate class: BLIP completes "a photograph of {class}", the class word is emphasised compel-style
("cat++": weight 1.21), and the UNet runs once on the image latent noised to t = 100. The class token's cross
maps at 8/16/32/64 are bilinearly upsampled, min-maxed and mixed 0.3/0.5/0.1/0.1, multiplied once by the mean
64² self-attention of the same pass, upsampled to H×W and min-maxed per class; a pixel takes the best class
whose score exceeds τ. All classes of a batch of images share batched UNet calls (each item keeps its own
context and its own self-attention). Defaults reproduce the official code (diffsegmenter.md §3, §4);
docs/methods/diffsegmenter.md lists every option.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ovss.attention import AttentionCapture, attention_layers
from ovss.attention.maps import level_weights, minmax
from ovss.candidates import caption_images, get_selector
from ovss.candidates.captioning import BLIP_MAX_LENGTH
from ovss.data.names import FAMILY, NAME_SETS
from ovss.dense.labels import resize_scores
from ovss.diffusion.latents import add_noise, encode_latents, seeded_noise, tensor_resize
from ovss.methods.base import Method, SegmentRequest
from ovss.registry import register
from ovss.result import Segmentation
from ovss.text.weighting import WeightedPrompt, encode_weighted, weigh_tokens, weight_mark

log = logging.getLogger(__name__)

#: compel's "word++" = 1.1² (diffsegmenter.md §2, §3.2 step 3d).
CLASS_WEIGHT = 1.21
#: cross-attention weights for map sides 8/16/32/64 at 512² (paper §4.3, official code).
CROSS_WEIGHTS = (0.3, 0.5, 0.1, 0.1)
#: the zero-shot timestep; the weakly supervised setting averages (1, 50, 100, 150) (paper Table 5).
TIMESTEP = 100
#: τ is unpublished (the official evaluation sweeps 0.30…0.74 on the eval split): a provisional mid-sweep value.
BG_THRESHOLD = 0.5
#: long side of the score maps a Segmentation keeps (labels are always decided at the image's size)
SCORES_MAX_SIDE = 1024

_SLOT = re.compile(r"(?<!\S)\{\}(?!\S)")


@dataclass(frozen=True)
class PromptPreset:
    """One official script's prompt settings (diffsegmenter.md §3.1). Aliases change prompts only."""

    template: str
    aliases: Mapping[str, str] = field(default_factory=dict)
    ing_offset: int = 1


_ALIASES = NAME_SETS["diffsegmenter"].renames
PRESETS: Mapping[str, PromptPreset] = MappingProxyType({
    "voc": PromptPreset("a photograph of {}", _ALIASES["voc"]),
    "context": PromptPreset("a photography of {}", _ALIASES["context"]),  # "photography" (sic), as official
    "coco": PromptPreset("a photography of {}", _ALIASES["coco"], ing_offset=2),  # the official off-by-one
    "default": PromptPreset("a photograph of {}"),
})


def resolve_preset(name: str) -> str:
    """A preset name, or a dataset key (voc21, context59, coco_object, ...) -> its preset name.

    Datasets the official code never ran (Cityscapes, ADE20K) get "default".
    """
    if name in PRESETS:
        return name
    if name in FAMILY:
        return FAMILY[name] if FAMILY[name] in PRESETS else "default"
    raise ValueError(f"diffsegmenter: unknown preset {name!r}; use one of {sorted(PRESETS)} or a dataset key "
                     f"({', '.join(FAMILY)})")


@dataclass
class DiffSegmenterConfig:
    """Every field defaults to the official code's behaviour (diffsegmenter.md §4 lists the paper-style options)."""

    bg_threshold: float = BG_THRESHOLD  # provisional: τ is unpublished (calibrate with `ovss eval`'s sweep)
    candidates: str = "blip_clip"  # BLIP/CLIP category filter; "all", "given", or any selector name
    preset: str = "default"  # voc | context | coco | default, or a dataset key such as voc21
    template: str | None = None  # overrides the preset's prompt prefix; "{}" marks the class
    ing_offset: int | None = None  # overrides the preset's "-ing" token offset
    blip_completion: bool = True  # False: the bare prefix (Table 4 "w/o BLIP")
    class_weight: float = CLASS_WEIGHT  # 1.0: no "++"
    fuse_next: Literal["ing", "none"] = "ing"  # also read the next token when the next word ends in "-ing"
    class_token: Literal["last", "mean"] = "last"  # last sub-token (official) or the mean of all sub-tokens
    cross_weights: tuple[float, ...] = CROSS_WEIGHTS  # for map sides 8/16/32/64 at 512²
    cross_norm: Literal["minmax", "none"] = "minmax"  # min-max each level before weighting (official)
    self_refine: bool = True  # False: the fused cross-attention alone (Table 4's "alone" row, 61.25 vs 67.89)
    normalize_at: Literal["image", "latent"] = "image"  # min-max after upsampling to H×W (official)
    timesteps: tuple[int, ...] = (TIMESTEP,)  # (1, 50, 100, 150) for the weakly supervised setting
    resolution: int | None = None  # image squashed to resolution² (aspect ignored); None: the model's native size
    vae_sample: Literal["sample", "mean"] = "sample"
    seed: int = 0  # VAE-sample noise and ε are re-drawn from this seed for every image
    max_unet_batch: int = 8  # (image, class) items per UNet call
    caption_max_length: int = BLIP_MAX_LENGTH  # BLIP greedy, total length counting the prompt, pinned

    def __post_init__(self) -> None:
        self.preset = resolve_preset(self.preset)
        for name, allowed in (("fuse_next", ("ing", "none")), ("class_token", ("last", "mean")),
                              ("cross_norm", ("minmax", "none")), ("normalize_at", ("image", "latent")),
                              ("vae_sample", ("sample", "mean"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"diffsegmenter: {name}={getattr(self, name)!r}; choose one of {allowed}")
        if len(self.cross_weights) != 4:
            raise ValueError("diffsegmenter: cross_weights takes 4 values, for map sides 8/16/32/64")
        self.cross_weights = tuple(float(w) for w in self.cross_weights)
        timesteps = self.timesteps if isinstance(self.timesteps, (list, tuple)) else (self.timesteps,)
        self.timesteps = tuple(int(t) for t in timesteps)
        if not self.timesteps or min(self.timesteps) < 0:
            raise ValueError(f"diffsegmenter: timesteps must be a non-empty list of t >= 0, got {self.timesteps}")
        if self.template is not None and (len(_SLOT.findall(self.template)) != 1 or self.template.count("{}") != 1):
            raise ValueError(f"diffsegmenter: template {self.template!r} needs exactly one '{{}}' standing as a word")
        if self.class_weight < 1:
            raise ValueError(f"diffsegmenter: class_weight must be >= 1 (compel semantics), got {self.class_weight}")
        if self.max_unet_batch < 1:
            raise ValueError(f"diffsegmenter: max_unet_batch must be >= 1, got {self.max_unet_batch}")

    @property
    def prompt_preset(self) -> PromptPreset:
        """The preset with the `template` / `ing_offset` overrides applied."""
        base = PRESETS[self.preset]
        return PromptPreset(self.template or base.template, base.aliases,
                            base.ing_offset if self.ing_offset is None else self.ing_offset)


# ---------------------------------------------------------------------------------------------------
# Prompts (diffsegmenter.md §3.2 steps 3a-3d, 3g). Pure functions of strings and token ids.
# ---------------------------------------------------------------------------------------------------
def mark_completion(template: str, alias: str, completion: str, weight: float, echo: str | None = None
                    ) -> tuple[str, bool]:
    """Step 3c: the completion with the class's last word marked compel-style ("… of cat++ sitting …").

    The official VOC slice: marked prefix + completion[len(prefix):], so the class keeps the caller's spelling.
    `echo` is the prefix as the captioner writes it back (BLIP lower-cases and re-spaces punctuation); a
    completion that does not start with it falls back to the marked prefix alone (False).
    """
    prefix = template.replace("{}", alias)
    words = alias.split()
    marked = template.replace("{}", " ".join([*words[:-1], weight_mark(words[-1], weight)]))
    echo = prefix if echo is None else echo
    if completion.lower().startswith(echo.lower()):
        return marked + completion[len(echo):], True
    return marked, False


def token_set(tokenizer, template: str, alias: str, wp: WeightedPrompt, *, ing_offset: int = 1,
              fuse_next: str = "ing", class_token: str = "last") -> tuple[int, ...]:
    """Step 3g: the token positions T whose cross maps make the class map (BOS = 0).

    k = (tokens of the template before the class) + (sub-tokens of the class): the class's last sub-token
    (class_token="mean": all of them). Plus k + ing_offset when the space-split word of the unmarked prompt
    right after the class ends in "ing" (a string test, as official: "sitting," does not count). An index past
    the prompt's content (EOS, padding) is never added.
    """
    before = template.split("{}")[0]
    n_before = len(tokenizer(before, add_special_tokens=False)["input_ids"]) if before.strip() else 0
    n_class = len(tokenizer(alias, add_special_tokens=False)["input_ids"])
    k = n_before + n_class
    if n_class == 0 or k > wp.n_content:
        raise ValueError(f"the class {alias!r} has no token within the text encoder's length limit in {wp.text!r}")
    chosen = [k] if class_token == "last" else list(range(n_before + 1, k + 1))
    words, after = wp.text.split(), len(before.split()) + len(alias.split())
    if fuse_next == "ing" and after < len(words) and words[after].endswith("ing") and k + ing_offset <= wp.n_content:
        chosen.append(k + ing_offset)
    return tuple(chosen)


def _echo(processor, prefix: str) -> str:
    """The prefix as BLIP's decoder writes it back (its tokenizer lower-cases and re-spaces punctuation)."""
    ids = processor.tokenizer(prefix, add_special_tokens=False)["input_ids"]
    return processor.decode(ids, skip_special_tokens=True).strip()


@dataclass(frozen=True)
class ClassPrompt:
    """One class's prompt: BLIP's completion, the marked prompt q′, its weighted tokens and the set T."""

    name: str
    completion: str
    marked: str
    weighted: WeightedPrompt
    tokens: tuple[int, ...]


# ---------------------------------------------------------------------------------------------------
# The map arithmetic (diffsegmenter.md §3.2 steps 3h-4), batched over (image, class) items.
# ---------------------------------------------------------------------------------------------------
def fuse_cross(cross: Mapping[int, torch.Tensor], grids: Mapping[int, tuple[int, int]], selection: torch.Tensor,
               weights: Mapping[int, float], side: tuple[int, int], norm: str = "minmax") -> torch.Tensor:
    """ĉ = Σ_r w_r · minmax(Bilinear_side(mean_{j∈T} A_r[:, :, j])): (N, h, w).

    cross[f]: (N, r², 77) layer/head-mean probabilities at factor f; selection: (N, 77), 1/|T| on T, else 0.
    norm="none" skips the per-level min-max (the paper's Eq. 5).
    """
    fused = None
    for f, w in weights.items():
        h, wd = grids[f]
        a = torch.einsum("nqt,nt->nq", cross[f].float(), selection.float()).reshape(-1, 1, h, wd)
        if (h, wd) != tuple(side):
            a = F.interpolate(a, size=tuple(side), mode="bilinear", align_corners=False)
        a = minmax(a[:, 0], dims=(1, 2)) if norm == "minmax" else a[:, 0]
        fused = w * a if fused is None else fused + w * a
    return fused


def refine(self_map: torch.Tensor, fused: torch.Tensor) -> torch.Tensor:
    """m_c = S · vec(ĉ): one product with the item's own row-stochastic S (no power, no renormalisation)."""
    n, h, w = fused.shape
    return torch.bmm(self_map.float(), fused.reshape(n, h * w, 1)).reshape(n, h, w)


def image_scores(maps: torch.Tensor, size_hw: tuple[int, int], normalize_at: str = "image") -> torch.Tensor:
    """Step 4: (M, h, w) -> (M, H, W) bilinear, then min-max per class over H×W ("latent": min-max first)."""
    if normalize_at == "latent":
        return resize_scores(minmax(maps.float(), dims=(1, 2)), size_hw)
    return minmax(resize_scores(maps, size_hw), dims=(1, 2))


def _capped(size_hw: tuple[int, int], max_side: int) -> tuple[int, int]:
    """size_hw scaled down (aspect kept) so that its long side is at most max_side."""
    scale = min(1.0, max_side / max(size_hw))
    return max(1, round(size_hw[0] * scale)), max(1, round(size_hw[1] * scale))


def _selection(prompts: Sequence[ClassPrompt], length: int) -> torch.Tensor:
    sel = torch.zeros(len(prompts), length)
    for i, p in enumerate(prompts):
        sel[i, list(p.tokens)] = 1.0 / len(p.tokens)
    return sel


# ---------------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------------
@register("diffsegmenter")
class DiffSegmenter(Method):
    """DiffSegmenter. `segment(image, classes)` scores the image's candidate classes (default: the BLIP/CLIP
    filter over `classes`; `given=` for ground-truth image labels) and labels a pixel with the best class whose
    min-maxed score exceeds τ, else background."""

    Config = DiffSegmenterConfig
    roles = ("diffusion", "captioner", "filter")
    cuda_dtype = "float16"
    default_batch_size = 4
    #: the evaluation protocol behind the paper's numbers: per-image candidate lists (diffsegmenter.md §5)
    paper_protocol = "candidates"

    @property
    def resolution(self) -> int:
        """Working resolution: the config's, else the diffusion model's native size (512 for SD-1.5)."""
        return self.config.resolution or self.models["diffusion"].native_resolution

    def required_roles(self) -> tuple[str, ...]:
        roles = {"diffusion", *get_selector(self.config.candidates).roles}
        if self.config.blip_completion:
            roles.add("captioner")
        return tuple(sorted(roles))

    def _segment_batch(self, images: list[Image.Image], request: SegmentRequest) -> list[Segmentation]:
        selector = get_selector("given" if request.given is not None else self.config.candidates)
        candidates = selector(images, request.classes, models=self.models, captions=request.captions,
                              given=request.given)
        if not request.background and any(not c for c in candidates):
            raise ValueError("diffsegmenter: an image has no candidate class and background=False: nothing to label")
        owners = [i for i, names in enumerate(candidates) for _ in names]
        names = [n for ns in candidates for n in ns]
        prompts = self.class_prompts([images[i] for i in owners], names) if names else []
        used = sorted(set(owners))
        local = {i: j for j, i in enumerate(used)}
        maps = self.class_maps([images[i] for i in used], [local[i] for i in owners], prompts) if names else None
        out, pos = [], 0
        for img, cands in zip(images, candidates):
            part = slice(pos, pos + len(cands))
            out.append(self._finish(img, request, cands, maps[part] if cands else None, prompts[part]))
            pos += len(cands)
        return out

    def class_prompts(self, images: Sequence[Image.Image], names: Sequence[str]) -> list[ClassPrompt]:
        """Steps 3a-3d and 3g for (image, class) pairs: prefix, BLIP completion, mark, weighted tokens, T."""
        cfg, preset = self.config, self.config.prompt_preset
        tokenizer = self.models["diffusion"].tokenizer
        aliases = [preset.aliases.get(n, n) for n in names]
        prefixes = [preset.template.replace("{}", a) for a in aliases]
        if cfg.blip_completion:
            blip = self.models["captioner"]
            completions = caption_images(blip, list(images), prompts=prefixes, max_length=cfg.caption_max_length)
            echoes = [_echo(blip.processor, p) for p in prefixes]
        else:
            completions = echoes = prefixes
        out = []
        for name, alias, prefix, q, echo in zip(names, aliases, prefixes, completions, echoes):
            marked, ok = mark_completion(preset.template, alias, q, cfg.class_weight, echo)
            if not ok:
                log.warning("diffsegmenter: BLIP's completion %r does not continue the prefix %r; using the prefix",
                            q, prefix)
            wp = weigh_tokens(tokenizer, marked)
            tokens = token_set(tokenizer, preset.template, alias, wp, ing_offset=preset.ing_offset,
                               fuse_next=cfg.fuse_next, class_token=cfg.class_token)
            out.append(ClassPrompt(name, q, marked, wp, tokens))
        return out

    @torch.no_grad()
    def class_maps(self, images: Sequence[Image.Image], owners: Sequence[int], prompts: Sequence[ClassPrompt]
                   ) -> torch.Tensor:
        """Steps 1-3: m_c on the latent grid, (N, L, L) float32, for item i = (images[owners[i]], prompts[i]).

        One latent and one ε per image (re-seeded per image), shared by its classes and timesteps; the items
        run in UNet batches of `max_unet_batch`, each with its own context and its own self-attention.
        """
        cfg, dm = self.config, self.models["diffusion"]
        unet, vae = dm.unet, dm.vae
        res = self.resolution
        side = res // dm.vae_factor
        draws = [seeded_noise((2, vae.config.latent_channels, side, side), cfg.seed, vae.dtype) for _ in images]
        # One image per VAE call: batched convolutions round differently, and results must not depend on batches.
        z0 = torch.cat([encode_latents(vae, tensor_resize([im], res), dm.vae_scale,
                                       noise=None if cfg.vae_sample == "mean" else d[:1])
                        for im, d in zip(images, draws)])
        eps = torch.stack([d[1] for d in draws]).to(device=z0.device, dtype=z0.dtype)
        contexts = encode_weighted(dm.text_encoder, dm.tokenizer, [p.weighted for p in prompts]).to(unet.dtype)
        selection = _selection(prompts, contexts.shape[1]).to(z0.device)
        owner = torch.tensor(list(owners), device=z0.device)

        layers = attention_layers(unet).values()
        weights = level_weights(cfg.cross_weights, {f for k, f in layers if k == "cross"}, "cross")
        self_levels = {f for k, f in layers if k == "self"}
        if not self_levels:
            raise ValueError("diffsegmenter: the UNet has no self-attention layer")
        finest = min(self_levels)
        alphas = dm.scheduler.alphas_cumprod
        if max(cfg.timesteps) >= len(alphas):
            raise ValueError(f"diffsegmenter: timesteps {cfg.timesteps} exceed the schedule's {len(alphas)} steps")
        total = None
        with AttentionCapture(unet, cross=weights, self_attn=(finest,) if cfg.self_refine else ()) as cap:
            for t in cfg.timesteps:
                z_t = add_noise(z0, eps, float(alphas[t])).to(unet.dtype)
                parts = []
                for start in range(0, len(prompts), cfg.max_unet_batch):
                    part = slice(start, start + cfg.max_unet_batch)
                    cap.reset()
                    unet(z_t[owner[part]], t, encoder_hidden_states=contexts[part])
                    fused = fuse_cross(cap.cross_maps(), {f: cap.grid(f) for f in weights}, selection[part], weights,
                                       cap.grid(finest), cfg.cross_norm)
                    parts.append(refine(cap.self_maps()[finest], fused) if cfg.self_refine else fused)
                maps = torch.cat(parts)
                total = maps if total is None else total + maps
        return total / len(cfg.timesteps)

    def _finish(self, image: Image.Image, request: SegmentRequest, candidates: list[str], maps: torch.Tensor | None,
                prompts: Sequence[ClassPrompt]) -> Segmentation:
        """Steps 4-7: scores at H×W, argmax over [τ, s_1, …], ties to background; no candidates: background."""
        tau = request.threshold(self.config.bg_threshold)
        size_hw = (image.height, image.width)
        # Labels are decided at H×W (the per-class min-max is defined there); the kept score maps are capped so a
        # huge image over a long vocabulary stays small (Segmentation.scores upsamples them on access).
        keep_hw = _capped(size_hw, SCORES_MAX_SIDE)
        meta = {"method": self.name, "candidates": candidates, "bg_threshold": tau if request.background else None,
                "timesteps": list(self.config.timesteps),
                "prompts": {p.name: p.marked for p in prompts}, "tokens": {p.name: list(p.tokens) for p in prompts}}
        if maps is None:  # no candidates: all background, the models are never called
            return Segmentation(np.zeros(size_hw, dtype=np.int64),
                                request.candidate_scores([], None, tau, keep_hw).numpy(), request.output_classes, meta)
        s = image_scores(maps, size_hw, self.config.normalize_at).cpu()
        labels = request.candidate_labels(s, candidates, tau, ties="background")
        scores = request.candidate_scores(candidates, resize_scores(s, keep_hw), tau, keep_hw)
        return Segmentation(labels.numpy(), scores.numpy(), request.output_classes, meta)

