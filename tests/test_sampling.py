"""The shared sampler (ovss.diffusion.sampling) on the tiny SD-shaped model: seeding, batching, CFG, DAAM maps."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovss.attention import attention_layers
from ovss.diffusion import sampling
from ovss.diffusion.latents import seeded_noise
from ovss.diffusion.sampling import make_scheduler, sample
from ovss.diffusion.text import encode_prompts, tokenize_prompts
from ovss.models import build_tiny

SIZE = 64  # 8x8 latents: every attention level of the tiny UNet still exists
STEPS = 3
ALL_FACTORS = (1, 2, 4, 8)


@pytest.fixture(scope="module")
def dm():
    return build_tiny("diffusion")


def _n_cross_layers(dm) -> int:
    return sum(kind == "cross" for kind, _ in attention_layers(dm.unet).values())


def test_dpmsolver_timesteps_follow_diffusers_014_spacing(dm):
    sched = make_scheduler(dm, "dpmsolver++")
    sched.set_timesteps(30)
    expected = torch.from_numpy(np.linspace(0, 999, 31).round()[::-1][:-1].copy()).long()  # 999, 966, ..., 33
    assert torch.equal(sched.timesteps.long(), expected)
    assert int(sched.timesteps[0]) == 999 and int(sched.timesteps[-1]) == 33


def test_deterministic_and_maps_shaped(dm):
    kw = dict(steps=STEPS, guidance=8.0, seeds=[3, 4], height=SIZE, width=SIZE, capture_cross=ALL_FACTORS,
              token_positions=[[2], [1, 2]], upsample="bicubic")
    a = sample(dm, ["a cat", "a red dog"], **kw)
    b = sample(dm, ["a cat", "a red dog"], **kw)
    assert torch.equal(a.images, b.images)
    assert all(torch.equal(x, y) for x, y in zip(a.cross, b.cross))
    assert a.images.shape == (2, 3, SIZE, SIZE) and 0 <= float(a.images.min()) and float(a.images.max()) <= 1
    assert [tuple(m.shape) for m in a.cross] == [(1, 8, 8), (2, 8, 8)]
    assert a.cross_layer_calls == STEPS * _n_cross_layers(dm)
    assert all(float(m.min()) >= 0 for m in a.cross)  # bicubic maps are clamped at 0 before averaging
    c = sample(dm, ["a cat", "a red dog"], **{**kw, "seeds": [5, 4]})
    assert not torch.allclose(c.images[0], a.images[0]) and torch.allclose(c.images[1], a.images[1], atol=1e-4)


def test_batch_composition_does_not_change_an_image(dm):
    kw = dict(steps=STEPS, guidance=8.0, height=SIZE, width=SIZE, capture_cross=ALL_FACTORS)
    together = sample(dm, ["a cat", "a dog", "a tree"], seeds=[1, 2, 3], **kw)
    alone = sample(dm, ["a dog"], seeds=[2], **kw)
    micro = sample(dm, ["a cat", "a dog", "a tree"], seeds=[1, 2, 3], batch_size=2, **kw)
    # another batch only reorders float sums: attention probabilities (up to 0.28 here) move by 1.4e-5 at most
    assert torch.allclose(together.images[1], alone.images[0], atol=1e-4)
    assert torch.allclose(together.cross[1], alone.cross[0], atol=5e-5)
    assert torch.allclose(micro.images, together.images, atol=1e-4)
    assert torch.allclose(torch.stack(micro.cross), torch.stack(together.cross), atol=5e-5)


def test_seeds_equal_explicit_seeded_latents(dm):
    latents = torch.cat([seeded_noise((1, 4, 8, 8), s, torch.float32) for s in (7, 8)])
    a = sample(dm, ["a cat", "a dog"], steps=2, guidance=3.0, seeds=[7, 8], height=SIZE, width=SIZE)
    b = sample(dm, ["a cat", "a dog"], steps=2, guidance=3.0, latents=latents, height=SIZE, width=SIZE)
    assert torch.equal(a.images, b.images)
    with pytest.raises(ValueError):
        sample(dm, ["a cat"], steps=2, guidance=3.0, height=SIZE, width=SIZE)


@torch.no_grad()
def _restated_sampler(dm, prompt: str, negative: str, guidance: float, seed: int) -> torch.Tensor:
    """ε = ε_u + g·(ε_c − ε_u) with the negative prompt as ε_u, written out with diffusers' DPM-Solver++."""
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler.from_config(dm.scheduler.config, algorithm_type="dpmsolver++", solver_order=2,
                                                    timestep_spacing="linspace", final_sigmas_type="sigma_min")
    sched.set_timesteps(STEPS)
    cond = encode_prompts(dm.text_encoder, tokenize_prompts(dm.tokenizer, [prompt]))
    uncond = encode_prompts(dm.text_encoder, tokenize_prompts(dm.tokenizer, [negative]))
    z = seeded_noise((1, 4, 8, 8), seed, torch.float32)
    for t in sched.timesteps:
        eps_c = dm.unet(z, t, encoder_hidden_states=cond).sample
        eps_u = dm.unet(z, t, encoder_hidden_states=uncond).sample
        z = sched.step(eps_u + guidance * (eps_c - eps_u), t, z).prev_sample
    return (dm.vae.decode(z / dm.vae_scale).sample / 2 + 0.5).clamp(0, 1)


def test_cfg_formula_and_negative_prompt(dm):
    def run(guidance: float, negative: str):
        return sample(dm, ["a cat"], steps=STEPS, guidance=guidance, negative_prompt=negative, seeds=[11],
                      height=SIZE, width=SIZE)

    got = run(8.0, "blurry")
    want = _restated_sampler(dm, "a cat", "blurry", 8.0, 11)
    assert torch.allclose(got.images, want, atol=1e-4)
    assert not torch.allclose(run(8.0, "sharp").images, got.images, atol=1e-3)
    # guidance 1 is the conditional branch alone: the negative prompt no longer matters
    g1a, g1b = run(1.0, "blurry"), run(1.0, "sharp")
    assert torch.equal(g1a.images, g1b.images)
    assert torch.allclose(g1a.images, _restated_sampler(dm, "a cat", "whatever", 1.0, 11), atol=1e-4)


def test_cross_maps_over_all_tokens_sum_to_one(dm):
    res = sample(dm, ["a cat on a sofa"], steps=2, guidance=5.0, seeds=[0], height=SIZE, width=SIZE,
                 capture_cross=ALL_FACTORS, upsample="bilinear")
    maps = res.cross[0]
    assert maps.shape == (77, 8, 8)
    # each map is a softmax over the 77 tokens; bilinear upsampling and averaging keep the sum at 1
    assert torch.allclose(maps.sum(0), torch.ones(8, 8), atol=1e-5)


def test_self_maps_are_row_stochastic(dm):
    res = sample(dm, ["a cat", "a dog"], steps=2, guidance=5.0, seeds=[0, 1], height=SIZE, width=SIZE,
                 capture_self=(2,))
    assert res.cross is None and res.self_grids == {2: (4, 4)}
    maps = res.self_maps[2]
    assert maps.shape == (2, 16, 16)
    assert torch.allclose(maps.sum(-1), torch.ones(2, 16), atol=1e-5)


def test_daam_equals_brute_force_over_conditional_half(dm, monkeypatch):
    """DAAM store == mean over (step, layer, head) of clamped bicubic maps of the conditional half."""
    records = []
    original = sampling._DAAMCapture.accumulate

    def recording(self, kind, factor, probs, grid):
        records.append((kind, probs.detach().clone(), tuple(grid), self.cond_start))
        return original(self, kind, factor, probs, grid)

    monkeypatch.setattr(sampling._DAAMCapture, "accumulate", recording)
    positions = [3, 4]
    res = sample(dm, ["a good picture of a cat"], steps=2, guidance=8.0, seeds=[9], height=SIZE, width=SIZE,
                 capture_cross=ALL_FACTORS, token_positions=[positions], upsample="bicubic")

    def brute(half: str) -> torch.Tensor:
        maps = []
        for kind, probs, grid, cond_start in records:
            assert kind == "cross" and cond_start == 1
            p = probs[1:] if half == "cond" else probs[:1]
            for head in range(p.shape[1]):
                m = p[0, head][:, positions].T.reshape(len(positions), *grid)[None].float()
                m = F.interpolate(m, size=(8, 8), mode="bicubic", align_corners=False) if grid != (8, 8) else m
                maps.append(m[0].clamp(min=0))
        return torch.stack(maps).mean(0)

    assert len(records) == 2 * _n_cross_layers(dm)
    assert torch.allclose(res.cross[0], brute("cond"), atol=1e-6)
    assert not torch.allclose(res.cross[0], brute("uncond"), atol=1e-4)


def test_bilinear_cross_maps_go_straight_to_cross_size(dm, monkeypatch):
    """cross_size: every (step, layer, head) map upsampled once, bilinearly, straight to that size, then averaged."""
    records = []
    original = sampling._DAAMCapture.accumulate

    def recording(self, kind, factor, probs, grid):
        records.append((probs.detach().clone(), tuple(grid)))
        return original(self, kind, factor, probs, grid)

    monkeypatch.setattr(sampling._DAAMCapture, "accumulate", recording)
    positions, size = [3, 4], (SIZE, SIZE)
    res = sample(dm, ["a good picture of a cat"], steps=2, guidance=8.0, seeds=[9], height=SIZE, width=SIZE,
                 capture_cross=ALL_FACTORS, token_positions=[positions], cross_size=size)
    maps = []
    for probs, grid in records:
        for head in range(probs.shape[1]):
            m = probs[1:][0, head][:, positions].T.reshape(len(positions), *grid)[None].float()
            maps.append(F.interpolate(m, size=size, mode="bilinear", align_corners=False)[0])
    assert res.cross[0].shape == (len(positions), *size)
    assert torch.allclose(res.cross[0], torch.stack(maps).mean(0), atol=1e-6)
    on_latent = sample(dm, ["a good picture of a cat"], steps=2, guidance=8.0, seeds=[9], height=SIZE, width=SIZE,
                       capture_cross=ALL_FACTORS, token_positions=[positions]).cross[0]
    twice = F.interpolate(on_latent[None], size=size, mode="bilinear", align_corners=False)[0]
    assert not torch.allclose(res.cross[0], twice, atol=1e-6)  # two interpolations are not one
