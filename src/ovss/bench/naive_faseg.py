"""The straightforward FA-Seg: the same algorithm as `ovss.methods.faseg`, written the plain way.

This is the baseline of issue 9's "≥ 10× a straightforward per-image implementation": what a direct reading of
faseg.md §3.1 gives, with none of §3.2's allowed optimisations. One image at a time; the flipped copy is its
own VAE and UNet passes; every attention layer of the recorded pass computes explicit probabilities and keeps
them (per layer, averaged only at the end); each level's L²×L² affinity Âʳ is materialised and raised to its
power with a matrix power; classes are handled in a Python loop. It must give the optimized method's scores
(max abs difference < 1e-3 in fp32, tests/test_bench.py), so it shares the plumbing that is not under test
(tokenisation, VAE sampling, the inversion update) and re-does all the attention arithmetic.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ovss.attention import attention_layers
from ovss.attention.maps import level_weights
from ovss.dense.labels import resize_labels
from ovss.diffusion.latents import ddim_inversion_step, encode_latents, pil_to_tensor, seeded_noise
from ovss.diffusion.text import encode_prompts, tokenize_prompts
from ovss.methods.faseg import FASegConfig
from ovss.models import DiffusionModels
from ovss.text.spans import class_token_spans

#: FASegConfig values the plain version implements (the defaults, i.e. the official code, plus two switches).
_SUPPORTED = {"inversion": ("official", "none"), "dual_prompt": (True,), "self_resize": ("official",),
              "cross_upsample": ("nearest",), "label_resize": ("nearest512",), "vae_sample": ("sample", "mean")}


@dataclass
class NaiveResult:
    """U (K, R, R) float32 at the working resolution, and labels (H, W): 0 = background, k + 1 = classes[k]."""

    scores: torch.Tensor
    labels: np.ndarray


class _KeepEveryLayer:
    """Explicit-probability attention for an SD-1.x layer that appends its probabilities to a shared list.

    Cross layers keep the softmax against the class-only prompt's keys (the dual prompt); the layer's output
    still uses the text prompt's keys and values.
    """

    def __init__(self, store: list, kind: str, factor: int, class_context: torch.Tensor):
        self.store, self.kind, self.factor, self.class_context = store, kind, factor, class_context

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        if (attention_mask is not None or hidden_states.ndim != 3 or attn.spatial_norm is not None
                or attn.group_norm is not None or attn.norm_cross or attn.residual_connection
                or attn.norm_q is not None or attn.norm_k is not None):
            raise NotImplementedError("the naive FA-Seg handles SD-1.x attention layers only")
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        probs = attn.get_attention_scores(query, attn.head_to_batch_dim(attn.to_k(context)))
        out = attn.batch_to_head_dim(torch.bmm(probs, attn.head_to_batch_dim(attn.to_v(context))))
        if self.kind == "cross":
            probs = attn.get_attention_scores(query, attn.head_to_batch_dim(attn.to_k(self.class_context)))
        self.store.append((self.kind, self.factor, probs))
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


def explicit_affinity(self_map: torch.Tensor, side: int) -> torch.Tensor:
    """Âʳ (L², L²) built literally (faseg.md §3.1 step 10): bicubic-upsampled queries, nearest-repeated keys."""
    r = math.isqrt(self_map.shape[0])
    if r == side:
        return self_map
    queries_up = F.interpolate(self_map.T.reshape(1, r * r, r, r), size=(side, side), mode="bicubic",
                               align_corners=False).reshape(r * r, side * side).T  # (L² queries, r² keys)
    cell = torch.arange(side, device=self_map.device) // (side // r)
    key_block = (cell[:, None] * r + cell[None, :]).reshape(-1)  # the r×r key each of the L² positions repeats
    return queries_up[:, key_block]


def _minmax(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.min(), x.max()
    return torch.zeros_like(x) if hi == lo else (x - lo) / (hi - lo)


class NaiveFASeg:
    """FA-Seg on one image at a time, for the benchmark's side-by-side ratio. `models`: the diffusion models."""

    def __init__(self, models: DiffusionModels, config: FASegConfig | None = None, resolution: int | None = None):
        self.models = models
        self.config = config or FASegConfig()
        for name, allowed in _SUPPORTED.items():
            if getattr(self.config, name) not in allowed:
                raise ValueError(f"naive FA-Seg: {name}={getattr(self.config, name)!r} is not implemented "
                                 f"(supported: {allowed})")
        self.resolution = resolution or self.config.resolution or models.native_resolution
        self.layers = layers = attention_layers(models.unet)
        levels = {kind: {f for k, f in layers.values() if k == kind} for kind in ("cross", "self")}
        self.w_cross = level_weights(self.config.cross_weights, levels["cross"], "cross")
        self.w_self = level_weights(self.config.self_weights, levels["self"], "self")

    @torch.no_grad()
    def segment(self, image: Image.Image, classes: list[str], caption: str) -> NaiveResult:
        """Steps 1-15 of faseg.md §3.1 for one image, its candidate `classes` and its `caption`."""
        cfg, dm = self.config, self.models
        unet, vae, res = dm.unet, dm.vae, self.resolution
        class_ids, spans = class_token_spans(dm.tokenizer, list(classes))
        text_ids = tokenize_prompts(dm.tokenizer, [caption + " ; " + ", ".join(classes)])
        e_t = encode_prompts(dm.text_encoder, text_ids).to(unet.dtype)
        e_c = encode_prompts(dm.text_encoder, torch.tensor([class_ids])).to(unet.dtype)
        dm.scheduler.set_timesteps(1)
        t = int(dm.scheduler.timesteps[0])
        pixels = pil_to_tensor([image], res)
        side = res // dm.vae_factor
        noise = seeded_noise((2, vae.config.latent_channels, side, side), cfg.seed, vae.dtype)
        branches = []
        for b in range(2 if cfg.ttf else 1):
            z = encode_latents(vae, pixels.flip(-1) if b else pixels, dm.vae_scale,
                               noise=None if cfg.vae_sample == "mean" else noise[b:b + 1])
            if cfg.inversion == "official":
                eps = unet(z, t, encoder_hidden_states=e_t).sample
                z = ddim_inversion_step(z, eps, float(dm.scheduler.final_alpha_cumprod),
                                        float(dm.scheduler.alphas_cumprod[t]))
            cross, selfs = self._record(z, t, e_t, e_c)
            maps = self._class_maps(cross, selfs, spans, side)
            branches.append(torch.stack([F.interpolate(m[None, None], size=(res, res), mode="bicubic",
                                                       align_corners=False)[0, 0] for m in maps]))
        u = (branches[0] + branches[1].flip(-1)) / 2 if cfg.ttf else branches[0]
        best, index = u.max(0)
        labels = torch.where(best >= float(cfg.bg_threshold), index + 1, torch.zeros_like(index))
        return NaiveResult(u.cpu(), resize_labels(labels.cpu(), (image.height, image.width)))

    def _record(self, z: torch.Tensor, t: int, e_t: torch.Tensor, e_c: torch.Tensor
                ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """The recorded UNet pass: every layer's maps kept, then meaned over layers × heads (in the model dtype,
        then cast to fp32, step 8): factor -> (r², 77) cross and (r², r²) self."""
        unet = self.models.unet
        store: list[tuple[str, int, torch.Tensor]] = []
        originals = dict(unet.attn_processors)
        processors = {name: _KeepEveryLayer(store, *self.layers[name], e_c) if name in self.layers else proc
                      for name, proc in originals.items()}
        unet.set_attn_processor(processors)
        try:
            unet(z, t, encoder_hidden_states=e_t)
        finally:
            unet.set_attn_processor(dict(originals))  # it empties the dict it is given
        means = {}
        for kind in ("cross", "self"):
            factors = sorted({f for k, f, _ in store if k == kind})
            means[kind] = {f: torch.stack([p for k, g, p in store if (k, g) == (kind, f)]).mean(dim=(0, 1)).float()
                           for f in factors}
        return means["cross"], means["self"]

    def _class_maps(self, cross: dict[int, torch.Tensor], selfs: dict[int, torch.Tensor], spans: list[list[int]],
                    side: int) -> torch.Tensor:
        """Steps 9-11: C = Σ w× NearestUp(Cʳ); Pʳ = (Âʳ)^p materialised; M_k = Σ wˢ minmax(Pʳ vec c_k)."""
        cfg = self.config
        fused = None
        for f, w in self.w_cross.items():
            r = side // f
            up = F.interpolate(cross[f].T.reshape(1, -1, r, r), size=(side, side), mode="nearest")[0]
            fused = w * up if fused is None else fused + w * up  # (77, L, L)
        powers = {f: torch.linalg.matrix_power(explicit_affinity(selfs[f], side), cfg.affinity_power)
                  for f in self.w_self}
        maps = []
        for span in spans:
            c = fused[span].mean(dim=0).reshape(-1)
            m = torch.zeros(side * side, device=c.device)
            for f, w in self.w_self.items():
                m = m + w * _minmax(powers[f] @ c)
            maps.append(m.reshape(side, side))
        return torch.stack(maps)
