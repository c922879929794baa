"""Build a FreeDA bank from captions: generation -> nouns -> attribution -> weak masks -> DINOv2 pooling -> keys.

Follows freeda.md §3 step by step; every choice the paper leaves open is a `BuildConfig` field with the spec's
assumed default. The work is cut into shards of the caption list (`ovss.banks.bank.shard_range`) that any
number of processes, machines or Ray workers build independently and resumably; `merge_shards` then joins
them into one bank whose bytes do not depend on the split (each caption's seed derives from its own key,
and caption batches fall on the same boundaries whatever the shard count).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from ovss.attention import attention_layers
from ovss.banks.bank import DEFAULT_CHUNK_ROWS, Entries, ShardWriter, merge_shards, shard_dir, shard_range
from ovss.diffusion.sampling import sample
from ovss.features import dinov2_patch_tokens
from ovss.methods.freeda import FREEDA_TEMPLATES, clip_text_raw
from ovss.models import ModelSet, resolve_device, resolve_dtype
from ovss.text.nouns import caption_nouns, singular

log = logging.getLogger(__name__)

#: γ: threshold after sigmoid of the [−1, 1]-normalised attribution map (paper §4.1; spec §3 step 5, trap 7).
GAMMA = 0.45
#: α: weight of the template-averaged noun embedding in a key (paper Eq. 3, §4.1).
ALPHA = 0.9
#: SD v2.1 with 50 denoising steps (paper §4.1); guidance 7.5 is assumed (spec §3 step 2).
STEPS = 50
GUIDANCE = 7.5
#: The DINOv2 input side: 518 = 37 patches of 14 (paper §4.1).
DINO_SIZE = 518


@dataclass
class BuildConfig:
    """The offline stage's settings (freeda.md §3). Everything but `chunk_rows` goes into the settings hash:
    shards built with different values refuse to merge. `batch_size` is hashed too because batched kernels
    round differently, and shard boundaries fall on its multiples: with one batch size, every split of the
    captions sees the same batches and the merged bank is bit-identical."""

    steps: int = STEPS
    guidance: float = GUIDANCE
    negative_prompt: str = ""
    scheduler: Literal["default", "ddim", "dpmsolver++"] = "default"
    resolution: int | None = None  # generated image side; None: the model's native size (512 for SD 2.1 base)
    seed: int = 0  # each caption's noise seed = hash(seed, caption key)
    gamma: float = GAMMA
    alpha: float = ALPHA
    key_prenorm: bool = True  # normalise t̂ and ĉ before mixing (spec §3 step 7)
    key_noun_form: Literal["surface", "singular"] = "surface"
    templates: tuple[str, ...] = FREEDA_TEMPLATES
    noun_parser: Literal["rules", "nltk"] = "rules"
    head_average: Literal["global", "per_layer"] = "global"
    attn_upsample: Literal["bilinear", "bicubic_clamp"] = "bilinear"
    dino_size: int = DINO_SIZE
    batch_size: int = 4  # captions per generation batch (and the shard alignment)
    chunk_rows: int = DEFAULT_CHUNK_ROWS

    def __post_init__(self) -> None:
        self.templates = tuple(self.templates)
        for name, allowed in (("key_noun_form", ("surface", "singular")), ("noun_parser", ("rules", "nltk")),
                              ("head_average", ("global", "per_layer")),
                              ("attn_upsample", ("bilinear", "bicubic_clamp")),
                              ("scheduler", ("default", "ddim", "dpmsolver++"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"bank build: {name}={getattr(self, name)!r}; choose one of {allowed}")
        if self.batch_size < 1 or self.chunk_rows < 1:
            raise ValueError(f"batch_size and chunk_rows must be >= 1, got {self.batch_size}, {self.chunk_rows}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {self.alpha}")

    def hashed(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "chunk_rows"}


# -- captions -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Caption:
    key: str  # unique id: "<image_id>_<k>" for COCO, the "id" field of JSONL, "L<line>" for plain text
    text: str


def read_captions(path: str | Path, limit: int | None = None) -> list[Caption]:
    """Captions in bank order from a COCO-captions JSON, a JSON/JSONL list of {"id", "text"|"caption"}, or a
    plain text file (one caption a line). COCO: sorted by image id, then annotation id (all five captions
    of an image stay together); each image's k-th caption gets key "<image_id>_<k>".
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        if isinstance(data, dict) and "annotations" in data:
            anns = sorted(data["annotations"], key=lambda a: (a["image_id"], a["id"]))
            out, k, prev = [], 0, None
            for a in anns:
                k = k + 1 if a["image_id"] == prev else 0
                prev = a["image_id"]
                out.append(Caption(f"{a['image_id']}_{k}", " ".join(str(a["caption"]).split())))
        elif isinstance(data, list):
            out = [_record(r, i) for i, r in enumerate(data)]
        else:
            raise ValueError(f"{path}: expected COCO captions ({{'annotations': [...]}}) or a list of records")
    elif path.suffix == ".jsonl":
        out = [_record(json.loads(line), i) for i, line in enumerate(text.splitlines()) if line.strip()]
    else:
        out = [Caption(f"L{i + 1}", " ".join(line.split())) for i, line in enumerate(text.splitlines()) if line.strip()]
    keys = [c.key for c in out]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{path}: caption ids are not unique")
    return out[:limit] if limit is not None else out


def _record(r: Any, i: int) -> Caption:
    if not isinstance(r, dict) or not ("text" in r or "caption" in r):
        raise ValueError(f"caption record {i}: expected {{'id': ..., 'text': ...}}, got {r!r:.80}")
    return Caption(str(r.get("id", i)), " ".join(str(r.get("text", r.get("caption"))).split()))


def captions_digest(captions: Sequence[Caption]) -> str:
    h = hashlib.sha256()
    for c in captions:
        h.update(f"{c.key}\t{c.text}\n".encode())
    return h.hexdigest()


def caption_seed(base: int, key: str) -> int:
    """The caption's noise seed: reproducible from (seed, caption key) alone, whatever the shard or batch."""
    return int(hashlib.sha256(f"{base}:{key}".encode()).hexdigest()[:8], 16)


# -- the per-caption arithmetic (spec §3 steps 3-7), as pure functions -----------------------------------


def noun_token_positions(tokenizer, caption: str, noun: str, max_length: int = 77) -> list[int]:
    """Positions (BOS = 0) of every occurrence of the noun's sub-tokens in the caption's SD tokenisation,
    limited to the `max_length` window; raises ValueError when the noun never occurs.

    CLIP's BPE tokenises word by word, so a word's tokens are the same alone and in context (trap 15: these
    are the generator's tokens, not the key encoder's).
    """
    ids = list(tokenizer(caption, add_special_tokens=False)["input_ids"])
    piece = list(tokenizer(noun, add_special_tokens=False)["input_ids"])
    if not piece:
        raise ValueError(f"noun {noun!r} has no tokens")
    starts = [i for i in range(len(ids) - len(piece) + 1) if ids[i:i + len(piece)] == piece]
    if not starts:
        raise ValueError(f"noun {noun!r} does not occur in the caption {caption!r}")
    return [1 + s + j for s in starts for j in range(len(piece)) if 1 + s + j < max_length - 1]


def weak_mask(attribution: torch.Tensor, gamma: float = GAMMA) -> torch.Tensor | None:
    """M = sigmoid(2·minmax(A) − 1) > γ (min-max to [−1, 1], sigmoid, threshold); None for a constant map."""
    lo, hi = attribution.min(), attribution.max()
    if not bool(hi > lo):
        return None
    return torch.sigmoid(2 * (attribution - lo) / (hi - lo) - 1) > gamma


def masked_prototype(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    """p = Σ v·M̂ / Σ M̂ with M̂ the mask resized to the feature grid (bilinear, align_corners=True).

    features: (gh, gw, D) patch tokens; mask: (H, W) bool. None when M̂ sums to zero (no entry).
    """
    gh, gw, _ = features.shape
    m = F.interpolate(mask[None, None].float(), size=(gh, gw), mode="bilinear", align_corners=True)[0, 0]
    total = m.sum()
    if not bool(total > 0):
        return None
    return (features * m[..., None]).sum((0, 1)) / total


def mix_keys(noun_emb: torch.Tensor, caption_emb: torch.Tensor, alpha: float = ALPHA,
             prenorm: bool = True) -> torch.Tensor:
    """k = normalise(α·t̂ + (1−α)·ĉ), with t̂ and ĉ normalised first when `prenorm` (Eq. 3)."""
    if prenorm:
        noun_emb, caption_emb = F.normalize(noun_emb, dim=-1), F.normalize(caption_emb, dim=-1)
    return F.normalize(alpha * noun_emb + (1 - alpha) * caption_emb, dim=-1)


# -- the builder ----------------------------------------------------------------------------------------


class Builder:
    """Turns caption batches into bank Entries with one set of loaded models."""

    def __init__(self, models: ModelSet, config: BuildConfig) -> None:
        self.models = models
        self.config = config
        dm = models["diffusion"]
        models["clip"], models["dinov2"]  # load now, so that batch timings measure compute only
        self.cross_factors = sorted({f for kind, f in attention_layers(dm.unet).values() if kind == "cross"})
        self.resolution = config.resolution or dm.native_resolution

    @torch.no_grad()
    def batch(self, captions: Sequence[Caption], first_index: int) -> Entries:
        """Entries of `captions` (whose first has bank caption index `first_index`), in caption/noun order."""
        cfg, dm = self.config, self.models["diffusion"]
        plans = [self._plan(c) for c in captions]
        todo = [i for i, p in enumerate(plans) if p]
        clip, dino = self.models["clip"], self.models["dinov2"]
        key_dim = clip.model.config.projection_dim
        proto_dim = dino.model.config.hidden_size
        if not todo:
            return Entries.empty(proto_dim, key_dim)
        positions = [[pos for _, span in plans[i] for pos in span] for i in todo]
        result = sample(dm, [captions[i].text for i in todo], steps=cfg.steps, guidance=cfg.guidance,
                        negative_prompt=cfg.negative_prompt, scheduler=cfg.scheduler,
                        seeds=[caption_seed(cfg.seed, captions[i].key) for i in todo], height=self.resolution,
                        width=self.resolution, capture_cross=self.cross_factors, token_positions=positions,
                        upsample="bicubic" if cfg.attn_upsample == "bicubic_clamp" else "bilinear",
                        head_average=cfg.head_average,
                        cross_size=None if cfg.attn_upsample == "bicubic_clamp" else (self.resolution,) * 2)
        feats = dinov2_patch_tokens(dino, result.images, cfg.dino_size).cpu()  # (B, gh, gw, D)
        protos, rows = [], []
        for b, i in enumerate(todo):
            maps, start = result.cross[b], 0
            for noun, span in plans[i]:
                token_maps = maps[start:start + len(span)]
                start += len(span)
                attribution = token_maps.mean(0)  # each attention scale upsampled once, straight to the image
                if attribution.shape != result.images.shape[-2:]:  # bicubic_clamp: DAAM's 64² maps, then the image
                    attribution = F.interpolate(attribution[None, None], size=result.images.shape[-2:],
                                                mode="bilinear", align_corners=False)[0, 0]
                mask = weak_mask(attribution, cfg.gamma)
                if mask is None:
                    continue
                p = masked_prototype(feats[b], mask)
                if p is None:
                    continue
                protos.append(p)
                rows.append((i, noun, float(mask.float().mean())))
        if not rows:
            return Entries.empty(proto_dim, key_dim)
        keys = self._keys([captions[i].text for i, _, _ in rows], [noun for _, noun, _ in rows])
        return Entries(torch.stack(protos).float().cpu(), keys.cpu(),
                       torch.tensor([first_index + i for i, _, _ in rows], dtype=torch.int64),
                       torch.tensor([a for _, _, a in rows], dtype=torch.float32),
                       [noun for _, noun, _ in rows], [captions[i].key for i, _, _ in rows])

    def _plan(self, caption: Caption) -> list[tuple[str, list[int]]]:
        """(noun, SD token positions) for each distinct noun that the generator sees."""
        tok = self.models["diffusion"].tokenizer
        out = []
        for noun in caption_nouns(caption.text, self.config.noun_parser):
            try:
                span = noun_token_positions(tok, caption.text, noun)
            except ValueError as err:
                log.warning("caption %s: %s; noun skipped", caption.key, err)
                continue
            if span:
                out.append((noun, span))
            else:
                log.debug("caption %s: %r lies past the 77-token window; skipped", caption.key, noun)
        return out

    def _keys(self, caption_texts: list[str], nouns: list[str]) -> torch.Tensor:
        cfg, clip = self.config, self.models["clip"]
        forms = [singular(n) if cfg.key_noun_form == "singular" else n for n in nouns]
        unique_forms = list(dict.fromkeys(forms))
        unique_caps = list(dict.fromkeys(caption_texts))
        n_t = len(cfg.templates)
        prompts = [t.format(f) for f in unique_forms for t in cfg.templates]
        emb = clip_text_raw(clip, prompts + unique_caps)
        noun_emb = emb[:len(prompts)].view(len(unique_forms), n_t, -1).mean(1)
        cap_emb = emb[len(prompts):]
        t_hat = noun_emb[[unique_forms.index(f) for f in forms]]
        c_hat = cap_emb[[unique_caps.index(c) for c in caption_texts]]
        return mix_keys(t_hat, c_hat, cfg.alpha, cfg.key_prenorm)


def bank_settings(config: BuildConfig, models: ModelSet, captions: Sequence[Caption]) -> dict[str, Any]:
    """What the bank depends on: models (sources, with a digest of folder-held weights, and the generator dtype),
    the build config, the caption list. A rebuild after the weights change therefore starts afresh."""
    return {"source": "ovss-build", "models": {role: models.fingerprint(role) for role in models.roles},
            "diffusion_dtype": str(models.dtype_of("diffusion")),
            "build": config.hashed(), "captions": {"count": len(captions), "sha256": captions_digest(captions)}}


def make_models(models: None | str | dict[str, str] = None, device: str | None = None,
                dtype: str | None = None) -> ModelSet:
    """FreeDA's ModelSet (diffusion in fp16 on CUDA unless `dtype` says otherwise; DINOv2 and CLIP in fp32)."""
    dev = resolve_device(device)
    return ModelSet("freeda", models, device=dev, dtype=resolve_dtype(dtype, dev, cuda_default="float16"))


@dataclass
class ShardReport:
    shard: tuple[int, int]
    captions: int  # captions built by this call (not counting those found finished)
    rows: int  # rows of the shard on disk
    seconds: float  # compute time of the batches built by this call (model loading excluded)
    folder: Path = field(default_factory=Path)


def build_shard(captions: Sequence[Caption], build_dir: str | Path, config: BuildConfig, models: ModelSet,
                shard: tuple[int, int] = (0, 1), *, progress: Callable[[int], None] | None = None) -> ShardReport:
    """Build (or resume) shard i of n into `build_dir/shard-i-of-n`; finished captions are never redone."""
    start, end = shard_range(len(captions), *shard, align=config.batch_size)
    folder = shard_dir(build_dir, *shard)
    writer = ShardWriter(folder, bank_settings(config, models, captions), shard, (start, end), config.chunk_rows)
    builder, built, seconds = None, 0, 0.0
    pos = writer.next_caption
    if progress is not None and pos > start:
        progress(pos - start)
    while pos < end:
        builder = builder or Builder(models, config)
        stop = min(pos + config.batch_size, end)
        t0 = time.perf_counter()
        entries = builder.batch(captions[pos:stop], pos)
        dt = time.perf_counter() - t0
        writer.add(entries, stop - pos, seconds=dt)
        built, seconds = built + stop - pos, seconds + dt
        if progress is not None:
            progress(stop - pos)
        pos = stop
    if not writer.complete:
        writer.finish()
    return ShardReport(tuple(shard), built, int(writer.manifest.data["rows"]), seconds, folder)


def build_local(captions: Sequence[Caption], out_dir: str | Path, config: BuildConfig, models: ModelSet, *,
                shard: tuple[int, int] | None = None, build_dir: str | Path | None = None,
                progress: Callable[[int], None] | None = None) -> tuple[ShardReport, Path | None]:
    """One process: build shard `shard` (default the whole list as 0/1); merge into `out_dir` when the caller
    built the whole list. Returns the shard report and the bank folder (None when only a shard was built)."""
    build_dir = Path(build_dir) if build_dir is not None else Path(out_dir) / "shards"
    report = build_shard(captions, build_dir, config, models, shard or (0, 1), progress=progress)
    if shard is not None and shard[1] > 1:
        return report, None
    return report, merge_shards([report.folder], out_dir)


# -- Ray ------------------------------------------------------------------------------------------------


class RayShardTask:
    """A Ray Data actor: loads the models once, then builds each shard id it receives (resumably)."""

    def __init__(self, captions_file: str, limit: int | None, build_dir: str, config: dict[str, Any],
                 n_shards: int, models: None | str | dict[str, str], device: str | None, dtype: str | None,
                 threads: int | None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.captions = read_captions(captions_file, limit)
        self.build_dir = build_dir
        self.config = BuildConfig(**config)
        self.n_shards = n_shards
        self.models = make_models(models, device, dtype)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        reports = [build_shard(self.captions, self.build_dir, self.config, self.models, (int(i), self.n_shards))
                   for i in batch["shard"]]
        return {"shard": np.array([r.shard[0] for r in reports]), "captions": np.array([r.captions for r in reports]),
                "rows": np.array([r.rows for r in reports]), "seconds": np.array([r.seconds for r in reports]),
                "worker": np.array([os.getpid()] * len(reports))}


def build_ray(captions_file: str | Path, out_dir: str | Path, config: BuildConfig, *, workers: int,
              n_shards: int | None = None, limit: int | None = None, models: None | str | dict[str, str] = None,
              device: str | None = None, dtype: str | None = None, gpus_per_worker: float | None = None,
              cpus_per_worker: float = 1.0, threads_per_worker: int | None = None,
              build_dir: str | Path | None = None) -> tuple[list[dict[str, Any]], Path]:
    """Build every shard on a Ray cluster (Ray Data over shard ids, `workers` actors, one GPU each when CUDA
    is available), then merge. Call `ray.init(...)` first to join a cluster; otherwise a local one starts.

    `out_dir` (and `build_dir`, default out_dir/shards) must be reachable by every worker (shared storage).
    Returns the per-shard reports and the bank folder.
    """
    try:
        import ray
    except ImportError:
        raise RuntimeError("distributed building needs Ray: pip install 'ovss[ray]'") from None
    n_shards = n_shards or 4 * workers  # several shards per worker: resumable units and load balance
    build_dir = Path(build_dir) if build_dir is not None else Path(out_dir) / "shards"
    build_dir.mkdir(parents=True, exist_ok=True)
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if torch.cuda.is_available() or ray.is_initialized() and \
            ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    shards = ray.data.from_items([{"shard": i} for i in range(n_shards)], override_num_blocks=n_shards)
    out = shards.map_batches(
        RayShardTask, batch_size=1, num_gpus=gpus_per_worker, num_cpus=cpus_per_worker,
        compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1),
        fn_constructor_kwargs=dict(captions_file=str(Path(captions_file).resolve()), limit=limit,
                                   build_dir=str(build_dir.resolve()), config=asdict(config), n_shards=n_shards,
                                   models=models, device=device, dtype=dtype, threads=threads_per_worker))
    reports = sorted(out.take_all(), key=lambda r: int(r["shard"]))
    bank = merge_shards([shard_dir(build_dir, i, n_shards) for i in range(n_shards)], out_dir)
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()} for r in reports], bank
