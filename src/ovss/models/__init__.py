"""Model loading for ovss: paper presets per method, hub ids or local folders, tiny models, device/dtype.

    from ovss.models import ModelSet
    models = ModelSet("faseg", "tiny", device="cpu", dtype=None)
    models["diffusion"].unet        # built on first access, then cached
"""
from ovss.models.devices import resolve_device, resolve_dtype
from ovss.models.loading import (KINDS, BLIPModels, CLIPModels, DiffusionModels, DINOModels, ModelNotFoundError,
                                 SAMModels, load_component, pipeline_ddim_scheduler)
from ovss.models.presets import PRESETS, ModelSet
from ovss.models.tiny import build_tiny, save_tiny

__all__ = [
    "resolve_device", "resolve_dtype", "ModelNotFoundError", "DiffusionModels", "CLIPModels", "BLIPModels",
    "DINOModels", "SAMModels", "KINDS", "load_component", "pipeline_ddim_scheduler", "PRESETS", "ModelSet",
    "build_tiny", "save_tiny",
]
