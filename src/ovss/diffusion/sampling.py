"""Text-to-image sampling with classifier-free guidance that records attention on the fly (DAAM-style).

OVDiff (support sets) and FreeDA (its caption collection) both generate images and read, for chosen prompt
tokens, the cross-attention averaged over steps × layers × heads of the *conditional* half of the CFG batch.
Keeping per-step maps would cost gigabytes, so maps are reduced while the UNet runs: each layer call's maps
are brought to the latent grid (or, for the linear bilinear path, summed per factor and upsampled once at the
end) and added to one running sum. Initial noise is drawn per image from its own seed, so an image never
depends on which other prompts shared its batch; callers that must reproduce a batch-dependent official
draw pass `latents` instead.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ovss.attention import AttentionCapture
from ovss.diffusion.latents import seeded_noise
from ovss.diffusion.text import encode_prompts, tokenize_prompts
from ovss.models import DiffusionModels

SchedulerName = Literal["dpmsolver++", "ddim", "default"]
Upsample = Literal["bilinear", "bicubic"]
HeadAverage = Literal["global", "per_layer"]

_CROSS, _SELF = "cross", "self"


@dataclass
class SampleResult:
    """images: (B, 3, H, W) float32 in [0, 1] on the CPU.

    cross: per prompt, (P_i, h, w) float32 on the latent grid (or `cross_size`): the mean over steps × captured cross layers ×
    heads of the attention probability of each requested token position (all 77 tokens when
    `token_positions` was None); None when no cross layer was captured.
    self_maps: factor -> (B, n, n) mean self-attention (rows = queries) with `self_grids[factor]` = (h_f, w_f).
    latents: the final latents (B, C, h, w) when asked for. cross_layer_calls: captured cross-layer calls
    (layers × steps), for checks.
    """

    images: torch.Tensor
    cross: list[torch.Tensor] | None
    self_maps: dict[int, torch.Tensor]
    self_grids: dict[int, tuple[int, int]]
    latents: torch.Tensor | None
    cross_layer_calls: int


def make_scheduler(dm: DiffusionModels, name: SchedulerName):
    """A fresh scheduler (multistep solvers keep state between steps, so never share one across calls).

    "dpmsolver++": DPM-Solver++ multistep, order 2, with the diffusers-0.14 behaviour OVDiff ran under:
    "linspace" spacing (30 steps -> 999, 966, ..., 33) and a final step to σ_min rather than to 0.
    "ddim": DDIM on the model's config. "default": a copy of the model's own scheduler.
    """
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    config = dm.scheduler.config
    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="linspace",
            final_sigmas_type="sigma_min", lower_order_final=True)
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "default":
        return type(dm.scheduler).from_config(config)
    raise ValueError(f"unknown scheduler {name!r}; use 'dpmsolver++', 'ddim' or 'default'")


class _DAAMCapture(AttentionCapture):
    """AttentionCapture whose cross maps are reduced DAAM-style: conditional half, chosen tokens, per-head
    upsampling to the latent grid (bicubic maps clamped at 0 one by one), one running sum.

    Self maps keep the parent's per-factor means (on the conditional half).
    """

    def __init__(self, unet: torch.nn.Module, *, cross: Iterable[int], self_attn: Iterable[int],
                 positions: torch.Tensor | None, latent_hw: tuple[int, int], upsample: Upsample,
                 head_average: HeadAverage, out_hw: tuple[int, int] | None = None) -> None:
        super().__init__(unet, cross=cross, self_attn=self_attn)
        self.positions = positions  # (B, P) token indices, or None for all tokens
        self.latent_hw = latent_hw
        self.out_hw = tuple(out_hw or latent_hw)  # where bilinear maps end up (each factor upsampled once)
        self.upsample = upsample
        self.head_average = head_average
        self.cond_start = 0  # index of the first conditional row of the UNet batch
        self._pending: dict[int, torch.Tensor] = {}
        self._pending_heads: dict[int, int] = {}
        self._by_factor: dict[int, torch.Tensor] = {}  # bilinear: per-factor sums at the native grid
        self._latent_sum: torch.Tensor | None = None  # bicubic: sum on the latent grid
        self._weight = 0.0
        self.cross_calls = 0

    def accumulate(self, kind: str, factor: int, probs: torch.Tensor, grid: tuple[int, int]) -> None:
        probs = probs[self.cond_start:]
        if kind != _CROSS:
            super().accumulate(kind, factor, probs, grid)
            return
        b, heads, n, t = probs.shape
        if self.positions is not None:
            idx = self.positions.to(probs.device)[:, None, None, :].expand(b, heads, n, -1)
            probs = probs.gather(-1, idx)
        maps = probs.float().permute(0, 1, 3, 2).reshape(b, -1, *grid)  # (B, heads·P, h_f, w_f)
        if self.upsample == "bicubic":
            if tuple(grid) != self.latent_hw:
                maps = F.interpolate(maps, size=self.latent_hw, mode="bicubic", align_corners=False)
            maps = maps.clamp_(min=0)
        summed = maps.reshape(b, heads, -1, *maps.shape[-2:]).sum(1)
        self._pending[factor] = summed if factor not in self._pending else self._pending[factor] + summed
        self._pending_heads[factor] = self._pending_heads.get(factor, 0) + heads

    def end_layer(self, kind: str, factor: int) -> None:
        if kind != _CROSS:
            super().end_layer(kind, factor)
            return
        pending, heads = self._pending.pop(factor), self._pending_heads.pop(factor)
        scale = 1.0 if self.head_average == "global" else 1.0 / heads
        self._weight += heads if self.head_average == "global" else 1.0
        self.cross_calls += 1
        if self.upsample == "bicubic":
            self._latent_sum = pending * scale if self._latent_sum is None else self._latent_sum.add_(pending * scale)
        else:
            prev = self._by_factor.get(factor)
            self._by_factor[factor] = pending * scale if prev is None else prev.add_(pending * scale)

    def daam(self) -> torch.Tensor | None:
        """(B, P, h, w): the mean over every (step, layer, head) map captured."""
        if self.cross_calls == 0:
            return None
        if self.upsample == "bicubic":
            total = self._latent_sum
        else:  # bilinear is linear: upsampling each factor's sum once equals upsampling every map
            total = sum(m if tuple(m.shape[-2:]) == self.out_hw
                        else F.interpolate(m, size=self.out_hw, mode="bilinear", align_corners=False)
                        for m in self._by_factor.values())
        return total / self._weight


@torch.no_grad()
def sample(dm: DiffusionModels, prompts: Sequence[str], *, steps: int, guidance: float,
           negative_prompt: str | Sequence[str] = "", scheduler: SchedulerName = "dpmsolver++",
           seeds: Sequence[int] | None = None, latents: torch.Tensor | None = None,
           height: int | None = None, width: int | None = None, capture_cross: Iterable[int] = (),
           capture_self: Iterable[int] = (), token_positions: Sequence[Sequence[int]] | None = None,
           upsample: Upsample = "bilinear", head_average: HeadAverage = "global", return_latents: bool = False,
           batch_size: int | None = None, progress: Callable[[int], None] | None = None,
           cross_size: tuple[int, int] | None = None) -> SampleResult:
    """Generate one image per prompt, recording attention; see SampleResult.

    CFG: ε = ε_u + guidance·(ε_c − ε_u) with the negative prompt as the unconditional branch; guidance 1 runs
    the conditional branch only. seeds: one per prompt (initial noise from `seeded_noise(seed)`), or pass
    `latents` (B, C, h, w) to supply the initial noise yourself. capture_cross / capture_self: UNet
    downsampling factors (1 = latent grid) whose attn2 / attn1 layers are recorded. batch_size: prompts per
    UNet call (results do not depend on it). progress: called with 1 after every denoising step.
    cross_size: (h, w) the bilinear cross maps are brought to, each attention scale upsampled once (FreeDA
    upsamples every scale straight to the image); default the latent grid. Bicubic maps stay on the latent grid.
    """
    prompts = list(prompts)
    n = len(prompts)
    if (seeds is None) == (latents is None):
        raise ValueError("pass exactly one of seeds (one per prompt) or latents")
    if seeds is not None and len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} prompts")
    if latents is not None and latents.shape[0] != n:
        raise ValueError(f"latents for {latents.shape[0]} images, {n} prompts")
    if token_positions is not None and len(token_positions) != n:
        raise ValueError(f"token_positions for {len(token_positions)} prompts, {n} prompts given")
    negatives = [negative_prompt] * n if isinstance(negative_prompt, str) else list(negative_prompt)
    if len(negatives) != n:
        raise ValueError(f"{len(negatives)} negative prompts for {n} prompts")
    if upsample not in ("bilinear", "bicubic") or head_average not in ("global", "per_layer"):
        raise ValueError(f"upsample={upsample!r}, head_average={head_average!r}: use bilinear|bicubic and "
                         "global|per_layer")
    step = batch_size or max(n, 1)
    parts = []
    for s in range(0, n, step):
        sl = slice(s, s + step)
        parts.append(_sample_batch(
            dm, prompts[sl], negatives[sl], steps=steps, guidance=guidance, scheduler=scheduler,
            seeds=None if seeds is None else list(seeds[sl]), latents=None if latents is None else latents[sl],
            height=height, width=width, capture_cross=tuple(capture_cross), capture_self=tuple(capture_self),
            token_positions=None if token_positions is None else token_positions[sl], upsample=upsample,
            head_average=head_average, return_latents=return_latents, progress=progress, cross_size=cross_size))
    return _concat(parts)


def _sample_batch(dm: DiffusionModels, prompts: list[str], negatives: list[str], *, steps: int, guidance: float,
                  scheduler: SchedulerName, seeds: list[int] | None, latents: torch.Tensor | None,
                  height: int | None, width: int | None, capture_cross: tuple[int, ...],
                  capture_self: tuple[int, ...], token_positions, upsample: Upsample, head_average: HeadAverage,
                  return_latents: bool, progress, cross_size: tuple[int, int] | None = None) -> SampleResult:
    unet, vae = dm.unet, dm.vae
    device, dtype = unet.device, unet.dtype
    b = len(prompts)
    h_px, w_px = height or dm.native_resolution, width or dm.native_resolution
    f = dm.vae_factor
    if h_px % f or w_px % f:
        raise ValueError(f"height and width must be multiples of {f}, got {h_px}x{w_px}")
    shape = (unet.config.in_channels, h_px // f, w_px // f)
    if latents is None:
        latents = torch.cat([seeded_noise((1, *shape), seed, torch.float32) for seed in seeds])
    elif tuple(latents.shape[1:]) != shape:
        raise ValueError(f"latents of shape {tuple(latents.shape[1:])}, the UNet needs {shape}")
    cfg = guidance != 1.0
    context = encode_prompts(dm.text_encoder, tokenize_prompts(dm.tokenizer, prompts))
    if cfg:
        uncond = encode_prompts(dm.text_encoder, tokenize_prompts(dm.tokenizer, negatives))
        context = torch.cat([uncond, context])
    context = context.to(dtype)
    positions = None
    if token_positions is not None:
        width_p = max(len(p) for p in token_positions)
        if width_p == 0 or any(not p for p in token_positions):
            raise ValueError("every prompt needs at least one token position")
        # Ragged lists are padded with their own first position; the padding is cut off again below.
        positions = torch.tensor([list(p) + [p[0]] * (width_p - len(p)) for p in token_positions])
        if int(positions.max()) >= context.shape[1] or int(positions.min()) < 0:
            raise ValueError(f"token positions must lie in [0, {context.shape[1]})")

    sched = make_scheduler(dm, scheduler)
    sched.set_timesteps(steps, device=device)
    z = (latents.to(device=device, dtype=torch.float32) * sched.init_noise_sigma).to(dtype)
    with _DAAMCapture(unet, cross=capture_cross, self_attn=capture_self, positions=positions,
                      latent_hw=shape[1:], upsample=upsample, head_average=head_average, out_hw=cross_size) as cap:
        cap.cond_start = b if cfg else 0
        for t in sched.timesteps:
            z_in = sched.scale_model_input(torch.cat([z, z]) if cfg else z, t)
            eps = unet(z_in, t, encoder_hidden_states=context).sample
            if cfg:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + guidance * (eps_c - eps_u)
            z = sched.step(eps, t, z).prev_sample
            if progress is not None:
                progress(1)
        daam = cap.daam()
        self_maps = cap.self_maps()
        self_grids = {fac: cap.grid(fac) for fac in self_maps}
        calls = cap.cross_calls
    images = (vae.decode(z.to(vae.dtype) / dm.vae_scale).sample.float() / 2 + 0.5).clamp(0, 1).cpu()
    cross = None
    if daam is not None:
        daam = daam.cpu()
        cross = [daam[i, :len(token_positions[i])] if token_positions is not None else daam[i] for i in range(b)]
    return SampleResult(images, cross, {k: v.cpu() for k, v in self_maps.items()}, self_grids,
                        z.float().cpu() if return_latents else None, calls)


def _concat(parts: list[SampleResult]) -> SampleResult:
    if len(parts) == 1:
        return parts[0]
    cross = None if parts[0].cross is None else [m for p in parts for m in p.cross]
    self_maps = {k: torch.cat([p.self_maps[k] for p in parts]) for k in parts[0].self_maps}
    latents = None if parts[0].latents is None else torch.cat([p.latents for p in parts])
    return SampleResult(torch.cat([p.images for p in parts]), cross, self_maps, parts[0].self_grids, latents,
                        sum(p.cross_layer_calls for p in parts))
