"""Record attention probabilities of a diffusers UNet, DAAM-style, as a context manager.

SDPA and flash kernels never form the probabilities, so the requested layers get a processor that computes
softmax(Q Kᵀ · scale) explicitly; every other layer keeps its original (fast) processor. Maps are summed per
downsampling factor while the UNet runs, because keeping every 64² self map of SD-1.5 costs gigabytes.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

import torch

_LAYER_NAME = re.compile(r"^(down_blocks|mid_block|up_blocks)(?:\.(\d+))?\..*\.processor$")
CROSS, SELF = "cross", "self"


def attention_layers(unet: torch.nn.Module) -> dict[str, tuple[str, int]]:
    """Processor name -> ("cross" | "self", downsampling factor) for every attention layer in the UNet's blocks.

    The factor follows from the block index: down_blocks.i -> 2**i, mid_block -> 2**(n_down - 1),
    up_blocks.j -> 2**(n_up - 1 - j). The kind comes from the Attention module itself (attn2 in SD).
    """
    n_down, n_up = len(unet.down_blocks), len(unet.up_blocks)
    layers = {}
    for name in unet.attn_processors:
        match = _LAYER_NAME.match(name)
        if match is None:
            continue
        block, index = match.group(1), match.group(2)
        if block == "down_blocks":
            factor = 2 ** int(index)
        elif block == "mid_block":
            factor = 2 ** (n_down - 1)
        else:
            factor = 2 ** (n_up - 1 - int(index))
        module = unet.get_submodule(name.removesuffix(".processor"))
        layers[name] = (CROSS if module.is_cross_attention else SELF, factor)
    return layers


class _CaptureProcessor:
    """Explicit-probability attention that adds its maps to the owning AttentionCapture's running sums.

    Mirrors diffusers' AttnProcessor2_0 step for step (spatial/group norm, norm_cross, q/k norms, masks, 4-D
    input, residual, rescale) so that the layer's output is unchanged; the probabilities come from
    `Attention.get_attention_scores`, which honours the layer's own upcast flags.
    """

    def __init__(self, capture: AttentionCapture, kind: str, factor: int, original: Any):
        self.capture, self.kind, self.factor, self.original = capture, kind, factor, original

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        cap = self.capture
        if not cap.enabled:
            extra = {} if temb is None else {"temb": temb}
            return self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                 attention_mask=attention_mask, **extra)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, n_query, _ = hidden_states.shape
        grid = (height, width) if input_ndim == 4 else cap._grid_from_sample(self.factor, n_query)
        context_len = n_query if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (_split_heads(t, attn.heads, head_dim) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        extra_keys = self._extra_keys(attn, batch, head_dim) if self.kind == CROSS else None

        step = cap.chunk_heads or attn.heads
        outputs = []
        for h0 in range(0, attn.heads, step):
            heads = slice(h0, min(h0 + step, attn.heads))
            q = _merge_heads(query[:, heads])
            mask = None if attention_mask is None else _merge_heads(attention_mask[:, heads])
            probs = attn.get_attention_scores(q, _merge_heads(key[:, heads]), mask)
            outputs.append(torch.bmm(probs, _merge_heads(value[:, heads])).view(batch, -1, n_query, head_dim))
            if extra_keys is not None:
                probs = torch.cat([attn.get_attention_scores(q, _merge_heads(k[:, heads])) for k in extra_keys], -1)
            cap.accumulate(self.kind, self.factor, probs.reshape(batch, -1, n_query, probs.shape[-1]), grid)
        cap.end_layer(self.kind, self.factor)

        hidden_states = torch.cat(outputs, 1).transpose(1, 2).reshape(batch, n_query, attn.heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _extra_keys(self, attn, batch: int, head_dim: int) -> list[torch.Tensor] | None:
        """Per-head keys of FA-Seg's class-only prompt (one entry per chunk), or None for ordinary maps."""
        extra = self.capture.extra_context
        if extra is None:
            return None
        keys = []
        for chunk in [extra] if isinstance(extra, torch.Tensor) else extra:
            if chunk.shape[0] not in (1, batch):
                raise ValueError(f"extra_context batch {chunk.shape[0]} does not match the UNet batch {batch}")
            chunk = chunk.expand(batch, -1, -1)
            if attn.norm_cross:
                chunk = attn.norm_encoder_hidden_states(chunk)
            key = _split_heads(attn.to_k(chunk), attn.heads, head_dim)
            keys.append(attn.norm_k(key) if attn.norm_k is not None else key)
        return keys


def _split_heads(x: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """(B, N, H*d) -> (B, H, N, d)."""
    return x.view(x.shape[0], -1, heads, head_dim).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, d) -> (B*H, N, d), the layout `Attention.get_attention_scores` expects."""
    return x.reshape(-1, *x.shape[2:])


class AttentionCapture:
    """Context manager that records mean attention maps of chosen UNet layers, then restores the UNet.

    `cross` / `self_attn` are downsampling factors (1 = latent grid, 2, 4, ...) whose cross (attn2) / self
    (attn1) layers are captured; factors the UNet lacks are ignored (see `layer_counts`). Only those layers
    get the capture processor. `chunk_heads` bounds the memory of big self maps by processing heads in groups.

    `extra_context` implements FA-Seg's dual prompt: when set to (B, T, D) (or a list of chunks), captured
    cross layers still compute their output from encoder_hidden_states, but store the softmax against
    to_k(extra_context) instead (each chunk softmaxed on its own, concatenated along tokens).
    `enabled = False` makes the capture processors compute outputs only, e.g. for an uncaptured first pass.
    """

    def __init__(self, unet: torch.nn.Module, *, cross: Iterable[int] = (), self_attn: Iterable[int] = (),
                 chunk_heads: int | None = None):
        if chunk_heads is not None and chunk_heads < 1:
            raise ValueError(f"chunk_heads must be >= 1, got {chunk_heads}")
        self.unet = unet
        self.chunk_heads = chunk_heads
        self.extra_context: torch.Tensor | list[torch.Tensor] | None = None
        self.enabled = True
        wanted = {CROSS: {int(f) for f in cross}, SELF: {int(f) for f in self_attn}}
        self._layers = {name: kf for name, kf in attention_layers(unet).items() if kf[1] in wanted[kf[0]]}
        self._originals: dict[str, Any] | None = None
        self._hook = None
        self._sample_hw: tuple[int, int] | None = None
        self.reset()

    def __enter__(self) -> AttentionCapture:
        if self._originals is not None:
            raise RuntimeError("this AttentionCapture is already active")
        originals = dict(self.unet.attn_processors)
        processors = {name: _CaptureProcessor(self, *self._layers[name], proc) if name in self._layers else proc
                      for name, proc in originals.items()}
        self._originals = originals
        try:
            # set_attn_processor empties the dict it is given: pass a copy.
            self.unet.set_attn_processor(dict(processors))
            self._hook = self.unet.register_forward_pre_hook(self._record_sample, with_kwargs=True)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._originals is not None:
            self.unet.set_attn_processor(dict(self._originals))
            self._originals = None

    def _record_sample(self, module, args, kwargs) -> None:
        sample = args[0] if args else kwargs["sample"]
        self._sample_hw = tuple(sample.shape[-2:])

    def _grid_from_sample(self, factor: int, n_query: int) -> tuple[int, int]:
        """Query grid of a 3-D (tokens) input: stride-2 convs with padding 1 give ceil(size / factor)."""
        if self._sample_hw is None:
            raise RuntimeError("attention ran before the UNet's forward: cannot tell the query grid")
        h, w = (math.ceil(s / factor) for s in self._sample_hw)
        if h * w != n_query:
            raise RuntimeError(f"{n_query} queries at factor {factor} do not match a {h}x{w} grid")
        return h, w

    def reset(self) -> None:
        """Clear the accumulated maps (e.g. between an uncaptured and a captured pass)."""
        self._sums: dict[tuple[str, int], torch.Tensor] = {}
        self._n_maps: dict[tuple[str, int], int] = {}
        self._layer_counts: dict[tuple[str, int], int] = {}
        self._grids: dict[int, tuple[int, int]] = {}

    # Extension hooks: the capture processors call accumulate() once per head chunk and end_layer() once per
    # layer call. A subclass overrides them to reduce maps differently (ovss.diffusion.sampling keeps only the
    # conditional half of a CFG batch and chosen tokens, per step).
    def accumulate(self, kind: str, factor: int, probs: torch.Tensor, grid: tuple[int, int]) -> None:
        """Add (B, heads, Nq, T) probabilities, summed over heads in float32, to the running sum."""
        key = (kind, factor)
        summed = probs.sum(1, dtype=torch.float32)
        if key in self._sums:
            if self._sums[key].shape != summed.shape:
                raise RuntimeError(f"{kind} maps at factor {factor} changed shape from "
                                   f"{tuple(self._sums[key].shape)} to {tuple(summed.shape)}: call reset()")
            self._sums[key] += summed
        else:
            self._sums[key] = summed
        self._n_maps[key] = self._n_maps.get(key, 0) + probs.shape[1]
        self._grids[factor] = grid

    def end_layer(self, kind: str, factor: int) -> None:
        """One layer's call is complete (its heads were all passed to accumulate)."""
        self._layer_counts[(kind, factor)] = self._layer_counts.get((kind, factor), 0) + 1

    def _means(self, kind: str) -> dict[int, torch.Tensor]:
        return {f: s / self._n_maps[(k, f)] for (k, f), s in sorted(self._sums.items()) if k == kind}

    def cross_maps(self) -> dict[int, torch.Tensor]:
        """factor -> (B, h*w, T) float32: mean over the captured cross layers and their heads."""
        return self._means(CROSS)

    def self_maps(self) -> dict[int, torch.Tensor]:
        """factor -> (B, h*w, h*w) float32: mean over layers and heads; rows are queries."""
        return self._means(SELF)

    def grid(self, factor: int) -> tuple[int, int]:
        """(h, w) of the query grid at `factor`, as seen in the last captured forward."""
        if factor not in self._grids:
            raise KeyError(f"no attention captured at factor {factor}")
        return self._grids[factor]

    def layer_counts(self) -> dict[tuple[str, int], int]:
        """("cross" | "self", factor) -> number of layer calls aggregated since the last reset."""
        return dict(self._layer_counts)
