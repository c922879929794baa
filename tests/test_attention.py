"""AttentionCapture and the map ops, on tiny random-weight diffusers UNets built from configs."""
from __future__ import annotations

import re

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from ovss.attention import AttentionCapture, attention_layers, minmax, tokens_to_grid
from ovss.attention.capture import _CaptureProcessor

CTX_DIM, N_TOKENS = 32, 7
SD1_FACTORS = (1, 2, 4, 8)


def _sd1_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=2, cross_attention_dim=CTX_DIM, attention_head_dim=16, norm_num_groups=8,
    ).eval()


def _sd2_unet() -> UNet2DConditionModel:
    """SD-2.x habits: linear proj_in/out, per-block head counts (diffusers' `attention_head_dim` = heads), upcast."""
    torch.manual_seed(1)
    return UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=2, cross_attention_dim=CTX_DIM, attention_head_dim=(2, 2, 4, 4), norm_num_groups=8,
        use_linear_projection=True, upcast_attention=True,
    ).eval()


def _two_level_unet() -> UNet2DConditionModel:
    torch.manual_seed(2)
    return UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, cross_attention_dim=CTX_DIM,
        attention_head_dim=4, norm_num_groups=8,
    ).eval()


@pytest.fixture(scope="module")
def sd1():
    return _sd1_unet()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(3)
    sample = torch.randn(2, 4, 16, 12, generator=g)
    context = torch.randn(2, N_TOKENS, CTX_DIM, generator=g)
    return sample, context


def _run(unet, sample, context) -> torch.Tensor:
    with torch.no_grad():
        return unet(sample, 1, encoder_hidden_states=context).sample


def _expected_factor(name: str, n_blocks: int) -> int:
    """The brief's rule, restated: down i -> 2**i, mid -> 2**(n-1), up j -> 2**(n-1-j)."""
    block, index = re.match(r"(down_blocks|mid_block|up_blocks)\.?(\d*)", name).groups()
    if block == "mid_block":
        return 2 ** (n_blocks - 1)
    return 2 ** int(index) if block == "down_blocks" else 2 ** (n_blocks - 1 - int(index))


def _manual_probs(unet, sample, context):
    """Per layer: (kind, factor, softmax(Q Kᵀ / sqrt(d)) per head) from hooked to_q / to_k outputs."""
    seen: dict[str, dict[str, torch.Tensor]] = {}
    hooks = []
    for name, module in unet.named_modules():
        if isinstance(module, Attention):
            for proj in ("to_q", "to_k"):
                hooks.append(getattr(module, proj).register_forward_hook(
                    lambda m, args, out, name=name, proj=proj: seen.setdefault(name, {}).__setitem__(proj, out)))
    try:
        _run(unet, sample, context)
    finally:
        for h in hooks:
            h.remove()
    layers = {}
    for name, qk in seen.items():
        attn = unet.get_submodule(name)
        b, heads = qk["to_q"].shape[0], attn.heads
        q = qk["to_q"].view(b, qk["to_q"].shape[1], heads, -1).transpose(1, 2)
        k = qk["to_k"].view(b, qk["to_k"].shape[1], heads, -1).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        kind = "cross" if name.endswith("attn2") else "self"
        layers[name] = (kind, _expected_factor(name, len(unet.down_blocks)), probs)
    return layers


def _manual_means(layers, kind):
    by_factor: dict[int, list[torch.Tensor]] = {}
    for k, f, probs in layers.values():
        if k == kind:
            by_factor.setdefault(f, []).extend(probs.unbind(1))
    return {f: torch.stack(maps).mean(0) for f, maps in by_factor.items()}


def _capture_all(unet, sample, context, **kwargs) -> tuple[AttentionCapture, torch.Tensor]:
    with AttentionCapture(unet, cross=SD1_FACTORS, self_attn=SD1_FACTORS, **kwargs) as cap:
        out = _run(unet, sample, context)
    return cap, out


@pytest.mark.parametrize("make_unet", [_sd1_unet, _sd2_unet], ids=["sd1", "sd2"])
def test_maps_equal_manual_softmax_and_output_is_unchanged(make_unet, inputs):
    unet = make_unet()
    sample, context = inputs
    reference = _run(unet, sample, context)
    cap, out = _capture_all(unet, sample, context)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)
    layers = _manual_probs(unet, sample, context)
    for kind, got in (("cross", cap.cross_maps()), ("self", cap.self_maps())):
        want = _manual_means(layers, kind)
        assert sorted(got) == sorted(want) == list(SD1_FACTORS)
        for f in want:
            h, w = cap.grid(f)
            assert (h, w) == (-(-16 // f), -(-12 // f))
            n_keys = N_TOKENS if kind == "cross" else h * w
            assert got[f].shape == (2, h * w, n_keys) and got[f].dtype == torch.float32
            torch.testing.assert_close(got[f], want[f], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(got[f].sum(-1), torch.ones(2, h * w), atol=1e-5, rtol=0)


def test_single_layer_factor_is_that_layers_head_mean(sd1, inputs):
    """The mid block is the only layer at factor 8: its map is that layer's softmax averaged over heads."""
    sample, context = inputs
    cap, _ = _capture_all(sd1, sample, context)
    layers = _manual_probs(sd1, sample, context)
    _, _, probs = layers["mid_block.attentions.0.transformer_blocks.0.attn2"]
    torch.testing.assert_close(cap.cross_maps()[8], probs.mean(1), atol=1e-6, rtol=1e-5)


def test_layer_counts_and_factors(sd1, inputs):
    sample, context = inputs
    cap, _ = _capture_all(sd1, sample, context)
    assert cap.layer_counts() == {(kind, f): n for kind in ("cross", "self") for f, n in zip(SD1_FACTORS, (5, 5, 5, 1))}
    layers = attention_layers(sd1)
    assert len(layers) == 32
    for name, (kind, factor) in layers.items():
        assert factor == _expected_factor(name, 4)
        assert kind == ("cross" if ".attn2." in name else "self")


def test_only_requested_layers_get_the_capture_processor(sd1, inputs):
    sample, context = inputs
    originals = dict(sd1.attn_processors)
    with AttentionCapture(sd1, cross=(2, 8), self_attn=(1,)) as cap:
        during = dict(sd1.attn_processors)
        _run(sd1, sample, context)
    for name, proc in during.items():
        kind, factor = attention_layers(sd1)[name]
        captured = (kind == "cross" and factor in (2, 8)) or (kind == "self" and factor == 1)
        assert isinstance(proc, _CaptureProcessor) == captured
        if not captured:
            assert proc is originals[name] and isinstance(proc, AttnProcessor2_0)
    assert sorted(cap.cross_maps()) == [2, 8] and sorted(cap.self_maps()) == [1]
    assert cap.layer_counts() == {("cross", 2): 5, ("cross", 8): 1, ("self", 1): 5}
    assert all(sd1.attn_processors[n] is p for n, p in originals.items())


def test_processors_restored_after_exception_mid_forward(sd1, inputs):
    sample, context = inputs
    originals = dict(sd1.attn_processors)

    def boom(*_):
        raise RuntimeError("boom")

    hook = sd1.mid_block.register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            with AttentionCapture(sd1, cross=SD1_FACTORS, self_attn=SD1_FACTORS) as cap:
                _run(sd1, sample, context)
    finally:
        hook.remove()
    assert cap.layer_counts()[("cross", 1)] == 2  # down_blocks.0 ran before the mid block raised
    assert all(sd1.attn_processors[n] is p for n, p in originals.items())
    assert not sd1._forward_pre_hooks


def test_chunked_heads_give_the_same_maps_and_output(sd1, inputs):
    sample, context = inputs
    full, out_full = _capture_all(sd1, sample, context)
    chunked, out_chunked = _capture_all(sd1, sample, context, chunk_heads=3)
    torch.testing.assert_close(out_chunked, out_full, atol=1e-6, rtol=0)
    for f in SD1_FACTORS:
        torch.testing.assert_close(chunked.self_maps()[f], full.self_maps()[f], atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(chunked.cross_maps()[f], full.cross_maps()[f], atol=1e-7, rtol=1e-6)


def test_extra_context_changes_stored_maps_not_output(sd1, inputs):
    sample, context = inputs
    plain, reference = _capture_all(sd1, sample, context)
    other = torch.randn(2, 5, CTX_DIM, generator=torch.Generator().manual_seed(9))
    with AttentionCapture(sd1, cross=SD1_FACTORS, self_attn=SD1_FACTORS) as dual:
        dual.extra_context = other
        out = _run(sd1, sample, context)
    torch.testing.assert_close(out, reference, atol=1e-6, rtol=0)
    for f in SD1_FACTORS:
        assert dual.cross_maps()[f].shape[-1] == 5
        torch.testing.assert_close(dual.cross_maps()[f].sum(-1), torch.ones(2, dual.cross_maps()[f].shape[1]),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(dual.self_maps()[f], plain.self_maps()[f], atol=1e-7, rtol=1e-6)

    with AttentionCapture(sd1, cross=SD1_FACTORS) as same:
        same.extra_context = context
        _run(sd1, sample, context)
    for f in SD1_FACTORS:
        torch.testing.assert_close(same.cross_maps()[f], plain.cross_maps()[f], atol=1e-7, rtol=1e-6)


def test_extra_context_chunks_are_softmaxed_separately(sd1, inputs):
    sample, context = inputs
    g = torch.Generator().manual_seed(10)
    chunks = [torch.randn(2, 4, CTX_DIM, generator=g), torch.randn(1, 3, CTX_DIM, generator=g)]
    per_chunk = []
    for chunk in chunks:
        with AttentionCapture(sd1, cross=(2, 8)) as cap:
            cap.extra_context = chunk
            _run(sd1, sample, context)
        per_chunk.append(cap.cross_maps())
    with AttentionCapture(sd1, cross=(2, 8)) as cap:
        cap.extra_context = chunks
        _run(sd1, sample, context)
    for f in (2, 8):
        joined = cap.cross_maps()[f]
        torch.testing.assert_close(joined, torch.cat([m[f] for m in per_chunk], -1), atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(joined.sum(-1), torch.full(joined.shape[:2], 2.0), atol=1e-5, rtol=0)


def test_disabled_pass_and_reset(sd1, inputs):
    sample, context = inputs
    reference, _ = _capture_all(sd1, sample, context)
    with AttentionCapture(sd1, cross=SD1_FACTORS, self_attn=(1,)) as cap:
        cap.enabled = False
        out = _run(sd1, sample, context)
        assert cap.cross_maps() == {} and cap.layer_counts() == {}
        cap.enabled = True
        _run(sd1, sample * 2, context)
        cap.reset()
        assert cap.cross_maps() == {} and cap.self_maps() == {}
        _run(sd1, sample, context)
    torch.testing.assert_close(out, _run(sd1, sample, context), atol=1e-6, rtol=0)
    torch.testing.assert_close(cap.cross_maps()[4], reference.cross_maps()[4], atol=1e-7, rtol=1e-6)
    assert cap.layer_counts()[("self", 1)] == 5


def test_two_level_unet_keeps_only_its_factors(inputs):
    unet = _two_level_unet()
    sample, context = inputs
    reference = _run(unet, sample, context)
    cap, out = _capture_all(unet, sample, context)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)
    assert cap.layer_counts() == {("cross", 1): 3, ("cross", 2): 1, ("self", 1): 3, ("self", 2): 1}
    want = _manual_means(_manual_probs(unet, sample, context), "cross")
    assert sorted(cap.cross_maps()) == sorted(want) == [1, 2]
    for f in want:
        torch.testing.assert_close(cap.cross_maps()[f], want[f], atol=1e-6, rtol=1e-5)


def test_fp16_probabilities_are_computed_in_model_dtype(inputs):
    """fp16 maps match an fp16 softmax of the same layer's q/k (summed in fp32); rows sum to 1 (atol 1e-3)."""
    unet = _sd1_unet().half()
    sample, context = (t.half() for t in inputs)
    cap, _ = _capture_all(unet, sample, context)
    _, _, probs = _manual_probs(unet, sample, context)["mid_block.attentions.0.transformer_blocks.0.attn1"]
    assert probs.dtype == torch.float16
    got = cap.self_maps()[8]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, probs.float().mean(1), atol=2e-3, rtol=0)
    torch.testing.assert_close(got.sum(-1), torch.ones(got.shape[:2]), atol=1e-3, rtol=0)


@pytest.mark.parametrize("use_mask", [False, True])
def test_processor_handles_attention_options(sd1, use_mask):
    """group_norm, spatial_norm, norm_cross, residual, rescale and 4-D input: output equals AttnProcessor2_0's."""
    torch.manual_seed(4)
    attn = Attention(query_dim=32, cross_attention_dim=12, heads=4, dim_head=8, norm_num_groups=4,
                     spatial_norm_dim=6, cross_attention_norm="layer_norm", residual_connection=True,
                     rescale_output_factor=2.0, bias=True).eval()
    x, temb = torch.randn(2, 32, 3, 5), torch.randn(2, 6, 3, 5)
    context = torch.randn(2, 9, 12)
    mask = None
    if use_mask:
        mask = torch.zeros(2, 1, 9)
        mask[:, :, -3:] = -10000.0
    with torch.no_grad():
        reference = attn(x, encoder_hidden_states=context, attention_mask=mask, temb=temb)
        cap = AttentionCapture(sd1)
        attn.set_processor(_CaptureProcessor(cap, "cross", 1, attn.processor))
        out = attn(x, encoder_hidden_states=context, attention_mask=mask, temb=temb)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)
    assert cap.grid(1) == (3, 5)
    maps = cap.cross_maps()[1]
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 15), atol=1e-5, rtol=0)
    if use_mask:
        assert maps[..., -3:].max() < 1e-6
    else:  # the class-key path must normalise its context like the output path (norm_cross)
        cap.reset()
        cap.extra_context = context
        with torch.no_grad():
            attn(x, encoder_hidden_states=context, temb=temb)
        torch.testing.assert_close(cap.cross_maps()[1], maps, atol=1e-7, rtol=1e-6)
        cap.extra_context = torch.randn(3, 9, 12)
        with pytest.raises(ValueError, match="batch"):
            attn(x, encoder_hidden_states=context, temb=temb)


def test_minmax_and_tokens_to_grid():
    x = torch.tensor([[[1.0, 3.0], [2.0, 5.0]], [[4.0, 4.0], [4.0, 4.0]]])
    out = minmax(x, (1, 2))
    torch.testing.assert_close(out[0], (x[0] - 1) / 4)
    assert torch.equal(out[1], torch.zeros(2, 2)) and not out.isnan().any()
    torch.testing.assert_close(minmax(x[0], -1), torch.tensor([[0.0, 1.0], [0.0, 1.0]]))

    maps = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)
    grid = tokens_to_grid(maps, (2, 3))
    assert grid.shape == (2, 3, 2, 3)
    for b, t, i, j in [(0, 0, 0, 0), (1, 2, 1, 2), (0, 1, 1, 0)]:
        assert grid[b, t, i, j] == maps[b, i * 3 + j, t]
    with pytest.raises(ValueError):
        tokens_to_grid(maps, (4, 2))
