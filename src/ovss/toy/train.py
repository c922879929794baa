"""Train the toy world's models on this CPU (or a GPU when there is one), resumably, and export them.

    python -m ovss.toy.train {clip,vae,unet,rf_unet,blip,dinov2,export,restore,bank,all} [--steps N] [--minutes M]
                             [--resume] [--threads T] [--seed S]

Order matters: CLIP first (its text tower, frozen, conditions both UNets, as in Stable Diffusion: a text
encoder trained jointly with the UNet gave no word-to-region binding in the issue's trials), the VAE before the
UNets (they train on its latents); BLIP is independent. Each run lives in `<out>/<name>/`: `log.txt`,
`ckpt.pt` (every few minutes; `--resume` continues from it), `final/` (fp32, save_pretrained) and
`meta.json` (steps, wall time, final loss). Everything random is a function of `--seed` and the step index,
so a resumed run draws the same batches as an uninterrupted one. `restore` brings the shipped runs back from the
package's folders (fp32, a checkpoint per UNet) where `<out>` is gone, so that training goes on from them.

Label maps never train CLIP or BLIP. The UNets may use them through the auxiliary attention loss
(`--aux-weight`; 0 disables it): -log of the share of each class word's cross-attention mass that falls
inside that class's ground-truth region, at low noise levels, averaged over layers and heads at every
attention factor. The model cards say so.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ovss.attention import AttentionCapture
from ovss.candidates.clip_filter import CLIP_MEAN, CLIP_STD
from ovss.features import normalise
from ovss.io import atomic_write
from ovss.text.clip_bpe import clip_tokenizer
from ovss.toy import models as M
from ovss.toy.scenes import TOY_CLASSES, TOY_STUFF, TOY_THINGS, make_scene, plural, split_seeds

log = logging.getLogger("ovss.toy.train")

#: Attention factors (latent grid 16/8/4/2) whose cross-attention the auxiliary loss supervises: all four
#: (FA-Seg weighs factors 2/4/8, DiffSegmenter averages every level).
AUX_FACTORS = (1, 2, 4, 8)
#: Noise levels the auxiliary loss applies at: the methods read attention at t = 1 (FA-Seg) and t = 100
#: (DiffSegmenter); half of every UNet batch is drawn below this, the other half over the whole schedule.
AUX_MAX_T = 200
#: Attention factors (grids 16/8/4) whose self-attention the optional self-attention region loss supervises:
#: the ones DiffSegmenter (64² in SD, factor 1) and FA-Seg (weights 0.3/0.5/0.1 on factors 1/2/4) refine with.
SELF_AUX_FACTORS = (1, 2, 4)
#: Share of UNet prompts replaced by the empty prompt, for classifier-free guidance (as in SD training).
CFG_DROP = 0.1
#: Share of UNet prompts that are FA-Seg-style class lists ("ball, grass, sky"), shuffled.
CLASS_LIST_SHARE = 0.2
#: Share of CLIP texts that list the scene's classes ("a photo of a ball and the grass"), shuffled.
CLIP_TAG_SHARE = 0.3
#: Share of BLIP targets that complete DiffSegmenter's prefix ("a photograph of ball ..." + a caption).
BLIP_PREFIX_SHARE = 0.3
BLIP_PREFIX = "a photograph of"
_CAPTION_PREFIXES = ("a photo of ", "a picture of ", "an image of ", "a toy scene of ")


#: The CLIP run whose text tower conditions a UNet (frozen) unless the UNet run names another (`--text-encoder`).
TEXT_ENCODER_RUN = "clip"


@dataclass
class RunConfig:
    """One training run. Defaults are the shipped models' settings; `steps` is the LR schedule's length."""

    kind: str
    name: str = ""
    steps: int = 1000
    minutes: float | None = None  # wall-clock limit for this invocation (checkpoint + final written on stop)
    batch: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 100
    scenes: int = 10_000  # train-split scenes in the bank (seeds 0..scenes-1)
    seed: int = 0
    threads: int = 1
    resume: bool = False
    out: str = ".toy_runs"
    ckpt_minutes: float = 3.0
    log_every: int = 25
    aux_weight: float = 0.5
    self_aux_weight: float = 0.0  # UNets: weight of the self-attention region loss (0: none)
    freeze_text: bool = False  # CLIP: train on with the text tower fixed (it conditions the trained UNets)
    hard_negatives: float = 0.0  # CLIP: share of texts that also bring a thing-swapped negative (NegCLIP)
    thing_phrases: float = 0.0  # CLIP: share of texts naming the things alone (no colours, no stuff)
    class_list_share: float = CLASS_LIST_SHARE  # UNets: share of class-list prompts (FA-Seg's class-only keys)
    text_encoder: str = TEXT_ENCODER_RUN  # UNets: the CLIP run whose (frozen) text tower conditions them

    def __post_init__(self) -> None:
        self.name = self.name or self.kind

    @property
    def run_dir(self) -> Path:
        return Path(self.out) / self.name


#: Per-kind defaults (batch, lr, steps) chosen from measured s/step on the 2-core CPU.
DEFAULTS: dict[str, dict] = {
    "clip": dict(batch=64, lr=1e-3, steps=400, weight_decay=0.05),
    "vae": dict(batch=16, lr=1e-3, steps=300),
    "unet": dict(batch=32, lr=1e-3, steps=450, warmup=50),
    "rf_unet": dict(batch=32, lr=1e-3, steps=450, warmup=50),
    "blip": dict(batch=32, lr=5e-4, steps=800),
    "dinov2": dict(batch=32, lr=1e-3, steps=900, weight_decay=0.04),
}


# ---------------------------------------------------------------------------------------------- data


@dataclass
class SceneBank:
    """The first `n` scenes of a split at 64 px, held in memory: images, full label maps, captions, tags."""

    images: np.ndarray  # (N, 64, 64, 3) uint8
    labels: np.ndarray  # (N, 64, 64) uint8, indexes TOY_CLASSES
    captions: list[str]
    tags: list[list[str]]

    def __len__(self) -> int:
        return len(self.captions)


def scene_bank(split: str, n: int, root: str | Path) -> SceneBank:
    """Generate (or read the cached copy of) the bank; the cache is a pure function of (split, n)."""
    path = Path(root) / f"scenes_{split}_{n}.npz"
    if path.exists():
        z = np.load(path, allow_pickle=False)
        return SceneBank(z["images"], z["labels"], json.loads(str(z["captions"])), json.loads(str(z["tags"])))
    scenes = [make_scene(s, M.TOY_IMAGE_SIZE) for s in split_seeds(split)[:n]]
    bank = SceneBank(np.stack([np.asarray(s.image) for s in scenes]), np.stack([s.labels_full for s in scenes]),
                     [s.caption for s in scenes], [s.tags for s in scenes])
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: np.savez(f, images=bank.images, labels=bank.labels,
                                          captions=json.dumps(bank.captions), tags=json.dumps(bank.tags)))
    return bank


def tag_phrase(tags: list[str], rng: np.random.Generator) -> str:
    """The scene's classes in a shuffled plain-English list: "a ball, the grass and a box"."""
    words = [("the " if t in TOY_STUFF else "a ") + t for t in (tags[i] for i in rng.permutation(len(tags)))]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


#: Every spelling of a thing word in captions (singular and plural) -> the thing.
_THING_FORMS = {**{t: t for t in TOY_THINGS}, **{plural(t): t for t in TOY_THINGS}}


def swap_thing(text: str, tags: list[str], rng: np.random.Generator) -> str | None:
    """A hard negative: `text` with one thing word replaced by a thing absent from the scene, in the same
    number ("a red ball on the grass" -> "a red star on the grass"); None when it names no thing. A plain
    batch never needs shape to tell captions apart (colour and stuff suffice), so a contrastively trained
    CLIP has no reason to see shape; these are NegCLIP's remedy for bag-of-words CLIPs (600-1,500 steps of them
    did not make the toy CLIP shape-aware, 10,000 did, at a cost in stuff: docs/toy-world.md)."""
    words = text.split(" ")
    spots = [i for i, w in enumerate(words) if w.rstrip(",") in _THING_FORMS]
    absent = [t for t in TOY_THINGS if t not in tags]
    if not spots or not absent:
        return None
    i = spots[int(rng.integers(len(spots)))]
    word = words[i].rstrip(",")
    new = absent[int(rng.integers(len(absent)))]
    if word != _THING_FORMS[word]:  # plural
        new = plural(new)
    words[i] = new + words[i][len(word):]
    return " ".join(words)


def class_list(tags: list[str], rng: np.random.Generator) -> str:
    """FA-Seg's class-only prompt form, shuffled: "ball, grass, sky"."""
    return ", ".join(tags[i] for i in rng.permutation(len(tags)))


def strip_prefix(caption: str) -> str:
    """The caption without its "a photo of " style opening (BLIP's prompted targets add their own)."""
    for p in _CAPTION_PREFIXES:
        if caption.startswith(p):
            return caption[len(p):]
    return caption


def images_to_tensor(images: np.ndarray, flip: np.ndarray | None = None) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [0, 1], rows with flip=True mirrored left-right."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    if flip is not None and flip.any():
        f = torch.from_numpy(flip)
        x[f] = x[f].flip(-1)
    return x


class ClassTokens:
    """Finds each toy class word (singular or plural, one or more CLIP tokens) in tokenised prompts."""

    def __init__(self, tokenizer) -> None:
        forms: list[tuple[list[int], int]] = []
        for c, name in enumerate(TOY_CLASSES):
            spellings = [name] + ([plural(name)] if name in TOY_THINGS else [])
            forms += [(list(tokenizer(s, add_special_tokens=False)["input_ids"]), c) for s in spellings]
        self.forms = forms

    def weights(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, C, T): for each class, uniform weights over all its word tokens (0 if absent)."""
        b, t = ids.shape
        out = torch.zeros(b, len(TOY_CLASSES), t)
        rows = ids.tolist()
        for i, row in enumerate(rows):
            for seq, c in self.forms:
                n = len(seq)
                for p in range(1, t - n + 1):
                    if row[p:p + n] == seq:
                        out[i, c, p:p + n] = 1.0
        return out / out.sum(-1, keepdim=True).clamp_min(1.0)


def region_fractions(labels: torch.Tensor, side: int) -> torch.Tensor:
    """(B, H, W) class labels -> (B, C, side²): each class's share of every cell of a side×side grid."""
    onehot = F.one_hot(labels.long(), len(TOY_CLASSES)).permute(0, 3, 1, 2).float()
    return F.adaptive_avg_pool2d(onehot, side).flatten(2)


def attention_region_loss(cross: dict[int, torch.Tensor], word_weights: torch.Tensor, labels: torch.Tensor,
                          items: torch.Tensor) -> torch.Tensor:
    """Mean over (item, class word, factor) of −log(share of the word's attention mass inside its region).

    cross[f]: (B, side², T) layer/head-mean probabilities; word_weights: (B, C, T) from ClassTokens;
    labels: (B, H, W); items: (B,) bool, which batch items the loss applies to (low noise, non-empty prompt).
    """
    present = (word_weights.sum(-1) > 0) & items[:, None]
    if not present.any():
        return torch.zeros(())
    losses = []
    for f, maps in cross.items():
        side = int(round(maps.shape[1] ** 0.5))
        a = torch.einsum("bqt,bct->bcq", maps, word_weights.to(maps.dtype))
        p = a / a.sum(-1, keepdim=True).clamp_min(1e-12)
        mass = (p * region_fractions(labels, side).to(p.dtype)).sum(-1)
        losses.append(-torch.log(mass.clamp_min(1e-6))[present])
    return torch.cat(losses).mean()


def self_attention_region_loss(self_maps: dict[int, torch.Tensor], labels: torch.Tensor,
                               items: torch.Tensor) -> torch.Tensor:
    """Mean over (item, query cell, factor) of −log(share of the query's self-attention on same-class cells).

    "Same class" is soft at coarse grids: Σ_c r_q[c]·r_k[c] with r the class shares of each cell. This is
    what SD's self-attention does on its own after long training (it groups pixels by object, which
    DiffSegmenter and FA-Seg rely on); the toy UNets are taught it from the label maps. items: (B,) bool.
    """
    if not items.any():
        return torch.zeros(())
    losses = []
    for f, maps in self_maps.items():
        side = int(round(maps.shape[1] ** 0.5))
        r = region_fractions(labels[items], side).to(maps.dtype)  # (b, C, N)
        attended = torch.einsum("bqk,bck->bqc", maps[items], r)
        share = torch.einsum("bcq,bqc->bq", r, attended)
        losses.append(-torch.log(share.clamp_min(1e-6)).flatten())
    return torch.cat(losses).mean()


# ------------------------------------------------------------------------------------------ training


def lr_at(step: int, cfg: RunConfig) -> float:
    """Linear warm-up, then cosine from lr to lr/10 over `steps`."""
    warm = min(cfg.warmup, max(1, cfg.steps // 10))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, cfg.steps - warm))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _setup_logging(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.handlers = [h for h in log.handlers if not isinstance(h, logging.FileHandler)] + [handler]
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in log.handlers):
        log.addHandler(logging.StreamHandler())
    log.setLevel(logging.INFO)


def train_loop(cfg: RunConfig, module: torch.nn.Module, step_fn: Callable[[int], tuple[torch.Tensor, dict]],
               params: list[torch.nn.Parameter] | None = None, after_step: Callable[[], None] | None = None) -> dict:
    """AdamW over `params` (default: all of `module`'s), checkpointing every `ckpt_minutes`; returns meta."""
    run_dir = cfg.run_dir
    opt = torch.optim.AdamW(params if params is not None else module.parameters(), lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    step, elapsed, history = 0, 0.0, []
    ckpt = run_dir / "ckpt.pt"
    if cfg.resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        module.load_state_dict(state["model"])
        if state["opt"] is not None:
            opt.load_state_dict(state["opt"])
        else:  # a run restored from the shipped weights (`train restore`): they hold no optimizer state
            log.info("%s: the checkpoint holds no optimizer state (a restored run): AdamW starts afresh", cfg.name)
        step, elapsed, history = state["step"], state["elapsed"], state["history"]
        log.info("resumed %s at step %d (%.1f min trained)", cfg.name, step, elapsed / 60)

    def save() -> None:
        state = {"model": module.state_dict(), "opt": opt.state_dict(), "step": step, "elapsed": elapsed,
                 "history": history, "config": asdict(cfg)}
        atomic_write(ckpt, lambda f: torch.save(state, f), durable=True)

    start = last_ckpt = time.time()
    base_elapsed, first_step = elapsed, step
    module.train()
    while step < cfg.steps:
        if cfg.minutes is not None and time.time() - start > cfg.minutes * 60:
            log.info("time limit of %.1f min reached at step %d", cfg.minutes, step)
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        t0 = time.time()
        loss, parts = step_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        if after_step is not None:
            after_step()
        history.append({"step": step, "loss": loss.item(), **{k: float(v) for k, v in parts.items()}})
        step += 1
        elapsed = base_elapsed + time.time() - start
        if step % cfg.log_every == 0 or step == 1:
            recent = history[-cfg.log_every:]
            means = {k: np.mean([h[k] for h in recent if k in h]) for k in recent[-1] if k != "step"}
            log.info("%s step %d/%d %s lr %.2e %.2f s/step", cfg.name, step, cfg.steps,
                     " ".join(f"{k} {v:.4f}" for k, v in means.items()), lr_at(step - 1, cfg), time.time() - t0)
        if time.time() - last_ckpt > cfg.ckpt_minutes * 60:
            save()
            last_ckpt = time.time()
    save()
    module.eval()
    tail = history[-50:]
    meta = {"name": cfg.name, "kind": cfg.kind, "steps_done": step, "steps_planned": cfg.steps,
            "started_at": first_step,
            "wall_minutes": round(elapsed / 60, 2), "threads": cfg.threads, "batch": cfg.batch, "lr": cfg.lr,
            "scenes": cfg.scenes, "seed": cfg.seed,
            "final_loss": {k: round(float(np.mean([h[k] for h in tail if k in h])), 5)
                           for k in (tail[-1] if tail else {}) if k != "step"}}
    return meta


def _write_meta(cfg: RunConfig, meta: dict) -> None:
    (cfg.run_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    log.info("%s done: %s", cfg.name, json.dumps(meta))


def _final(cfg: RunConfig, name: str | None = None) -> Path:
    return Path(cfg.out) / (name or cfg.name) / "final"


def replace_dir(path: Path) -> Path:
    """An empty folder at `path`: a final/ or exported folder holds exactly what the last write put there."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


# ---------------------------------------------------------------------------------------------- CLIP


def clip_text(caption: str, tags: list[str], rng: np.random.Generator, thing_phrases: float = 0.0) -> str:
    """A CLIP training text for a scene: its caption, or (CLIP_TAG_SHARE) its classes in a list, or
    (`thing_phrases`) its things alone, without colours or stuff ("a photo of a ball and a box"): texts that
    only shape tells apart."""
    u = rng.random()
    if u < thing_phrases:
        return rng.choice(("", "a photo of ")) + tag_phrase([t for t in tags if t in TOY_THINGS], rng)
    if u < thing_phrases + CLIP_TAG_SHARE:
        return rng.choice(("", "a photo of ")) + tag_phrase(tags, rng)
    return caption


def hard_negative_clip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, scale: torch.Tensor
                            ) -> torch.Tensor:
    """CLIP's symmetric InfoNCE where the texts after the first B (B = images) are extra negatives for the
    image -> text direction only (NegCLIP). Embeddings are L2-normalised."""
    b = image_embeds.shape[0]
    target = torch.arange(b, device=image_embeds.device)
    logits = scale * image_embeds @ text_embeds.T  # (B, B + negatives)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :b].T, target)) / 2


def train_clip(cfg: RunConfig) -> dict:
    """Symmetric InfoNCE on (scene, text) pairs, learnable temperature clamped at 100 as in CLIP."""
    torch.manual_seed(cfg.seed)
    model = M.build_clip()
    if cfg.freeze_text:  # AdamW skips parameters without gradients: the text tower stays bit-identical
        model.text_model.requires_grad_(False)
    tok = clip_tokenizer()
    bank = scene_bank("train", cfg.scenes, cfg.out)

    def step_fn(step: int):
        rng = np.random.default_rng([cfg.seed, step])
        idx = rng.choice(len(bank), size=min(cfg.batch, len(bank)), replace=False)
        # what CLIP's image processor does to a 64-px image at 64 px: no resize, OpenAI mean/std
        pixels = normalise(images_to_tensor(bank.images[idx], rng.random(len(idx)) < 0.5), CLIP_MEAN, CLIP_STD)
        texts = [clip_text(bank.captions[i], bank.tags[i], rng, cfg.thing_phrases) for i in idx]
        if not cfg.hard_negatives:
            enc = tok(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
            out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pixels,
                        return_loss=True)
            return out.loss, {"scale": model.logit_scale.exp().detach()}
        negatives = [swap_thing(t, bank.tags[i], rng) if rng.random() < cfg.hard_negatives else None
                     for t, i in zip(texts, idx)]
        negatives = [n for n in negatives if n is not None]
        enc = tok(texts + negatives, padding=True, truncation=True, max_length=77, return_tensors="pt")
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pixels)
        return hard_negative_clip_loss(out.image_embeds, out.text_embeds, model.logit_scale.exp()), {
            "scale": model.logit_scale.exp().detach()}

    def clamp_scale() -> None:
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    meta = train_loop(cfg, model, step_fn, after_step=clamp_scale)
    if cfg.freeze_text:
        meta["text_frozen_from_step"] = meta["started_at"]
    meta.update({k: v for k, v in (("hard_negatives", cfg.hard_negatives), ("thing_phrases", cfg.thing_phrases)) if v})
    final = replace_dir(_final(cfg))
    model.save_pretrained(final)
    _write_meta(cfg, meta)
    return meta


# ----------------------------------------------------------------------------------------------- VAE


def train_vae(cfg: RunConfig) -> dict:
    """L1 + L2 reconstruction + a small KL; then the latent scale is measured (SD's 0.18215 analogue)."""
    torch.manual_seed(cfg.seed)
    vae = M.build_vae()
    bank = scene_bank("train", cfg.scenes, cfg.out)
    kl_weight = 1e-4

    def step_fn(step: int):
        rng = np.random.default_rng([cfg.seed, step])
        idx = rng.choice(len(bank), size=min(cfg.batch, len(bank)), replace=False)
        x = images_to_tensor(bank.images[idx], rng.random(len(idx)) < 0.5) * 2 - 1
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        l1, l2 = (rec - x).abs().mean(), ((rec - x) ** 2).mean()
        kl = 0.5 * (post.mean ** 2 + post.var - 1 - post.logvar).mean()
        return l1 + l2 + kl_weight * kl, {"l1": l1.detach(), "l2": l2.detach(), "kl": kl.detach()}

    meta = train_loop(cfg, vae, step_fn)
    with torch.no_grad():
        x = images_to_tensor(bank.images[: min(512, len(bank))]) * 2 - 1
        post = vae.encode(x).latent_dist
        std = float(post.sample(torch.Generator().manual_seed(cfg.seed)).std())
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    final = replace_dir(_final(cfg))
    vae.save_pretrained(final)
    meta["latent_std_unscaled"] = round(std, 5)
    meta["scaling_factor"] = vae.config.scaling_factor
    _write_meta(cfg, meta)
    return meta


# --------------------------------------------------------------------------------------------- UNets


def text_encoder_from_clip(clip) -> torch.nn.Module:
    """A CLIPTextModel holding exactly CLIP's text tower (how SD pairs a UNet with CLIP's text encoder)."""
    from transformers import CLIPTextModel

    te = CLIPTextModel(clip.config.text_config)
    te.load_state_dict(clip.text_model.state_dict())
    return te.eval().requires_grad_(False)


def load_text_tower(final: Path) -> torch.nn.Module:
    """The frozen text tower in a CLIP run's final/: a CLIPModel's text side, or the CLIPTextModel itself for a
    run restored from a diffusion folder (which ships the tower alone: `train restore`)."""
    from transformers import AutoConfig, CLIPModel, CLIPTextModel

    if AutoConfig.from_pretrained(final).model_type == "clip_text_model":
        return CLIPTextModel.from_pretrained(final).eval().requires_grad_(False)
    return text_encoder_from_clip(CLIPModel.from_pretrained(final))


@torch.no_grad()
def latent_bank(cfg: RunConfig, bank: SceneBank, vae) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every bank scene and of its mirror image: (N, 2, 4, 16, 16) each."""
    path = Path(cfg.out) / f"latents_{cfg.scenes}.pt"
    vae_file = _final(cfg, "vae") / "diffusion_pytorch_model.safetensors"
    stamp = vae_file.stat().st_mtime if vae_file.exists() else 0.0
    if path.exists():
        cached = torch.load(path)
        if cached["stamp"] == stamp:
            return cached["mean"], cached["std"]
    means, stds = [], []
    for i in range(0, len(bank), 256):
        x = images_to_tensor(bank.images[i:i + 256]) * 2 - 1
        x = torch.stack([x, x.flip(-1)], 1).flatten(0, 1)
        post = vae.encode(x).latent_dist
        means.append(post.mean.unflatten(0, (-1, 2)))
        stds.append(post.std.unflatten(0, (-1, 2)))
    mean, std = torch.cat(means), torch.cat(stds)
    atomic_write(path, lambda f: torch.save({"stamp": stamp, "mean": mean, "std": std}, f))
    return mean, std


def _load_vae_and_text(cfg: RunConfig):
    from diffusers import AutoencoderKL

    clip_dir, vae_dir = _final(cfg, cfg.text_encoder), _final(cfg, "vae")
    for d, what in ((clip_dir, "clip"), (vae_dir, "vae")):
        if not d.exists():
            raise SystemExit(f"{d} is missing: train {what} first "
                             f"(python -m ovss.toy.train {what} --name {d.parent.name}), or restore the shipped "
                             "runs (python -m ovss.toy.train restore)")
    vae = AutoencoderKL.from_pretrained(vae_dir).eval().requires_grad_(False)
    return load_text_tower(clip_dir), vae


def train_unet(cfg: RunConfig, objective: str) -> dict:
    """ε-prediction (objective "eps", SD's DDPM schedule) or rectified flow (objective "rf").

    rf follows InstaFlow's convention: x_t = t·noise + (1−t)·x0 with t ∈ [0, 1] fed as timestep 1000·t
    (1000 = pure noise), and the UNet predicts v = x0 − noise, so x_data ≈ x_noise + v.
    """
    torch.manual_seed(cfg.seed)
    unet = M.build_unet()
    text_encoder, vae = _load_vae_and_text(cfg)
    scale = float(vae.config.scaling_factor)
    tok = clip_tokenizer()
    finder = ClassTokens(tok)
    bank = scene_bank("train", cfg.scenes, cfg.out)
    lat_mean, lat_std = latent_bank(cfg, bank, vae)
    labels_all = torch.from_numpy(bank.labels)
    alphas = M.build_scheduler().alphas_cumprod

    def step_fn(step: int):
        rng = np.random.default_rng([cfg.seed, step])
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        b = min(cfg.batch, len(bank))
        idx = rng.choice(len(bank), size=b, replace=False)
        flip = rng.random(b) < 0.5
        sel = torch.from_numpy(idx), torch.from_numpy(flip.astype(np.int64))
        z0 = (lat_mean[sel] + lat_std[sel] * torch.randn(lat_mean[sel].shape, generator=g)) * scale
        labels = labels_all[sel[0]]
        labels = torch.where(torch.from_numpy(flip)[:, None, None], labels.flip(-1), labels)
        texts, dropped = [], np.zeros(b, dtype=bool)
        for j, i in enumerate(idx):
            u = rng.random()
            if u < CFG_DROP:
                texts.append("")
                dropped[j] = True
            elif u < CFG_DROP + cfg.class_list_share:
                texts.append(class_list(bank.tags[i], rng))
            else:
                texts.append(bank.captions[i])
        ids = tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            context = text_encoder(ids)[0]
        low = torch.arange(b) >= b // 2  # the second half is drawn at low noise
        noise = torch.randn(z0.shape, generator=g)
        if objective == "eps":
            t = torch.where(low, torch.randint(0, AUX_MAX_T, (b,), generator=g),
                            torch.randint(0, len(alphas), (b,), generator=g))
            a = alphas[t].view(-1, 1, 1, 1)
            zt, target, timesteps = a.sqrt() * z0 + (1 - a).sqrt() * noise, noise, t
        else:
            u = torch.rand(b, generator=g)
            s = torch.where(low, u * AUX_MAX_T / 1000, u)
            sv = s.view(-1, 1, 1, 1)
            zt, target, timesteps = sv * noise + (1 - sv) * z0, z0 - noise, s * 1000
        cross_f = AUX_FACTORS if cfg.aux_weight > 0 else ()
        self_f = SELF_AUX_FACTORS if cfg.self_aux_weight > 0 else ()
        with AttentionCapture(unet, cross=cross_f, self_attn=self_f) as cap:
            pred = unet(zt, timesteps, encoder_hidden_states=context).sample
        aux = (attention_region_loss(cap.cross_maps(), finder.weights(ids), labels, low & ~torch.from_numpy(dropped))
               if cross_f else torch.zeros(()))
        self_aux = self_attention_region_loss(cap.self_maps(), labels, low) if self_f else torch.zeros(())
        mse = F.mse_loss(pred, target)
        parts = {"mse": mse.detach(), "aux": aux.detach(), **({"self_aux": self_aux.detach()} if self_f else {})}
        return mse + cfg.aux_weight * aux + cfg.self_aux_weight * self_aux, parts

    meta = train_loop(cfg, unet, step_fn)
    final = replace_dir(_final(cfg))
    unet.save_pretrained(final)
    meta.update(objective=objective, aux_weight=cfg.aux_weight, aux_factors=list(AUX_FACTORS), aux_max_t=AUX_MAX_T,
                self_aux_weight=cfg.self_aux_weight, self_aux_factors=list(SELF_AUX_FACTORS),
                cfg_drop=CFG_DROP, class_list_share=cfg.class_list_share, text_encoder=cfg.text_encoder)
    _write_meta(cfg, meta)
    return meta


# ---------------------------------------------------------------------------------------------- BLIP


def blip_target(caption: str, tags: list[str], rng: np.random.Generator) -> tuple[str, str]:
    """(prompt, text): the scene caption with no prompt, or (BLIP_PREFIX_SHARE of the time) DiffSegmenter's
    prompt "a photograph of ball" (a class the scene shows) completed by the caption ("a red ball on ...")."""
    if rng.random() < BLIP_PREFIX_SHARE:
        prompt = f"{BLIP_PREFIX} {tags[rng.integers(len(tags))]}"
        return prompt, f"{prompt} {strip_prefix(caption)}"
    return "", caption


def train_blip(cfg: RunConfig) -> dict:
    """Captioning LM loss (teacher forcing, `[DEC]` as the first token, as BLIP trains); no label maps.

    Prompt tokens are left out of the loss, as BLIP does for its "a picture of " prompt: the model learns to
    continue "a photograph of ball" but never to start an unconditional caption with it."""
    torch.manual_seed(cfg.seed)
    model = M.build_blip()
    processor = M.blip_processor()
    tok = processor.tokenizer
    bank = scene_bank("train", cfg.scenes, cfg.out)
    mean, std = processor.image_processor.image_mean, processor.image_processor.image_std
    bos = model.config.text_config.bos_token_id

    def step_fn(step: int):
        rng = np.random.default_rng([cfg.seed, step])
        idx = rng.choice(len(bank), size=min(cfg.batch, len(bank)), replace=False)
        pixels = normalise(images_to_tensor(bank.images[idx], rng.random(len(idx)) < 0.5), mean, std)
        prompts, texts = zip(*(blip_target(bank.captions[i], bank.tags[i], rng) for i in idx))
        enc = tok(list(texts), padding=True, truncation=True, max_length=48, return_tensors="pt")
        ids = enc["input_ids"].clone()
        ids[:, 0] = bos
        labels = ids.masked_fill(enc["attention_mask"] == 0, -100)
        for j, prompt in enumerate(prompts):
            if prompt:
                labels[j, :1 + len(tok(prompt, add_special_tokens=False)["input_ids"])] = -100
        out = model(pixel_values=pixels, input_ids=ids, attention_mask=enc["attention_mask"], labels=labels)
        return out.loss, {}

    meta = train_loop(cfg, model, step_fn)
    final = replace_dir(_final(cfg))
    model.save_pretrained(final)
    _write_meta(cfg, meta)
    return meta


# -------------------------------------------------------------------------------------------- DINOv2


def train_dinov2(cfg: RunConfig) -> dict:
    """Self-supervised (MoCo v3's InfoNCE over multi-crop views + a masked-patch term, ovss.toy.dino) on the
    scene images alone: no captions, no label maps. The EMA teacher is what ships, as in DINO."""
    from ovss.toy.dino import SelfDistillation, multi_crop, random_patch_masks

    torch.manual_seed(cfg.seed)
    model = SelfDistillation(M.build_dinov2())
    bank = scene_bank("train", cfg.scenes, cfg.out)
    n_patches = (M.TOY_IMAGE_SIZE // model.student.config.patch_size) ** 2
    current = {"step": 0}

    def step_fn(step: int):
        current["step"] = step
        rng = np.random.default_rng([cfg.seed, step])
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = rng.choice(len(bank), size=min(cfg.batch, len(bank)), replace=False)
        globals_, locals_ = multi_crop(images_to_tensor(bank.images[idx]), g)
        masks = [random_patch_masks(len(idx), n_patches, g) for _ in globals_]
        return model.loss(globals_, locals_, masks)

    meta = train_loop(cfg, model, step_fn, params=model.student_parameters(),
                      after_step=lambda: model.update_teacher((current["step"] + 1) / cfg.steps))
    final = replace_dir(_final(cfg))
    model.teacher.save_pretrained(final)
    _write_meta(cfg, meta)
    return meta


# ----------------------------------------------------------------------------------------------- CLI


TRAINERS: dict[str, Callable[[RunConfig], dict]] = {
    "clip": train_clip, "vae": train_vae, "unet": lambda c: train_unet(c, "eps"),
    "rf_unet": lambda c: train_unet(c, "rf"), "blip": train_blip, "dinov2": train_dinov2,
}


def make_config(kind: str, **overrides) -> RunConfig:
    values = {**DEFAULTS.get(kind, {}), **{k: v for k, v in overrides.items() if v is not None}}
    return RunConfig(kind=kind, **values)


def run(kind: str, **overrides) -> dict:
    cfg = make_config(kind, **overrides)
    torch.set_num_threads(cfg.threads)
    _setup_logging(cfg.run_dir)
    log.info("%s: %s", cfg.name, json.dumps(asdict(cfg)))
    return TRAINERS[kind](cfg)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ovss.toy.train", description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=[*TRAINERS, "export", "restore", "bank", "all"])
    p.add_argument("--steps", type=int)
    p.add_argument("--minutes", type=float)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--threads", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--scenes", type=int, help="train scenes in the bank (default 10000)")
    p.add_argument("--aux-weight", type=float, help="UNets: weight of the attention-region loss (0: none)")
    p.add_argument("--self-aux-weight", type=float,
                   help="UNets: weight of the self-attention region loss (0, the default: none)")
    p.add_argument("--class-list-share", type=float,
                   help="UNets: share of prompts that are bare class lists (default 0.2)")
    p.add_argument("--text-encoder", metavar="RUN",
                   help="UNets: the CLIP run whose frozen text tower conditions the UNet (default "
                   f"{TEXT_ENCODER_RUN}); resuming under another one retrains the UNet's cross-attention to it")
    p.add_argument("--freeze-text", action="store_true",
                   help="clip: keep the text tower fixed (to train on after the UNets took it)")
    p.add_argument("--hard-negatives", type=float,
                   help="clip: share of texts that also bring a negative with one thing word swapped for an "
                   "absent thing (0, the default: none)")
    p.add_argument("--thing-phrases", type=float,
                   help="clip: share of texts naming only the scene's things, no colours or stuff (default 0)")
    p.add_argument("--name", help="run name (folder under --out); default: the kind")
    p.add_argument("--out", help="runs folder (default .toy_runs)")
    p.add_argument("--dest", help="export: target folder; restore: the folder to restore from (default: the "
                   "package's assets/toy)")
    p.add_argument("--runs", help="export, restore: folder=run overrides, e.g. "
                   "diffusion=unet_cl,diffusion_rf=rf_unet_cl")
    p.add_argument("--folders", help="export: only these folders, e.g. diffusion (default: all of them)")
    p.add_argument("--generator", metavar="RUN",
                   help="bank: the ε UNet run whose images the bank holds, or 'exported' for the shipped "
                   "diffusion/ (default: the shipped bank's, TOY_BANK_GENERATOR)")
    p.add_argument("--ckpt-minutes", type=float)
    p.add_argument("--log-every", type=int)
    a = p.parse_args(argv)
    from ovss.toy.export import TOY_BANK_CAPTIONS, TOY_BANK_GENERATOR, build_toy_bank, export, restore  # it imports this

    common = dict(steps=a.steps, minutes=a.minutes, resume=a.resume or None, threads=a.threads, seed=a.seed,
                  batch=a.batch, lr=a.lr, scenes=a.scenes, out=a.out, ckpt_minutes=a.ckpt_minutes,
                  log_every=a.log_every)
    if a.what in ("export", "restore"):
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        runs = dict(item.split("=", 1) for item in a.runs.split(",")) if a.runs else None
        if a.what == "export":
            export(a.out or ".toy_runs", a.dest, runs, a.folders.split(",") if a.folders else None)
        else:
            restore(a.out or ".toy_runs", a.dest, runs)
        return
    if a.what == "bank":
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        build_toy_bank(a.scenes or TOY_BANK_CAPTIONS, a.dest, a.threads or 1, a.out or ".toy_runs",
                       None if a.generator == "exported" else a.generator or TOY_BANK_GENERATOR)
        return
    kinds = list(TRAINERS) if a.what == "all" else [a.what]
    for kind in kinds:
        run(kind, **common, name=a.name if a.what != "all" else None,
            aux_weight=a.aux_weight if kind in ("unet", "rf_unet") else None,
            self_aux_weight=a.self_aux_weight if kind in ("unet", "rf_unet") else None,
            freeze_text=a.freeze_text if kind == "clip" else None,
            hard_negatives=a.hard_negatives if kind == "clip" else None,
            thing_phrases=a.thing_phrases if kind == "clip" else None,
            class_list_share=a.class_list_share if kind in ("unet", "rf_unet") else None,
            text_encoder=a.text_encoder if kind in ("unet", "rf_unet") else None)
    if a.what == "all":  # one phase per model at the defaults, not the shipped UNets' phases (docs/toy-world.md)
        export(a.out or ".toy_runs", a.dest, {"diffusion": "unet", "diffusion_rf": "rf_unet"})
        build_toy_bank(threads=a.threads or 1, out=a.out or ".toy_runs")


if __name__ == "__main__":
    main()
