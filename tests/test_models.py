"""ovss.models: device/dtype rules, presets, lazy ModelSet, loading from folders / the HF cache, tiny models."""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ovss.models import (KINDS, PRESETS, BLIPModels, CLIPModels, DiffusionModels, DINOModels, ModelNotFoundError,
                         ModelSet, SAMModels, build_tiny, load_component, pipeline_ddim_scheduler, resolve_device,
                         resolve_dtype, save_tiny)
from ovss.models import loading, presets

# --------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tiny() -> dict:
    """One in-memory tiny build per kind (building the diffusion one takes about a second)."""
    return {kind: build_tiny(kind) for kind in KINDS}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {kind: save_tiny(kind, root / kind) for kind in KINDS}


def _image(h: int = 48, w: int = 64, seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8))


def _modules(component) -> dict[str, torch.nn.Module]:
    return {k: v for k, v in vars(component).items() if isinstance(v, torch.nn.Module)}


@torch.no_grad()
def _outputs(kind: str, c) -> list[torch.Tensor]:
    """A fixed forward pass per kind, touching every module of the component."""
    g = torch.Generator().manual_seed(0)
    if kind == "diffusion":
        ids = c.tokenizer(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        text = c.text_encoder(ids).last_hidden_state
        image = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
        latent = c.vae.encode(image).latent_dist.mean * c.vae_scale
        eps = c.unet(latent, 1, encoder_hidden_states=text).sample
        return [ids, text, latent, eps, c.vae.decode(latent / c.vae_scale).sample]
    if kind == "clip":
        ids = c.tokenizer(["a photo of a cat", "aeroplane"], padding=True, return_tensors="pt")
        pixels = torch.randn(1, 3, 224, 224, generator=g)
        return [ids.input_ids, c.model.get_text_features(**ids).pooler_output,
                c.model.get_image_features(pixel_values=pixels).pooler_output]
    if kind == "blip":
        inputs = c.processor(images=_image(), return_tensors="pt")
        prompted = c.processor(images=_image(), text="a photography of", return_tensors="pt")
        return [inputs.pixel_values, c.model.generate(**inputs, max_length=12),
                c.model.generate(**prompted, max_length=12)]
    if kind in ("dinov2", "dino"):
        return [c.model(pixel_values=torch.randn(1, 3, 56, 84, generator=g),
                        interpolate_pos_encoding=kind == "dino").last_hidden_state]
    inputs = c.processor(images=_image(), input_points=[[[20, 30]]], return_tensors="pt")
    return [inputs["pixel_values"], c.model(**inputs).pred_masks]


# --------------------------------------------------------------------------------------------- devices

def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="invalid device"):
        resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device(None) == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(RuntimeError, match="only 1 CUDA device"):
        resolve_device("cuda:3")


def test_resolve_dtype():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype(None, cpu) == torch.float32
    assert resolve_dtype(None, cuda) == torch.float16
    assert resolve_dtype(None, cuda, cuda_default="bfloat16") == torch.bfloat16
    assert resolve_dtype(None, cpu, cuda_default="bfloat16") == torch.float32
    for names, want in ((("float16", "fp16", "half", "FP16", "torch.float16"), torch.float16),
                        (("bfloat16", "bf16"), torch.bfloat16), (("float32", "fp32"), torch.float32)):
        for name in names:
            assert resolve_dtype(name, cpu) == want, name
    assert resolve_dtype(torch.bfloat16, cuda) == torch.bfloat16
    with pytest.raises(ValueError, match="float16.*bfloat16.*float32"):
        resolve_dtype("int8", cpu)
    with pytest.raises(ValueError, match="unsupported dtype"):
        resolve_dtype(torch.int64, cpu)


# --------------------------------------------------------------------------------------------- presets

def test_presets_name_the_papers_models():
    assert PRESETS["faseg"] == {"diffusion": ("diffusion", "XCLIU/2_rectified_flow_from_sd_1_5"),
                                "captioner": ("blip", "Salesforce/blip-image-captioning-large"),
                                "tagger": ("clip", "openai/clip-vit-base-patch16")}
    assert PRESETS["diffsegmenter"] == {"diffusion": ("diffusion", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
                                        "captioner": ("blip", "Salesforce/blip-image-captioning-large"),
                                        "filter": ("clip", "openai/clip-vit-base-patch16")}
    assert PRESETS["ovdiff"]["diffusion"] == ("diffusion", "stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert PRESETS["ovdiff"]["dino"] == ("dino", "facebook/dino-vitb8")
    assert PRESETS["ovdiff"]["clip"] == ("clip", "openai/clip-vit-base-patch16")
    assert PRESETS["freeda"] == {"diffusion": ("diffusion", "stabilityai/stable-diffusion-2-1-base"),
                                 "dinov2": ("dinov2", "facebook/dinov2-large"),
                                 "clip": ("clip", "openai/clip-vit-large-patch14")}
    for roles in PRESETS.values():
        for kind, hub_id in roles.values():
            assert kind in KINDS and loading._HUB_ID.match(hub_id)


# --------------------------------------------------------------------------------------------- tiny models

@pytest.mark.parametrize("kind", KINDS)
def test_saved_tiny_loads_through_the_real_path_with_identical_outputs(kind, tiny, saved):
    loaded = load_component(kind, str(saved[kind]), device="cpu", dtype="float32", role="r")
    assert type(loaded) is type(tiny[kind]) and loaded.source == str(saved[kind])
    for name, module in _modules(loaded).items():
        assert not module.training and not any(p.requires_grad for p in module.parameters()), name
    # Not bit-exact: memory-mapped weights can be aligned differently, which changes SIMD summation order.
    for got, want in zip(_outputs(kind, loaded), _outputs(kind, tiny[kind]), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_builds_are_deterministic_and_leave_the_global_rng_alone(kind, tiny):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    again = build_tiny(kind)
    assert torch.equal(torch.rand(3), expected_next)
    for name, module in _modules(tiny[kind]).items():
        state, other = module.state_dict(), _modules(again)[name].state_dict()
        assert state.keys() == other.keys()
        assert all(torch.equal(state[k], other[k]) for k in state), name
    assert load_component(kind, "tiny", device="cpu", dtype=None).source == "tiny"


def test_load_component_casts_to_dtype_in_eval_mode(saved):
    d = load_component("diffusion", str(saved["diffusion"]), device="cpu", dtype="bf16")
    for module in _modules(d).values():
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
        assert not module.training


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="valid kinds: diffusion"):
        load_component("vae", "tiny")


def test_tiny_unet_has_sd15_attention_layout(tiny):
    """5/5/5/1 self- and cross-attention layers at downsampling factors 1/2/4/8, 2 heads each (faseg.md §7.1)."""
    d = tiny["diffusion"]
    by_block: dict[tuple[str, str], int] = {}
    factors: dict[tuple[str, int], int] = {}
    hooks = []
    side = 16  # latent side; each attention layer sees side/factor squared queries
    for name, module in d.unet.named_modules():
        kind = name.rsplit(".", 1)[-1]
        if kind not in ("attn1", "attn2"):
            continue
        assert module.heads == 2, name
        block = name.split(".attentions")[0]
        by_block[(block, kind)] = by_block.get((block, kind), 0) + 1

        def hook(mod, args, kwargs, kind=kind):
            factor = side // math.isqrt(args[0].shape[1])
            factors[(kind, factor)] = factors.get((kind, factor), 0) + 1

        hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    with torch.no_grad():
        d.unet(torch.zeros(1, 4, side, side), 1, encoder_hidden_states=torch.zeros(1, 77, 32))
    for h in hooks:
        h.remove()
    for kind in ("attn1", "attn2"):
        assert {f: n for (k, f), n in factors.items() if k == kind} == {1: 5, 2: 5, 4: 5, 8: 1}
        assert {b: n for (b, k), n in by_block.items() if k == kind} == {
            "down_blocks.0": 2, "down_blocks.1": 2, "down_blocks.2": 2, "mid_block": 1,
            "up_blocks.1": 3, "up_blocks.2": 3, "up_blocks.3": 3}


def test_tiny_diffusion_matches_sd_conventions(tiny):
    d = tiny["diffusion"]
    assert d.vae_scale == 0.18215
    with torch.no_grad():
        assert d.vae.encode(torch.zeros(1, 3, 64, 48)).latent_dist.mean.shape == (1, 4, 8, 6)  # factor 8, like SD
    assert len(d.tokenizer) == d.text_encoder.config.vocab_size == 49408
    ids = d.tokenizer("a photo of a cat").input_ids
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (d.text_encoder.config.bos_token_id, d.text_encoder.config.eos_token_id,
            d.text_encoder.config.pad_token_id) == (49406, 49407, 49407)
    cfg = d.scheduler.config
    assert (cfg.beta_schedule, cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps) == ("scaled_linear", 0.00085,
                                                                                          0.012, 1000)
    assert (cfg.clip_sample, cfg.set_alpha_to_one, cfg.steps_offset) == (False, False, 1)


def test_tiny_clip_shape(tiny):
    c = tiny["clip"]
    assert c.model.config.vision_config.num_hidden_layers == 12  # TagCLIP reads blocks 8-11
    assert (c.model.config.vision_config.patch_size, c.model.config.vision_config.image_size) == (16, 224)
    assert c.model.config.projection_dim == 16
    assert math.isclose(c.model.logit_scale.exp().item(), 100.0, rel_tol=1e-6)
    assert len(c.tokenizer) == c.model.config.text_config.vocab_size == 49408


def test_tiny_blip_vocabulary_and_deterministic_generate(tiny):
    b = tiny["blip"]
    tok = b.processor.tokenizer
    assert tok.bos_token == "[DEC]" and b.model.config.text_config.bos_token_id == tok.convert_tokens_to_ids("[DEC]")
    assert b.model.config.text_config.sep_token_id == tok.sep_token_id
    names = ("aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse motorbike person "
             "pottedplant sheep sofa train tvmonitor bag bed bedclothes bench book building cabinet ceiling cloth "
             "computer cup curtain door fence floor flower food grass ground keyboard light mountain mouse plate "
             "platform road rock shelves sidewalk sign sky snow table track tree truck wall water window wood "
             "motorcycle airplane traffic fire hydrant stop parking meter elephant bear zebra giraffe backpack "
             "umbrella handbag tie suitcase frisbee skis snowboard sports ball kite baseball bat glove skateboard "
             "surfboard tennis racket wine glass fork knife spoon bowl banana apple sandwich orange broccoli carrot "
             "hot pizza donut cake couch potted plant dining toilet tv laptop remote cell phone microwave oven "
             "toaster sink refrigerator clock vase scissors teddy hair drier toothbrush "
             "box star ring sand red green blue yellow purple white black small large and on the in of with")
    for word in names.split():
        assert tok.tokenize(word) == [word], word
    text = "a red ball and two blue boxes on the grass near the water"
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
    inputs = b.processor(images=_image(), return_tensors="pt")
    with torch.no_grad():
        first = b.model.generate(**inputs, max_length=20)
        again = build_tiny("blip").model.generate(**inputs, max_length=20)
    assert first[0, 0].item() == tok.bos_token_id and first.shape[1] > 1
    assert torch.equal(first, again)


def test_tiny_dino_grids(tiny):
    with torch.no_grad():
        assert tiny["dinov2"].model(pixel_values=torch.zeros(1, 3, 448, 448)).last_hidden_state.shape == (1, 1025, 32)
        out = tiny["dino"].model(pixel_values=torch.zeros(1, 3, 224, 224)).last_hidden_state
    assert out.shape == (1, 1 + 28 * 28, 32)


# --------------------------------------------------------------------------------------------- scheduler

@pytest.mark.filterwarnings("ignore:The configuration file of this scheduler:FutureWarning")
def test_scheduler_forced_to_steps_offset_1_like_the_pipeline(tmp_path, saved, tiny):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    folder = tmp_path / "sd"
    shutil.copytree(saved["diffusion"], folder)
    cfg_path = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(steps_offset=0, clip_sample=True)
    cfg_path.write_text(json.dumps(cfg))
    assert DDIMScheduler.from_pretrained(folder, subfolder="scheduler").config.steps_offset == 0
    d = load_component("diffusion", str(folder), device="cpu", dtype=None)
    assert d.scheduler.config.steps_offset == 1 and d.scheduler.config.clip_sample is False
    d.scheduler.set_timesteps(1)
    assert d.scheduler.timesteps.tolist() == [1]

    # The same rewrite as diffusers' own pipeline constructor, on a raw steps_offset-0 DDIM scheduler.
    raw = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=True,
                        set_alpha_to_one=False, steps_offset=0)
    t = tiny["diffusion"]
    pipe = StableDiffusionPipeline(vae=t.vae, text_encoder=t.text_encoder, tokenizer=t.tokenizer, unet=t.unet,
                                   scheduler=DDIMScheduler.from_config(raw.config), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    ours = pipeline_ddim_scheduler(raw.config)
    assert {k: v for k, v in ours.config.items() if not k.startswith("_")} == {
        k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}


def test_scheduler_from_a_pndm_config_keeps_its_betas():
    """SD-1.5 ships a PNDM config without clip_sample: DDIM built from it must not clip (pipeline rewrite)."""
    pndm = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1}
    s = pipeline_ddim_scheduler(pndm)
    assert s.config.clip_sample is False and s.config.steps_offset == 1
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    torch.testing.assert_close(s.alphas_cumprod, torch.cumprod(1 - betas, 0))


# --------------------------------------------------------------------------------------------- failures

def test_missing_hub_id_fails_fast_with_a_useful_message(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as info:
        load_component("clip", "openai/clip-vit-base-patch16", device="cpu", role="tagger")
    assert time.perf_counter() - start < 10
    msg = str(info.value)
    from huggingface_hub import constants

    for part in ("'tagger'", "openai/clip-vit-base-patch16", str(tmp_path / "openai" / "clip-vit-base-patch16"),
                 str(constants.HF_HUB_CACHE), "HF_HUB_OFFLINE=1",
                 "huggingface-cli download openai/clip-vit-base-patch16 --local-dir DIR",
                 'models={"tagger": "DIR"}'):
        assert part in msg, part


def test_missing_local_folder_is_not_looked_up_on_the_hub(tmp_path):
    missing = tmp_path / "nowhere" / "sd"
    with pytest.raises(ModelNotFoundError, match="no such local folder") as info:
        load_component("diffusion", str(missing), device="cpu", role="diffusion")
    assert str(missing) in str(info.value) and "Hugging Face cache" not in str(info.value)


def test_hub_id_is_read_from_the_hf_cache_offline(monkeypatch, tmp_path, saved, tiny):
    """The HF cache layout (models--org--name/snapshots/<rev>, refs/main) is found without any network."""
    repo = tmp_path / "hub" / "models--acme--tiny-dinov2"
    shutil.copytree(saved["dinov2"], repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    got = load_component("dinov2", "acme/tiny-dinov2", device="cpu", dtype=None)
    assert isinstance(got, DINOModels) and got.source == "acme/tiny-dinov2"
    torch.testing.assert_close(_outputs("dinov2", got), _outputs("dinov2", tiny["dinov2"]))


@pytest.mark.parametrize("kind,tokenizer_dir", [("clip", ""), ("diffusion", "tokenizer"), ("blip", "")])
def test_folder_with_broken_tokenizer_is_refused(kind, tokenizer_dir, tmp_path, saved):
    folder = tmp_path / kind
    shutil.copytree(saved[kind], folder)
    removed = [p for p in (folder / tokenizer_dir).iterdir()
               if p.name in ("vocab.json", "merges.txt", "vocab.txt", "tokenizer.json")]
    assert removed
    for p in removed:
        p.unlink()
    with pytest.raises(ModelNotFoundError, match="tokenizer .* missing or broken"):
        load_component(kind, str(folder), device="cpu")


def test_folder_missing_a_part_is_refused(tmp_path, saved):
    folder = tmp_path / "sd"
    shutil.copytree(saved["diffusion"], folder)
    shutil.rmtree(folder / "vae")
    with pytest.raises(ModelNotFoundError, match=r"(?s)role 'diffusion'.*vae/.*\(exists\)"):
        load_component("diffusion", str(folder), device="cpu", role="diffusion")


# --------------------------------------------------------------------------------------------- ModelSet

def test_modelset_is_lazy_and_caches(monkeypatch):
    calls = []
    real = presets.load_component

    def counting(kind, source, **kw):
        calls.append((kind, source, kw["role"]))
        return real(kind, source, **kw)

    monkeypatch.setattr(presets, "load_component", counting)
    models = ModelSet("faseg", "tiny", device="cpu", dtype=None)
    assert models.roles == ("diffusion", "captioner", "tagger")
    assert calls == [] and not any(models.is_loaded(r) for r in models.roles)
    tagger = models["tagger"]
    assert isinstance(tagger, CLIPModels) and models["tagger"] is tagger
    assert calls == [("clip", "tiny", "tagger")]
    assert models.is_loaded("tagger") and not models.is_loaded("diffusion")
    assert isinstance(models["captioner"], BLIPModels)
    assert models.sources() == {"diffusion": "tiny", "captioner": "tiny", "tagger": "tiny"}
    assert [models.kind(r) for r in models.roles] == ["diffusion", "blip", "clip"]


def test_modelset_dict_overrides_keep_the_rest_of_the_preset(saved):
    models = ModelSet("diffsegmenter", {"filter": "tiny", "diffusion": str(saved["diffusion"])}, device="cpu")
    assert models.sources() == {"diffusion": str(saved["diffusion"]),
                                "captioner": "Salesforce/blip-image-captioning-large", "filter": "tiny"}
    assert isinstance(models["diffusion"], DiffusionModels) and isinstance(models["filter"], CLIPModels)
    with pytest.raises(ModelNotFoundError, match="'captioner'.*Salesforce/blip-image-captioning-large"):
        models["captioner"]


def test_modelset_errors():
    with pytest.raises(ValueError, match="valid roles: diffusion, captioner, tagger"):
        ModelSet("faseg", {"unet": "tiny"})
    with pytest.raises(ValueError, match="no model preset for method 'segformer'.*faseg"):
        ModelSet("segformer")
    with pytest.raises(ValueError, match="tiny.*toy"):
        ModelSet("faseg", "small")
    models = ModelSet("faseg", "tiny", device="cpu")
    with pytest.raises(ValueError, match="valid roles"):
        models["unet"]


def test_modelset_toy_when_not_installed_and_when_installed(monkeypatch, tmp_path, saved):
    monkeypatch.setattr(loading, "TOY_DIR", tmp_path / "toy")
    models = ModelSet("ovdiff", "toy", device="cpu")
    assert models.sources() == dict.fromkeys(PRESETS["ovdiff"], "toy")
    with pytest.raises(ModelNotFoundError, match="toy models are not installed") as info:
        models["dino"]
    assert str(tmp_path / "toy" / "dino") in str(info.value)
    shutil.copytree(saved["dino"], tmp_path / "toy" / "dino")        # by role
    shutil.copytree(saved["sam"], tmp_path / "toy" / "sam")
    shutil.copytree(saved["clip"], tmp_path / "toy" / "clip")
    assert isinstance(models["dino"], DINOModels) and isinstance(models["sam"], SAMModels)
    faseg = ModelSet("faseg", "toy", device="cpu")
    assert isinstance(faseg["tagger"], CLIPModels)                   # by kind: toy/clip serves role "tagger"


def test_modelset_dtypes_follow_the_papers(saved):
    models = ModelSet("faseg", {"diffusion": str(saved["diffusion"]), "tagger": "tiny", "captioner": "tiny"},
                      device="cpu", dtype="bfloat16", dtypes={"captioner": "bf16"})
    assert models.dtype_of("diffusion") == torch.bfloat16
    assert models.dtype_of("tagger") == torch.float32         # TagCLIP runs in fp32
    assert models.dtype_of("captioner") == torch.bfloat16     # explicit override
    assert next(models["diffusion"].unet.parameters()).dtype == torch.bfloat16
    assert next(models["tagger"].model.parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match="valid roles"):
        ModelSet("faseg", "tiny", dtypes={"unet": "fp16"})
