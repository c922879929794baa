"""Attention capture for diffusers UNets and the map operations built on it."""
from ovss.attention.capture import AttentionCapture, attention_layers
from ovss.attention.maps import minmax, tokens_to_grid

__all__ = ["AttentionCapture", "attention_layers", "minmax", "tokens_to_grid"]
