"""FA-Seg: one attention pass of a 2-rectified-flow model, read with a dual prompt and refined by
squared self-attention affinities (arXiv 2506.23323; official code chequanghuy/FA-Seg).

Defaults reproduce the official code, which produced the paper's numbers (spec: faseg.md §3 and §4):
a tiny DDIM "inversion" step at t = 1, cross-attention of the class-only prompt fused over 8/16/32
(0.15/0.70/0.15), four squared self-attention affinities mixed 0.1/0.1/0.5/0.3, a flipped copy in the
same batch, and `max ≥ τ` against a per-dataset threshold. docs/methods/faseg.md lists every option.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ovss.attention import AttentionCapture, attention_layers
from ovss.attention.maps import level_weights, minmax
from ovss.candidates import caption_images, get_selector
from ovss.dense.labels import resize_labels, resize_scores
from ovss.diffusion.latents import ddim_inversion_step, encode_latents, pil_to_tensor, seeded_noise
from ovss.diffusion.text import encode_prompts, tokenize_prompts
from ovss.methods.base import Method, SegmentRequest
from ovss.registry import register
from ovss.result import Segmentation
from ovss.text.spans import chunk_classes, class_token_spans

#: τ per dataset (paper Table 4, official scripts): `max ≥ τ` is a class, else background.
BG_THRESHOLD_PRESETS = {"voc": 0.55, "context": 0.50, "coco_object": 0.60}


@dataclass
class FASegConfig:
    """Every field defaults to the official code's behaviour (faseg.md §4 lists the paper-style options)."""

    bg_threshold: float | str = 0.55  # a number, or a preset name: "voc", "context", "coco_object"
    candidates: str = "tagclip_blip"  # TagCLIP ∪ BLIP-caption nouns; "all", "given", "tagclip", ...
    caption: Literal["blip", "simple", "given"] = "blip"  # "simple": "a photo of " + class prompt
    resolution: int | None = None  # image squashed to resolution² (aspect ignored); None: the model's native size (512 for SD)
    cross_weights: tuple[float, ...] = (0.15, 0.70, 0.15, 0.0)  # w× for sides 8/16/32/64
    self_weights: tuple[float, ...] = (0.10, 0.10, 0.50, 0.30)  # wˢ for sides 8/16/32/64
    affinity_power: int = 2  # Pʳ = (Âʳ)²
    inversion: Literal["official", "none", "rf_1plus1"] = "official"
    dual_prompt: bool = True  # cross-attention probabilities against class-only keys
    ttf: bool = True  # test-time flip, averaged in the same batch
    self_resize: Literal["official", "paper"] = "official"  # bicubic queries + repeated keys, or the reverse
    cross_upsample: Literal["nearest", "bilinear"] = "nearest"
    label_resize: Literal["nearest512", "scores"] = "nearest512"
    vae_sample: Literal["sample", "mean"] = "sample"
    seed: int = 0  # the VAE-sample noise generator is re-seeded to this for every image
    max_class_tokens: int = 75  # project extension: longer class prompts are split into key chunks
    caption_max_length: int = 20  # BLIP greedy decoding at transformers' default length, pinned

    def __post_init__(self) -> None:
        if isinstance(self.bg_threshold, str):
            if self.bg_threshold not in BG_THRESHOLD_PRESETS:
                raise ValueError(f"bg_threshold preset {self.bg_threshold!r} unknown; use a number or one of "
                                 f"{sorted(BG_THRESHOLD_PRESETS)}")
            self.bg_threshold = BG_THRESHOLD_PRESETS[self.bg_threshold]
        for name, allowed in (("caption", ("blip", "simple", "given")), ("inversion", ("official", "none", "rf_1plus1")),
                              ("self_resize", ("official", "paper")), ("cross_upsample", ("nearest", "bilinear")),
                              ("label_resize", ("nearest512", "scores")), ("vae_sample", ("sample", "mean"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"faseg: {name}={getattr(self, name)!r}; choose one of {allowed}")
        if len(self.cross_weights) != 4 or len(self.self_weights) != 4:
            raise ValueError("cross_weights and self_weights take 4 values, for sides 8/16/32/64")
        self.cross_weights = tuple(float(w) for w in self.cross_weights)
        self.self_weights = tuple(float(w) for w in self.self_weights)


# ---------------------------------------------------------------------------------------------------
# The map arithmetic (faseg.md §3.1 steps 9-11), on one branch of one image. Pure tensor functions.
# ---------------------------------------------------------------------------------------------------
def class_cross_maps(cross: dict[int, torch.Tensor], spans: list[list[int]], weights: dict[int, float],
                     side: int, upsample: str = "nearest") -> torch.Tensor:
    """c_k = mean over span_k of Σ_r w×_r · Up(Cʳ): (K, L, L).

    cross[f]: (r², T) head/layer-mean probabilities at factor f. No normalisation: the values are small
    because BOS absorbs most of the mass, and a global scale does not matter after the min-max of step 11.
    The span mean is taken before upsampling (both are linear, so this is the same map, cheaper).
    """
    out = None
    for f, w in weights.items():
        m = cross[f]
        r = side // f
        per_class = torch.stack([m[:, s].mean(dim=1) for s in spans]).reshape(len(spans), 1, r, r)
        if r != side:
            kw = {} if upsample == "nearest" else {"align_corners": False}
            per_class = F.interpolate(per_class, size=(side, side), mode=upsample, **kw)
        out = w * per_class[:, 0] if out is None else out + w * per_class[:, 0]
    return out


def _bicubic_grid(rows: torch.Tensor, r: int, side: int) -> torch.Tensor:
    """rows (r², C): values on an r×r grid with C channels -> (side², C), bicubic, align_corners=False."""
    grid = rows.T.reshape(1, -1, r, r)
    return F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False).reshape(-1, side * side).T


def _block_sum(v: torch.Tensor, r: int, side: int) -> torch.Tensor:
    """v (side², K) -> (r², K): the sum of v over each (side/r)² block (the effect of repeated keys)."""
    s = side // r
    k = v.shape[1]
    return v.T.reshape(k, r, s, r, s).sum(dim=(2, 4)).reshape(k, r * r).T


def _repeat_rows(u: torch.Tensor, r: int, side: int) -> torch.Tensor:
    """u (r², K) -> (side², K): each row repeated over its (side/r)² block (nearest-repeated queries)."""
    s = side // r
    k = u.shape[1]
    return u.T.reshape(k, r, 1, r, 1).expand(k, r, s, r, s).reshape(k, side * side).T


def affinity_power_apply(self_map: torch.Tensor, v: torch.Tensor, side: int, power: int = 2,
                         mode: str = "official") -> torch.Tensor:
    """(Âʳ)^p v for all classes at once, without materialising the side²×side² Âʳ.

    self_map: Sʳ (r², r²), rows = queries. v: (side², K). official: Âʳ = RepeatKeys(BicubicQueries(Sʳ)), so
    Âʳ v = S̃ʳ · BlockSum(v) with S̃ʳ the bicubic-upsampled query grid; rows are not renormalised (they sum
    to (side/r)²) and the bicubic negative lobes are kept. paper: bicubic key maps, nearest-repeated queries.
    """
    r = int(round(self_map.shape[0] ** 0.5))
    if r == side:
        apply = lambda x: self_map @ x  # noqa: E731  Â^L = S^L
    elif mode == "official":
        queries_up = _bicubic_grid(self_map, r, side)  # (side², r²)
        apply = lambda x: queries_up @ _block_sum(x, r, side)  # noqa: E731
    else:
        keys_up = _bicubic_grid(self_map.T, r, side).T  # (r², side²): each query's key map upsampled
        apply = lambda x: _repeat_rows(keys_up @ x, r, side)  # noqa: E731
    for _ in range(power):
        v = apply(v)
    return v


def class_maps(cross_c: torch.Tensor, selfs: dict[int, torch.Tensor], weights: dict[int, float], power: int = 2,
               mode: str = "official") -> torch.Tensor:
    """M_k = Σ_r wˢ_r · minmax((Âʳ)^p c_k): (K, L, L), each level min-maxed per class (step 11)."""
    k, side, _ = cross_c.shape
    v = cross_c.reshape(k, side * side).T.float()
    out = torch.zeros(side * side, k, dtype=torch.float32, device=v.device)
    for f, w in weights.items():
        out += w * minmax(affinity_power_apply(selfs[f].float(), v, side, power, mode), dims=(0,))
    return out.T.reshape(k, side, side)


# ---------------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------------
@dataclass
class _Prompts:
    """One image's dual prompt: the text prompt P_t and the class prompt P_c (chunked past 75 tokens)."""

    caption: str
    class_prompt: str
    text_prompt: str
    class_ids: list[list[int]]  # one 77-token id list per key chunk
    spans: list[list[int]]  # per class: positions in the concatenated chunks (chunk j starts at 77·j)


@register("faseg")
class FASeg(Method):
    """FA-Seg. `segment(image, classes)` labels the image over its candidate classes (default TagCLIP ∪
    BLIP caption nouns, drawn from `classes`), with background where no class reaches τ."""

    Config = FASegConfig
    roles = ("diffusion", "captioner", "tagger")
    cuda_dtype = "float16"
    default_batch_size = 4
    paper_protocol = "candidates"
    name_set = "faseg"  # "dining table", "potted plant", "tv monitor", COCO's official names

    @property
    def resolution(self) -> int:
        """Working resolution R: the config's, else the diffusion model's native size."""
        return self.config.resolution or self.models["diffusion"].native_resolution

    def required_roles(self) -> tuple[str, ...]:
        roles = {"diffusion", *get_selector(self.config.candidates).roles}
        if self.config.caption == "blip":
            roles.add("captioner")
        return tuple(sorted(roles))

    # -- one batch: captions -> candidates -> scores -> labels ---------------------------------------
    def _segment_batch(self, images: list[Image.Image], request: SegmentRequest) -> list[Segmentation]:
        cfg = self.config
        captions = request.captions
        if captions is None and cfg.caption == "blip":
            captions = caption_images(self.models["captioner"], images, max_length=cfg.caption_max_length)
        elif captions is None and cfg.caption == "given":
            raise ValueError("faseg: caption='given' needs captions=[...] (one per image)")
        selector = get_selector("given" if request.given is not None else cfg.candidates)
        candidates = selector(images, request.classes, models=self.models, captions=captions, given=request.given)
        if not request.background and any(not c for c in candidates):
            raise ValueError("faseg: an image has no candidate class and background=False: nothing to label")
        todo = [i for i, c in enumerate(candidates) if c]
        prompts = {i: self._prompts(candidates[i], None if captions is None else captions[i]) for i in todo}
        scores = dict(zip(todo, self.score([images[i] for i in todo], [prompts[i] for i in todo]))) if todo else {}
        return [self._finish(images[i], request, candidates[i], scores.get(i), prompts.get(i)) for i in range(len(images))]

    def _prompts(self, names: list[str], caption: str | None) -> _Prompts:
        """P_c = names joined by ", " (caller's order: the text encoder is causal); P_t = s + " ; " + P_c.

        s is the caller's or BLIP's caption; without one ("simple"), "a photo of " + P_c.
        """
        tok = self.models["diffusion"].tokenizer
        class_prompt = ", ".join(names)
        if caption is None:
            caption = "a photo of " + class_prompt
        text_prompt = caption + " ; " + class_prompt
        if not self.config.dual_prompt:
            prefix = caption + " ; "
            ids, spans = class_token_spans(tok, names, prefix=prefix)
            return _Prompts(caption, class_prompt, text_prompt, [ids], spans)
        class_ids, spans = [], []
        for j, chunk in enumerate(chunk_classes(tok, names, max_tokens=self.config.max_class_tokens)):
            ids, chunk_spans = class_token_spans(tok, [names[i] for i in chunk])
            class_ids.append(ids)
            spans += [[77 * j + p for p in s] for s in chunk_spans]
        return _Prompts(caption, class_prompt, text_prompt, class_ids, spans)

    @torch.no_grad()
    def score(self, images: list[Image.Image], prompts: list[_Prompts]) -> list[torch.Tensor]:
        """The FA-Seg pass for a batch: per image, U (K, R, R) at the working resolution (steps 5-13)."""
        cfg, dm = self.config, self.models["diffusion"]
        unet, n, res = dm.unet, len(images), self.resolution
        branches = 2 if cfg.ttf else 1
        # Step 5: squash to R² (PIL bicubic), add the flipped copy, one VAE pass for the whole batch.
        pixels = pil_to_tensor(images, res)
        if cfg.ttf:
            pixels = torch.stack([pixels, pixels.flip(-1)], dim=1).flatten(0, 1)  # [im0, flip0, im1, flip1, ...]
        latent_side = res // dm.vae_factor
        noise = torch.cat([seeded_noise((2, dm.vae.config.latent_channels, latent_side, latent_side), cfg.seed,
                                        dm.vae.dtype)[:branches] for _ in range(n)])
        z0 = encode_latents(dm.vae, pixels, dm.vae_scale, noise=None if cfg.vae_sample == "mean" else noise)
        side = z0.shape[-1]
        # Steps 2-3: E_t = E(P_t) for the hidden states; E_c = E(P_c) for the extra class keys.
        text_ids = (tokenize_prompts(dm.tokenizer, [p.text_prompt for p in prompts]) if cfg.dual_prompt
                    else torch.tensor([p.class_ids[0] for p in prompts]))
        e_t = encode_prompts(dm.text_encoder, text_ids).repeat_interleave(branches, 0).to(unet.dtype)
        extra = self._class_keys(prompts, branches) if cfg.dual_prompt else None

        layers = attention_layers(unet).values()
        available = {kind: {f for k, f in layers if k == kind} for kind in ("cross", "self")}
        w_cross = level_weights(cfg.cross_weights, available["cross"], "cross")
        w_self = level_weights(cfg.self_weights, available["self"], "self")
        dm.scheduler.set_timesteps(1)
        t = int(dm.scheduler.timesteps[0])  # [1]: the pipeline constructor forces steps_offset=1
        with AttentionCapture(unet, cross=w_cross, self_attn=w_self) as cap:
            # Step 6: the official "inversion" is one small DDIM step from ᾱ_final to ᾱ_t.
            cap.enabled = False
            z, t_rec = self._invert(unet, dm.scheduler, z0, e_t, t)
            # Step 7: the recorded pass; class-only keys when dual_prompt.
            cap.enabled = True
            cap.extra_context = extra
            unet(z, t_rec, encoder_hidden_states=e_t)
            cross, selfs = cap.cross_maps(), cap.self_maps()

        out = []
        for i, p in enumerate(prompts):
            per_branch = []
            for b in range(branches):
                item = i * branches + b
                c = class_cross_maps({f: cross[f][item] for f in w_cross}, p.spans, w_cross, side, cfg.cross_upsample)
                m = class_maps(c, {f: selfs[f][item] for f in w_self}, w_self, cfg.affinity_power, cfg.self_resize)
                # Step 12: bicubic to R², no clamping.
                per_branch.append(F.interpolate(m[None], size=(res, res), mode="bicubic",
                                                align_corners=False)[0])
            # Step 13: TTF, un-flipped at R² after the upsampling.
            out.append((per_branch[0] + per_branch[1].flip(-1)) / 2 if cfg.ttf else per_branch[0])
        return out

    def _class_keys(self, prompts: list[_Prompts], branches: int) -> list[torch.Tensor]:
        """E_c per key chunk, (B·branches, 77, D) each; images with fewer chunks get the empty prompt."""
        dm = self.models["diffusion"]
        n_chunks = max(len(p.class_ids) for p in prompts)
        empty = tokenize_prompts(dm.tokenizer, [""])[0].tolist()
        chunks = []
        for j in range(n_chunks):
            ids = torch.tensor([p.class_ids[j] if j < len(p.class_ids) else empty for p in prompts])
            chunks.append(encode_prompts(dm.text_encoder, ids).repeat_interleave(branches, 0).to(dm.unet.dtype))
        return chunks

    def _invert(self, unet, scheduler, z0: torch.Tensor, e_t: torch.Tensor, t: int) -> tuple[torch.Tensor, int]:
        """Latent and timestep of the recorded pass (faseg.md §4 row 1)."""
        mode = self.config.inversion
        if mode == "none":
            return z0, t
        if mode == "official":
            eps = unet(z0, t, encoder_hidden_states=e_t).sample
            alpha_from = float(scheduler.final_alpha_cumprod)  # t − 1000 < 0 -> ᾱ_final = ᾱ₀ = 0.99915
            alpha_to = float(scheduler.alphas_cumprod[t])  # ᾱ₁ = 0.998296
            return ddim_inversion_step(z0, eps, alpha_from, alpha_to), t
        # rf_1plus1 (an unvalidated reading of the paper): z_T = z₀ − v(z₀, 0), then record v(z_T, 1000).
        v = unet(z0, 0, encoder_hidden_states=e_t).sample
        return z0 - v, int(scheduler.config.num_train_timesteps)

    # -- labels and the returned Segmentation ----------------------------------------------------------
    def _finish(self, image: Image.Image, request: SegmentRequest, candidates: list[str], u: torch.Tensor | None,
                prompts: _Prompts | None) -> Segmentation:
        """Steps 14-16: labels at R² (max ≥ τ -> class), nearest-resized to H×W; empty list -> background."""
        cfg = self.config
        tau = request.threshold(cfg.bg_threshold)
        grid = (self.resolution,) * 2
        size_hw = (image.height, image.width)
        meta = {"method": self.name, "candidates": candidates, "bg_threshold": tau if request.background else None}
        if u is None:  # no candidates: all background, the model is never called
            return Segmentation(np.zeros(size_hw, dtype=np.int64), request.candidate_scores([], None, tau, grid).numpy(),
                                request.output_classes, meta)
        u = u.float().cpu()
        meta.update(caption=prompts.caption, class_prompt=prompts.class_prompt, text_prompt=prompts.text_prompt)
        if cfg.label_resize == "nearest512":
            labels = resize_labels(request.candidate_labels(u, candidates, tau, ties="class"), size_hw)
        else:
            labels = request.candidate_labels(resize_scores(u, size_hw), candidates, tau, ties="class").numpy()
        return Segmentation(labels, request.candidate_scores(candidates, u, tau, grid).numpy(), request.output_classes,
                            meta)
