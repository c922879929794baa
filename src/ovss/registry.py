"""Method registry: one decorator to register, one factory to build (the timm/open_clip pattern).

Registering is import-time and cheap; building loads models. `create` is the only place that turns a
method name, a models preset and config overrides into a ready segmenter.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, TypeVar

if TYPE_CHECKING:
    from ovss.methods.base import Method

_REGISTRY: dict[str, type["Method"]] = {}
M = TypeVar("M", bound=type)


def register(name: str) -> Callable[[M], M]:
    """Class decorator: make a `Method` subclass available to `create(name)`."""

    def deco(cls: M) -> M:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _ensure_builtin() -> None:
    # Importing the methods package registers the built-in methods.
    import ovss.methods  # noqa: F401


def list_methods() -> list[str]:
    """Names accepted by `create`, sorted."""
    _ensure_builtin()
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type["Method"]:
    _ensure_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}") from None


def create(
    name: str,
    /,
    models: None | str | dict[str, str] = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
    **config: Any,
) -> "Method":
    """Build a segmenter.

    models: None = the paper's hub ids; "tiny" = seeded random tiny models; "toy" = the shipped toy-world
    models; a dict overrides single roles (hub id or local folder) on top of the paper's preset.
    config: fields of the method's Config dataclass (e.g. bg_threshold=0.55).
    """
    cls = get_method_class(name)
    if models == "toy":  # the toy world's geometry (and FreeDA's toy bank) unless the caller says otherwise
        from ovss.models.presets import TOY_CONFIG

        config = {**TOY_CONFIG.get(name, {}), **config}
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise TypeError(
            f"{name}: unknown option(s) {', '.join(unknown)}; valid options: {', '.join(sorted(fields))}"
        )
    return cls(cls.Config(**config), models=models, device=device, dtype=dtype)
