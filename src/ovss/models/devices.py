"""Device and dtype resolution shared by every loader and method.

One place decides what `device=None` / `dtype=None` mean, so a method's paper dtype (fp16 for the diffusion
models) applies on CUDA while CPU runs stay in float32, where half precision is slow or unsupported.
"""
from __future__ import annotations

import torch

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None -> CUDA when available, else CPU. Asking for CUDA without a usable GPU is an error, not a fallback."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"invalid device {device!r}: {err}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"device {str(device)!r} was requested but CUDA is not available "
                f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}); use device='cpu'")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise RuntimeError(f"device {str(device)!r} was requested but only {count} CUDA device(s) exist")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, cuda_default: str = "float16") -> torch.dtype:
    """None -> `cuda_default` on CUDA, float32 elsewhere; names like "fp16"/"bf16"/"fp32" are accepted."""
    if dtype is None:
        dtype = cuda_default if torch.device(device).type == "cuda" else "float32"
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPE_NAMES.values():
            raise ValueError(f"unsupported dtype {dtype}; valid: {', '.join(_DTYPE_NAMES)}")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(_DTYPE_NAMES)}")
    return _DTYPE_NAMES[key]


def model_device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where a loaded module's weights live and in which dtype: inputs are moved to match."""
    p = next(module.parameters())
    return p.device, p.dtype
