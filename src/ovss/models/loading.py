"""Load one model component from a hub id, a local folder in the hub layout, "tiny" or "toy".

Why this module exists: the four methods need the same handful of models, and three failure modes must be
caught here rather than deep inside a method: a model that is not on this machine (fail in seconds with a
message saying where we looked and how to get it, never hang on the network), a tokenizer that transformers 5
silently replaces by a 2-token stub, and a scheduler config that the paper code only ever saw *after*
diffusers' StableDiffusionPipeline had rewritten it.

Heavy libraries (diffusers, transformers, huggingface_hub) are imported inside functions so that
`import ovss` stays fast.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import partial
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import torch

from ovss.models.devices import resolve_device, resolve_dtype

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import (BlipForConditionalGeneration, BlipProcessor, CLIPModel, CLIPTextModel, CLIPTokenizer,
                              Dinov2Model, PreTrainedTokenizerBase, SamModel, SamProcessor, ViTModel)

#: Component kinds: "dino" is the DINO v1 ViT (OVDiff's `facebook/dino-vitb8`), "sam" transformers' SamModel
#: (OVDiff's SAM mask-source ablation).
KINDS = ("diffusion", "clip", "blip", "dinov2", "dino", "sam")

#: Where `models="toy"` looks: one folder per role (or per kind) in the hub layout.
TOY_DIR = Path(str(resources.files("ovss"))) / "assets" / "toy"

_TRUE = {"1", "ON", "YES", "TRUE"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")  # "name" or "org/name"


class ModelNotFoundError(RuntimeError):
    """A model component could not be found or read; the message says where we looked and how to get it."""


@dataclass
class DiffusionModels:
    """An SD-1.x/2.x-shaped latent diffusion model, split into the parts the methods drive by hand."""

    unet: "UNet2DConditionModel"
    vae: "AutoencoderKL"
    text_encoder: "CLIPTextModel"
    tokenizer: "CLIPTokenizer"
    scheduler: "DDIMScheduler"
    source: str

    @property
    def vae_scale(self) -> float:
        """Latent scaling factor (0.18215 for SD-1.x): z = vae_scale * encoder mean/sample."""
        return float(self.vae.config.scaling_factor)

    @property
    def vae_factor(self) -> int:
        """Pixels per latent cell (8 for SD): the VAE halves the size at each level but the last."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int:
        """The image side the UNet was trained at (512 for SD-1.5: 64 latents × 8)."""
        return int(self.unet.config.sample_size) * self.vae_factor


@dataclass
class CLIPModels:
    model: "CLIPModel"
    tokenizer: "CLIPTokenizer"
    source: str


@dataclass
class BLIPModels:
    model: "BlipForConditionalGeneration"
    processor: "BlipProcessor"
    source: str


@dataclass
class DINOModels:
    """DINOv2 (`Dinov2Model`) for kind "dinov2", DINO v1 (`ViTModel`, no pooler) for kind "dino"."""

    model: "Union[Dinov2Model, ViTModel]"
    source: str


@dataclass
class SAMModels:
    model: "SamModel"
    processor: "SamProcessor"
    source: str


Component = Union[DiffusionModels, CLIPModels, BLIPModels, DINOModels, SAMModels]


def pipeline_ddim_scheduler(config: dict[str, Any]) -> "DDIMScheduler":
    """A DDIMScheduler from a repo's scheduler config, rewritten as StableDiffusionPipeline's constructor does.

    The constructor sets `steps_offset` to 1 when it differs and `clip_sample` to False when True. The paper
    code built its schedulers through that constructor, which is why FA-Seg's single DDIM step runs at t = 1
    (`set_timesteps(1)` -> [1]), and why a PNDM config (SD-1.5's, which has no `clip_sample`, so DDIM's
    default True would apply) still steps without clipping.
    """
    from diffusers import DDIMScheduler

    def public(cfg) -> dict[str, Any]:  # "_class_name", "_use_default_values", ... would override our values
        return {k: v for k, v in dict(cfg).items() if not k.startswith("_")}

    fixed = public(DDIMScheduler.from_config(public(config)).config)
    fixed.update(steps_offset=1, clip_sample=False)  # the constructor's two rewrites
    return DDIMScheduler.from_config(fixed)


def load_component(kind: str, source: str, *, device: str | torch.device | None = None,
                   dtype: str | torch.dtype | None = None, role: str = "") -> Component:
    """Load a component of `kind` from a hub id, a local folder, "tiny" (seeded random), "toy" (shipped) or
    "random" (full-size SD-1.5 shapes with seeded random weights, diffusion only, for benchmarks).

    Modules come back in eval mode with gradients off, on `device` in `dtype`.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if source == "tiny":
        from ovss.models.tiny import build_tiny

        return _finish(build_tiny(kind), dev, dt)
    if source == "random":  # full-size SD-1.5 shapes with random weights: benchmarks only
        if kind != "diffusion":
            raise ModelNotFoundError(f"random full-size weights exist for the diffusion kind only, not {kind} (role "
                                     f"{role or kind!r}): use \"tiny\" or real models for that role")
        from ovss.models.random_full import build_random_full

        return build_random_full(dev, dt)
    if source == "toy":
        folder = _toy_folder(kind, role)
        return _load_folder(kind, folder, dev, dt, role, source=folder, local_only=True)
    path, local_only = _locate(kind, source, role)
    return _load_folder(kind, path, dev, dt, role, source=source, local_only=local_only)


# -- locating ------------------------------------------------------------------------------------------

def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _locate(kind: str, source: str, role: str) -> tuple[str, bool]:
    """(what from_pretrained receives, local_files_only). Offline, a hub id must already be in the HF cache."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        return str(folder), True
    if not _HUB_ID.match(source):  # "./x", "/x", "~/x", "a/b/c": meant as a folder, not a hub id
        raise _not_found(kind, source, role, "no such local folder")
    if not _hub_offline():
        return source, False
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(source, local_files_only=True), True
    except (OSError, ValueError):
        raise _not_found(kind, source, role, "not in the Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading"
                         ) from None


def _toy_folder(kind: str, role: str) -> str:
    candidates = [TOY_DIR / name for name in dict.fromkeys(n for n in (role, kind) if n)]
    for folder in candidates:
        if folder.is_dir():
            return str(folder)
    looked = "\n".join(f"  - {c}" for c in candidates)
    raise ModelNotFoundError(
        f"the toy models are not installed: no toy {kind} model for role {role or kind!r}.\nLooked in:\n{looked}\n"
        "The toy-world models ship with ovss once trained; until then use models=\"tiny\" (random weights, for "
        "smoke tests) or pass real models, e.g. models={\"<role>\": \"DIR\"}.")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _not_found(kind: str, source: str, role: str, reason: str) -> ModelNotFoundError:
    """The error users see: what failed, every place looked, and the command that fixes it."""
    role_name = role or kind
    folder = Path(source).expanduser().resolve()
    looked = [f"local folder: {folder} ({'exists' if folder.is_dir() else 'not a folder'})"]
    if _HUB_ID.match(source) and not folder.is_dir():
        looked += [f"Hugging Face cache: {_hub_cache()}",
                   "Hugging Face hub: " + ("not contacted (HF_HUB_OFFLINE=1)" if _hub_offline() else "contacted")]
        how = (f"To get it, on a machine with internet access run\n"
               f"  hf download {source} --local-dir DIR\n"
               f"  (huggingface_hub < 1.0: huggingface-cli download {source} --local-dir DIR)\n"
               f"then copy DIR here and pass models={{\"{role_name}\": \"DIR\"}}.")
    else:
        how = (f"Pass a folder in the hub layout (e.g. one made by `hf download <hub id> --local-dir DIR`, or "
               f"huggingface-cli download on huggingface_hub < 1.0) as models={{\"{role_name}\": \"DIR\"}}, "
               f"or a hub id.")
    places = "\n".join(f"  - {p}" for p in looked)
    return ModelNotFoundError(f"cannot load the {kind} model for role {role_name!r} from {source!r}: {reason}.\n"
                              f"Looked in:\n{places}\n{how}")


# -- loading -------------------------------------------------------------------------------------------

def _finish(component: Component, device: torch.device, dtype: torch.dtype) -> Component:
    for module in vars(component).values():
        if isinstance(module, torch.nn.Module):
            # Cast only when needed: diffusers warns on every `.to(dtype=...)`, even a no-op one.
            if any(p.dtype != dtype for p in module.parameters()):
                module.to(dtype=dtype)
            module.to(device=device).eval().requires_grad_(False)
    return component


def _check_tokenizer(tokenizer: "PreTrainedTokenizerBase", vocab_size: int, where: str) -> None:
    """transformers 5 turns missing tokenizer files into a 2-token stub instead of raising: refuse it here.

    Only a tokenizer far smaller than the embedding table is refused: real checkpoints often carry a few
    unused embedding rows or added tokens, so the two sizes need not match exactly.
    """
    n = len(tokenizer)
    if n < vocab_size // 2:
        raise OSError(f"the tokenizer in {where} has {n} tokens but the model's vocabulary has {vocab_size}: "
                      "its files (vocab.json + merges.txt, vocab.txt or tokenizer.json) are missing or broken")


def _load_folder(kind: str, path: str, device: torch.device, dtype: torch.dtype, role: str, *, source: str,
                 local_only: bool) -> Component:
    try:
        component = _LOADERS[kind](path, local_only, source, dtype)
    except OSError as err:
        raise _not_found(kind, source, role, _first_line(err)) from err
    return _finish(component, device, dtype)


def _load_diffusion(path: str, local_only: bool, source: str, dtype: torch.dtype) -> DiffusionModels:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    def part(name: str, load):
        try:
            return load(path, subfolder=name, local_files_only=local_only)
        except OSError as err:  # diffusers names the repo folder, not the part that is missing
            raise OSError(f"{name}/: {_first_line(err)}") from err

    unet = part("unet", partial(UNet2DConditionModel.from_pretrained, torch_dtype=dtype))
    vae = part("vae", partial(AutoencoderKL.from_pretrained, torch_dtype=dtype))
    text_encoder = part("text_encoder", partial(CLIPTextModel.from_pretrained, dtype=dtype))
    tokenizer = part("tokenizer", CLIPTokenizer.from_pretrained)
    _check_tokenizer(tokenizer, text_encoder.config.vocab_size, f"{source}/tokenizer")
    scheduler = pipeline_ddim_scheduler(part("scheduler", DDIMScheduler.load_config))
    return DiffusionModels(unet, vae, text_encoder, tokenizer, scheduler, source)


def _load_clip(path: str, local_only: bool, source: str, dtype: torch.dtype) -> CLIPModels:
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(path, dtype=dtype, local_files_only=local_only)
    tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=local_only)
    _check_tokenizer(tokenizer, model.config.text_config.vocab_size, source)
    return CLIPModels(model, tokenizer, source)


def _load_blip(path: str, local_only: bool, source: str, dtype: torch.dtype) -> BLIPModels:
    from transformers import AutoTokenizer, BlipForConditionalGeneration, BlipImageProcessorPil, BlipProcessor

    model = BlipForConditionalGeneration.from_pretrained(path, dtype=dtype, local_files_only=local_only)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
    _check_tokenizer(tokenizer, model.config.text_config.vocab_size, source)
    # The PIL processor, explicitly: where torchvision is installed, BlipProcessor.from_pretrained would pick
    # the torchvision one, whose resize differs slightly.
    image_processor = BlipImageProcessorPil.from_pretrained(path, local_files_only=local_only)
    return BLIPModels(model, BlipProcessor(image_processor=image_processor, tokenizer=tokenizer), source)


def _load_dinov2(path: str, local_only: bool, source: str, dtype: torch.dtype) -> DINOModels:
    from transformers import Dinov2Model

    return DINOModels(Dinov2Model.from_pretrained(path, dtype=dtype, local_files_only=local_only), source)


def _load_dino(path: str, local_only: bool, source: str, dtype: torch.dtype) -> DINOModels:
    from transformers import ViTModel

    model = ViTModel.from_pretrained(path, add_pooling_layer=False, dtype=dtype, local_files_only=local_only)
    return DINOModels(model, source)


def _load_sam(path: str, local_only: bool, source: str, dtype: torch.dtype) -> SAMModels:
    from transformers import SamImageProcessorPil, SamModel, SamProcessor

    model = SamModel.from_pretrained(path, dtype=dtype, local_files_only=local_only)
    image_processor = SamImageProcessorPil.from_pretrained(path, local_files_only=local_only)
    return SAMModels(model, SamProcessor(image_processor=image_processor), source)


_LOADERS = {"diffusion": _load_diffusion, "clip": _load_clip, "blip": _load_blip, "dinov2": _load_dinov2,
            "dino": _load_dino, "sam": _load_sam}


def write_model_index(folder: Path) -> None:
    """model_index.json of a StableDiffusionPipeline repo: what makes a folder of unet/ vae/ text_encoder/
    tokenizer/ scheduler/ load like a hub diffusion model."""
    import diffusers

    index = {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "requires_safety_checker": False,
    }
    (Path(folder) / "model_index.json").write_text(json.dumps(index, indent=2))
