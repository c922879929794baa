"""Self-supervised training without labels for the toy world's DINOv2: the pieces
`python -m ovss.toy.train dinov2` composes.

The objective is MoCo v3's (InfoNCE between a student's predicted CLS embedding and an EMA teacher's, over
DINO's multi-crop views) plus a masked-patch term in the spirit of iBOT / data2vec (the student predicts the
teacher's patch tokens where its own input was masked). Why not DINO's own loss: on this budget (~1,000
steps on a CPU) it sat at the uniform plateau (loss = ln K) for the whole first fifth of a run; InfoNCE learns
from the first step, as the toy CLIP did. Why the patch term: FreeDA pools DINOv2 *patch* tokens inside masks
and OVDiff matches DINO *keys* per patch, so every patch token has to be trained, not only CLS.
Augmentations are DINO's (multi-crop, flips, its colour jitter and grayscale); a stronger hue jitter (any hue)
left InfoNCE near chance for 200 steps.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

#: MoCo v3's InfoNCE temperature (Chen et al. 2021, §4: 0.2) and the teacher's EMA momentum, cosine from
#: 0.99 to 1 (MoCo v3 starts at 0.99).
TEMPERATURE = 0.2
TEACHER_MOMENTUM = 0.99
#: Multi-crop: 2 global crops of the whole side (area 0.35-1) and 4 local crops of half the side (area 0.1-0.35).
GLOBAL_SCALE = (0.35, 1.0)
LOCAL_SCALE = (0.1, 0.35)
N_LOCAL = 4
#: iBOT: half the global crops get a random share (0.1-0.5) of their patches masked in the student.
MASK_PROBABILITY = 0.5
MASK_RATIO = (0.1, 0.5)


def mlp(dim: int, hidden: int, out: int) -> nn.Sequential:
    """MoCo v3's projector / predictor shape, smaller: Linear-LayerNorm-GELU-Linear."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, out))


def _affine_crops(x: torch.Tensor, side: int, scale: tuple[float, float], g: torch.Generator) -> torch.Tensor:
    """Random resized crops (area share in `scale`, aspect 3/4-4/3) with random horizontal flips, batched."""
    b = x.shape[0]
    area = torch.empty(b).uniform_(*scale, generator=g)
    log_ratio = torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3), generator=g)
    ratio = log_ratio.exp()
    sw, sh = (area * ratio).sqrt().clamp(max=1.0), (area / ratio).sqrt().clamp(max=1.0)
    cx = (torch.rand(b, generator=g) * 2 - 1) * (1 - sw)
    cy = (torch.rand(b, generator=g) * 2 - 1) * (1 - sh)
    flip = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = sw * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = sh, cy
    grid = F.affine_grid(theta, (b, 3, side, side), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """Rec. 601 luma of (B, 3, H, W), broadcast back to 3 channels (the Y row of the YIQ matrix below)."""
    return (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:]).expand_as(x)


def _colour_jitter(x: torch.Tensor, g: torch.Generator, p: float = 0.8, gray: float = 0.2) -> torch.Tensor:
    """DINO's ColorJitter(0.4, 0.4, 0.2, 0.1) with probability p (hue as a rotation in YIQ, ±0.1 of a turn),
    grayscale with probability `gray`."""
    b = x.shape[0]

    def factor(lo: float, hi: float) -> torch.Tensor:
        on = torch.rand(b, generator=g) < p
        return torch.where(on, torch.empty(b).uniform_(lo, hi, generator=g), torch.ones(b)).view(b, 1, 1, 1)

    x = x * factor(0.6, 1.4)
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * factor(0.6, 1.4) + mean
    luma = _luma(x)
    x = (x - luma) * factor(0.8, 1.2) + luma
    turn = 0.1 * 2 * math.pi
    angle = torch.where(torch.rand(b, generator=g) < p, torch.empty(b).uniform_(-turn, turn, generator=g),
                        torch.zeros(b))
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    rot = torch.zeros(b, 3, 3)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = angle.cos(), -angle.sin(), angle.sin(), angle.cos()
    m = torch.linalg.inv(to_yiq) @ rot @ to_yiq  # (b, 3, 3)
    x = torch.einsum("bij,bjhw->bihw", m, x)
    gray_on = (torch.rand(b, generator=g) < gray).view(b, 1, 1, 1)
    x = torch.where(gray_on, _luma(x), x)
    return x.clamp(0, 1)


def multi_crop(x: torch.Tensor, g: torch.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(B, 3, S, S) in [0, 1] -> 2 global crops at S and N_LOCAL local crops at S/2, each jittered."""
    side = x.shape[-1]
    globals_ = [_colour_jitter(_affine_crops(x, side, GLOBAL_SCALE, g), g) for _ in range(2)]
    locals_ = [_colour_jitter(_affine_crops(x, side // 2, LOCAL_SCALE, g), g) for _ in range(N_LOCAL)]
    return globals_, locals_


def random_patch_masks(b: int, n_patches: int, g: torch.Generator) -> torch.Tensor:
    """(b, n_patches) bool: for MASK_PROBABILITY of the images, a random MASK_RATIO share of patches."""
    masked = torch.rand(b, generator=g) < MASK_PROBABILITY
    ratio = torch.empty(b).uniform_(*MASK_RATIO, generator=g) * masked
    scores = torch.rand(b, n_patches, generator=g)
    k = (ratio * n_patches).round().long()
    ranks = scores.argsort(1).argsort(1)
    return ranks < k[:, None]


class SelfDistillation(nn.Module):
    """Student backbone + projector + predictors, EMA teacher (backbone + projector);
    `loss(globals, locals, masks)`, then `update_teacher(progress)` after each optimiser step."""

    def __init__(self, backbone: nn.Module, dim_out: int = 64, hidden: int = 256) -> None:
        super().__init__()
        dim = backbone.config.hidden_size
        self.student, self.projector = backbone, mlp(dim, hidden, dim_out)
        self.predictor = mlp(dim_out, hidden, dim_out)
        self.patch_predictor = mlp(dim, hidden, dim)
        self.teacher, self.teacher_projector = copy.deepcopy(backbone), copy.deepcopy(self.projector)
        for m in (self.teacher, self.teacher_projector):
            m.requires_grad_(False)

    def student_parameters(self) -> list[nn.Parameter]:
        return [p for m in (self.student, self.projector, self.predictor, self.patch_predictor) for p in m.parameters()]

    def _infonce(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).T / TEMPERATURE
        return F.cross_entropy(logits, torch.arange(q.shape[0])) * 2 * TEMPERATURE

    def loss(self, globals_: list[torch.Tensor], locals_: list[torch.Tensor], masks: list[torch.Tensor]
             ) -> tuple[torch.Tensor, dict]:
        with torch.no_grad():
            teacher = [self.teacher(pixel_values=x).last_hidden_state for x in globals_]
            keys = [self.teacher_projector(h[:, 0]) for h in teacher]
        student = [self.student(pixel_values=x, bool_masked_pos=m).last_hidden_state for x, m in zip(globals_, masks)]
        q_global = [self.predictor(self.projector(h[:, 0])) for h in student]
        q_local = [self.predictor(self.projector(self.student(pixel_values=x).last_hidden_state[:, 0]))
                   for x in locals_]
        terms = [self._infonce(q_global[i], keys[1 - i]) for i in range(2)]
        terms += [self._infonce(q, keys[i]) for q in q_local for i in range(2)]
        l_cls = torch.stack(terms).mean()
        patch_terms = []
        for h, t, m in zip(student, teacher, masks):
            if m.any():
                pred = F.normalize(self.patch_predictor(h[:, 1:][m]), dim=-1)
                patch_terms.append((2 - 2 * (pred * F.normalize(t[:, 1:][m], dim=-1)).sum(-1)).mean())
        l_patch = torch.stack(patch_terms).mean() if patch_terms else torch.zeros(())
        return l_cls + l_patch, {"infonce": l_cls.detach(), "patch": l_patch.detach()}

    @torch.no_grad()
    def update_teacher(self, progress: float) -> None:
        m = 1 - (1 - TEACHER_MOMENTUM) * (math.cos(math.pi * min(1.0, progress)) + 1) / 2
        for s, t in ((self.student, self.teacher), (self.projector, self.teacher_projector)):
            for ps, pt in zip(s.parameters(), t.parameters()):
                pt.mul_(m).add_(ps.detach(), alpha=1 - m)
