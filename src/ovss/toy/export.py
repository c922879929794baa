"""Write the toy world's trained runs as the shipped models: hub-layout folders, fp16 safetensors, a model card
each (`python -m ovss.toy.train export`), and FreeDA's toy bank from them (`... bank`)."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from ovss.io import atomic_write
from ovss.text.clip_bpe import clip_bpe_vocab, clip_tokenizer
from ovss.toy import models as M
from ovss.toy.scenes import make_scene, split_seeds
from ovss.toy.train import AUX_MAX_T, CFG_DROP, CLASS_LIST_SHARE, TEXT_ENCODER_RUN, load_text_tower, replace_dir

log = logging.getLogger("ovss.toy.export")

TOY_FOLDERS = {"clip": "clip", "diffusion": "unet_te2", "diffusion_rf": "rf_te_sa2", "blip": "blip",
               "dinov2": "dinov2", "dino": "dinov2"}
"""Exported folder -> the run it comes from (diffusion folders also take the vae run and CLIP's text tower). The
UNets' are the last phases of resumed runs (docs/toy-world.md)."""


def save_clip_tokenizer(directory: Path) -> None:
    """The CLIP BPE tokenizer as vocab.json + merges.txt (1.4 MB; transformers' tokenizer.json is 3.6 MB)."""
    directory.mkdir(parents=True, exist_ok=True)
    clip_tokenizer().save_pretrained(directory)
    (directory / "tokenizer.json").unlink(missing_ok=True)
    vocab, merges = clip_bpe_vocab()
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, separators=(",", ":")),
                                          encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                          encoding="utf-8")


def write_diffusion_folder(out: Path, unet_run: str, dest: Path, dtype: torch.dtype = torch.float16) -> Path:
    """A StableDiffusionPipeline-layout folder: the `unet_run` UNet, the vae run, the (frozen) text tower of the
    CLIP run the UNet was trained on, the CLIP tokenizer and SD's DDIM scheduler config."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from ovss.models.loading import write_model_index

    dest = replace_dir(dest)
    UNet2DConditionModel.from_pretrained(out / unet_run / "final", torch_dtype=dtype).save_pretrained(dest / "unet")
    AutoencoderKL.from_pretrained(out / "vae" / "final", torch_dtype=dtype).save_pretrained(dest / "vae")
    load_text_tower(out / text_encoder_run(out, unet_run) / "final").to(dtype).save_pretrained(dest / "text_encoder")
    save_clip_tokenizer(dest / "tokenizer")
    M.build_scheduler().save_pretrained(dest / "scheduler")
    write_model_index(dest)
    return dest


def export(out: str | Path = ".toy_runs", dest: str | Path | None = None, runs: dict[str, str] | None = None,
           folders: list[str] | None = None) -> Path:
    """Write clip/, diffusion/, diffusion_rf/, blip/, dinov2/ and dino/ in the hub layout, fp16 safetensors, with
    model cards.

    runs: folder -> run name, overriding TOY_FOLDERS (e.g. {"diffusion": "unet_cl"} ships a continued run).
    folders: the folders to write (default: all); the others are left as they are, so that shipping one continued
    run rewrites its folder only."""
    from transformers import BlipForConditionalGeneration, CLIPModel, Dinov2Model

    from ovss.models.loading import TOY_DIR

    out = Path(out)
    dest = Path(dest) if dest is not None else TOY_DIR
    runs = {**TOY_FOLDERS, **(runs or {})}
    folders = list(runs) if folders is None else list(folders)
    if unknown := [f for f in folders if f not in runs]:
        raise SystemExit(f"cannot export: no toy folder {unknown}; the folders are {', '.join(runs)}")
    diffusion = [f for f in folders if f in DIFFUSION_OBJECTIVES]
    needed = [runs[f] for f in folders] + (["vae"] if diffusion else []) + [text_encoder_run(out, runs[f])
                                                                          for f in diffusion]
    if missing := [r for r in needed if not (out / r / "final").exists()]:
        raise SystemExit(f"cannot export: runs {missing} have no final/ in {out}")
    half = torch.float16

    def clip(d: Path) -> None:
        CLIPModel.from_pretrained(out / runs["clip"] / "final").to(half).save_pretrained(d)
        save_clip_tokenizer(d)
        M.clip_image_processor().save_pretrained(d)

    def blip(d: Path) -> None:
        BlipForConditionalGeneration.from_pretrained(out / runs["blip"] / "final").to(half).save_pretrained(d)
        M.blip_processor().save_pretrained(d)

    writers = {"clip": clip, "blip": blip,
               "diffusion": lambda d: write_diffusion_folder(out, runs["diffusion"], d),
               "diffusion_rf": lambda d: write_diffusion_folder(out, runs["diffusion_rf"], d),
               "dinov2": lambda d: Dinov2Model.from_pretrained(out / runs["dinov2"] / "final").to(half)
               .save_pretrained(d),
               "dino": lambda d: M.dinov2_to_vit(Dinov2Model.from_pretrained(out / runs["dino"] / "final")).to(half)
               .save_pretrained(d)}  # folded in fp32, then halved
    for folder in folders:
        writers[folder](replace_dir(dest / folder))
        (dest / folder / "README.md").write_text(model_card(folder, out, runs[folder]), encoding="utf-8")
    log.info("exported %s to %s (%.1f MB in all)", ", ".join(folders), dest,
             sum(f.stat().st_size for f in dest.rglob("*") if f.is_file()) / 2**20)
    return dest


#: Exported diffusion folder -> the objective of its UNet run.
DIFFUSION_OBJECTIVES = {"diffusion": "eps", "diffusion_rf": "rf"}
#: What a diffusion folder's card (model_card) says of its UNet run: the CLIP run of its text tower, its steps, the vae.
CARD_TEXT_RUN = re.compile(r"the text tower of the toy CLIP run `(\w+)`")
CARD_STEPS = re.compile(r"^- steps: (\d+) \(planned", re.M)
CARD_VAE = re.compile(r"^- vae: .*$", re.M)


def restore(out: str | Path = ".toy_runs", src: str | Path | None = None, runs: dict[str, str] | None = None
            ) -> dict[str, str]:
    """The runs the shipped folders were exported from, back in `out`, so that training goes on where .toy_runs
    is gone (a fresh clone or machine, the GPU machine): final/ in fp32 for every run TOY_FOLDERS names, the vae
    and each UNet's text-tower CLIP run (one that did not ship whole, like clip_long, comes back as its text tower
    alone); each UNet run also gets a ckpt.pt at the step its card names, so that `--resume` continues it.

    What does not come back: the fp32 weights (the fp16 ones that ship are upcast), AdamW's state (a restored run
    restarts it on resume), loss histories (a restored run keeps its shipped card, which export writes again
    until the run trains on) and FreeDA's bank generator (not shipped). Existing runs are left as they are.
    runs: folder -> run name, overriding TOY_FOLDERS as in `export`. Returns run -> the folder it came from."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import BlipForConditionalGeneration, CLIPModel, CLIPTextModel, Dinov2Model

    from ovss.models.loading import TOY_DIR

    out, src = Path(out), Path(src) if src is not None else TOY_DIR
    runs = {**TOY_FOLDERS, **(runs or {})}
    plan = {runs["clip"]: ("clip", CLIPModel), runs["blip"]: ("blip", BlipForConditionalGeneration),
            runs["dinov2"]: ("dinov2", Dinov2Model), "vae": ("diffusion/vae", AutoencoderKL)}
    cards = {folder: (src / folder / "README.md").read_text(encoding="utf-8") for folder in runs}
    metas: dict[str, dict] = {}
    for folder, objective in DIFFUSION_OBJECTIVES.items():
        text_run, steps, vae = (r.search(cards[folder]) for r in (CARD_TEXT_RUN, CARD_STEPS, CARD_VAE))
        if not (text_run and steps and vae):
            raise SystemExit(f"cannot restore from {src / folder}: its README.md does not say its text tower's "
                             "CLIP run, its UNet's steps and its vae (was it written by `train export`?)")
        metas[runs[folder]] = {"objective": objective, "text_encoder": text_run.group(1),
                               "steps_done": int(steps.group(1))}
        plan[runs[folder]] = (f"{folder}/unet", UNet2DConditionModel)
        if text_run.group(1) == runs["clip"]:
            _check_same_tower(src / "clip", src / folder / "text_encoder")
        plan.setdefault(text_run.group(1), (f"{folder}/text_encoder", CLIPTextModel))
    metas["vae"] = {"card_line": CARD_VAE.search(cards["diffusion"]).group(0)}  # the vae restored is diffusion/'s
    for folder, run in runs.items():  # dino/ and dinov2/ come from one run, with a card each
        metas.setdefault(run, {}).setdefault("cards", {})[folder] = cards[folder]
    done = {}
    for run, (where, cls) in plan.items():
        if (out / run / "final").exists():
            log.info("restore: %s already has a final/, kept", out / run)
            continue
        model = cls.from_pretrained(src / where, torch_dtype=torch.float32)
        model.save_pretrained(replace_dir(out / run / "final"))
        meta = {"name": run, "restored_from": where, **metas.get(run, {})}
        if "steps_done" in meta:  # a UNet run: a checkpoint to resume from, without optimizer state
            state = {"model": model.state_dict(), "opt": None, "step": meta["steps_done"], "elapsed": 0.0,
                     "history": [], "config": {"restored_from": where}}
            atomic_write(out / run / "ckpt.pt", lambda f: torch.save(state, f), durable=True)
        (out / run / "meta.json").write_text(json.dumps(meta, indent=2))
        done[run] = where
        log.info("restore: %s <- %s", out / run, src / where)
    return done


def _check_same_tower(clip_dir: Path, text_dir: Path) -> None:
    """A diffusion folder whose card names clip/'s run must hold clip/'s text tower (else the names are wrong)."""
    tower, te = load_text_tower(clip_dir).state_dict(), load_text_tower(text_dir).state_dict()
    if tower.keys() != te.keys() or not all(torch.equal(tower[k], te[k]) for k in tower):
        raise SystemExit(f"cannot restore: {text_dir}'s card names clip/'s run, but it holds another text tower "
                         "(pass the runs the folders came from: --runs)")


def text_encoder_run(out: Path, unet_run: str) -> str:
    """The CLIP run whose text tower a UNet run was trained on (runs from before `--text-encoder`: the default)."""
    return _meta(out, unet_run).get("text_encoder", TEXT_ENCODER_RUN)


def _meta(out: Path, run_name: str) -> dict:
    path = out / run_name / "meta.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _probe_lines(out: Path, run_name: str) -> list[str]:
    """The probe numbers of a UNet run (written by `python -m ovss.toy.probe`), as markdown lines."""
    path = out / "probe" / f"{run_name}.json"
    if not path.exists():
        return [f"- not probed yet (`python -m ovss.toy.probe --run {run_name}`)"]
    p = json.loads(path.read_text())
    lines = []
    for key, b in p.get("binding", {}).items():
        prompt = "class-list" if key == "classes" else key
        lines.append(f"- binding, {prompt} prompt: the peak of a class word's map falls inside that class for "
                     f"{b['things']:.0%} of things (chance {b['things_chance']:.0%}) and {b['stuff']:.0%} of stuff "
                     f"(chance {b['stuff_chance']:.0%}), {b['n_scenes']} val scenes")
    for key, r in p.get("methods", {}).items():
        base = ", ".join(f"{k} {v:.1f}" for k, v in r["baselines"].items())
        tau = (f" at tau {r['tau']} (best tau on the same scenes, {r['best_tau']}: {r['best_miou']:.1f})"
               if "best_tau" in r else "")
        lines.append(f"- mIoU ({key}): {r['miou']:.1f}{tau}; baselines: {base}; {r['n_scenes']} val scenes")
    return lines


def _run_lines(meta: dict) -> list[str]:
    if not meta:
        return ["- (no meta.json: not trained yet)"]
    loss = ", ".join(f"{k} {v}" for k, v in meta.get("final_loss", {}).items())
    return [f"- steps: {meta['steps_done']} (planned {meta['steps_planned']}), batch {meta['batch']}, AdamW lr "
            f"{meta['lr']} (warm-up, cosine to lr/10), seed {meta['seed']}",
            f"- data: the first {meta['scenes']} train-split toy scenes at 64 px (seeds 0..{meta['scenes'] - 1}), "
            "random horizontal flips",
            f"- wall time: {meta['wall_minutes']} min on a shared 2-core CPU ({meta['threads']} thread), fp32",
            f"- final loss (mean of the last 50 steps): {loss}",
            *([f"- the last invocation resumed at step {meta['started_at']}; the settings above are its own, earlier "
               "steps' are in docs/toy-world.md"] if meta.get("started_at") else [])]


_RETRAIN = "Reproduce: `python -m ovss.toy.train {what}` then `python -m ovss.toy.train export` (docs/toy-world.md)."


def model_card(folder: str, out: Path, run_name: str | None = None) -> str:
    """README.md of an exported toy folder: what it is, how it was trained, what it is for, what it checks."""
    restored = _meta(out, run_name or TOY_FOLDERS[folder]).get("cards", {})
    if folder in restored:  # a restored run that has not trained on: its record is the card it shipped with
        return restored[folder]
    head = "---\nlibrary_name: {lib}\nlicense: apache-2.0\ntags: [ovss, toy-world]\n---\n\n"
    if folder == "clip":
        m = _meta(out, run_name or "clip")
        body = ["# ovss toy CLIP", "",
                "A `CLIPModel` trained from scratch on the ovss toy world (procedural 64-px scenes), for TagCLIP, "
                "the CLIP category filter and as the text encoder of the toy diffusion models. Not a general model.",
                "", "## Architecture",
                "- vision: ViT, 64 px, patch 8 (8x8 grid), 12 layers, width 96, 4 heads",
                "- text: width 64, 4 layers, 4 heads, the real CLIP BPE vocabulary (49,408 tokens), 77 positions; "
                "projection 64; learnable temperature (init 1/0.07, clamped at 100)",
                "", "## Training",
                "Symmetric InfoNCE over the batch. Texts: the scene caption, or (30 %) the scene's class names in "
                "a shuffled list (\"a photo of a ball, the grass and a box\"). **The label maps are never used.**",
                *([f"- {m['thing_phrases']:.0%} of texts name the scene's things alone (\"a photo of a ball and a "
                   "box\"), which only shape tells apart from another scene's"] if m.get("thing_phrases") else []),
                *([f"- {m['hard_negatives']:.0%} of texts bring a hard negative, the same text with one thing word "
                   "swapped for a thing the scene lacks, as an extra negative on the image -> text side (NegCLIP)"]
                  if m.get("hard_negatives") else []),
                *_run_lines(m), f"- final logit scale: {m.get('final_loss', {}).get('scale', 'n/a')}",
                *([f"- from step {m['text_frozen_from_step']} on, the text tower was frozen (the UNets had been "
                   "trained on it) and only the vision side trained on"] if "text_frozen_from_step" in m else []),
                "",
                _RETRAIN.format(what="clip")]
        return head.format(lib="transformers") + "\n".join(body) + "\n"
    if folder == "blip":
        m = _meta(out, run_name or "blip")
        body = ["# ovss toy BLIP captioner", "",
                "A `BlipForConditionalGeneration` trained from scratch on toy scenes and their captions, for "
                "FA-Seg's captions and DiffSegmenter's prefix completions (\"a photograph of ball\" -> \"a photograph "
                "of ball a red ball on the grass ...\"). Greedy decoding.",
                "", "## Architecture",
                "- vision: ViT, 64 px, patch 8, 4 layers, width 96; text decoder: 3 layers, width 96",
                "- tokenizer: BERT WordPiece, ovss's shipped vocabulary plus the toy words it lacked, appended "
                "(`[DEC]` is BOS)",
                "", "## Training",
                "Teacher-forced LM loss on the scene caption, or (30 %) on \"a photograph of {a class in the scene} "
                "{caption}\". **The label maps are never used.**", *_run_lines(m), "",
                _RETRAIN.format(what="blip")]
        return head.format(lib="transformers") + "\n".join(body) + "\n"
    if folder in ("dinov2", "dino"):
        m = _meta(out, run_name or "dinov2")
        what = ("`Dinov2Model`, FreeDA's DINOv2 (prototypes and dense features) in the toy world" if folder == "dinov2"
                else "`ViTModel`, OVDiff's DINO (keys of the last block) in the toy world: the toy DINOv2's "
                "weights in DINO v1's class (LayerScale folded into the output projections; the same outputs at "
                "64 px)")
        body = [f"# ovss toy {'DINOv2' if folder == 'dinov2' else 'DINO'}", "",
                f"A {what}. Trained from scratch on toy scenes, self-supervised. Not a general model.",
                "", "## Architecture",
                "- ViT, 64 px, patch 8 (8x8 tokens), 6 layers, width 96, 4 heads, MLP ratio 2",
                "", "## Training",
                "Self-supervised on the scene images alone (**no captions, no label maps**): MoCo v3's InfoNCE "
                "(temperature 0.2) between the student's predicted CLS embedding and an EMA teacher's over "
                "multi-crop views (2 global crops at 64 px, 4 local at 32 px, DINO's colour jitter), plus a "
                "masked-patch term (the student predicts the teacher's patch tokens where its input was masked, "
                "iBOT / data2vec style). DINO's own loss sat at its uniform plateau on this budget. The EMA "
                "teacher ships. Module: `ovss.toy.dino`.",
                *_run_lines(m), "", _RETRAIN.format(what="dinov2")]
        return head.format(lib="transformers") + "\n".join(body) + "\n"
    run_name = run_name or TOY_FOLDERS[folder]
    m, vae = _meta(out, run_name), _meta(out, "vae")
    rf = folder == "diffusion_rf"
    aux = m.get("aux_weight", 0)
    objective = (["Rectified flow, InstaFlow's convention: x_t = t * noise + (1 - t) * x0, t in [0, 1] passed as "
                  "timestep 1000 t (1000 = pure noise); the UNet predicts v = x0 - noise (x_data = x_noise + v). "
                  "FA-Seg's official reading (one tiny DDIM step at t = 1, output used as if it were eps) and its "
                  "`rf_1plus1` option (z_T = z0 - v(z0, 0)) both apply."] if rf else
                 ["eps-prediction with SD-1.x's DDPM schedule (scaled_linear betas 0.00085-0.012, 1000 steps)."])
    supervision = (
        [f"**Attention was supervised.** The loss adds {aux} x an auxiliary term that pulls each class word's "
         "cross-attention into its ground-truth region: -log of the share of the word's attention mass "
         "(layer/head mean, normalised over pixels) inside the class's region, at attention factors "
         f"{m.get('aux_factors')} (grids 16/8/4/2), on the half of each batch drawn at low noise "
         f"(t < {m.get('aux_max_t')}/1000), prompt not dropped. This uses the toy label maps. It makes the toy "
         "world check each method's pipeline end to end; it does not show that attention localises on its own. "
         "The numbers of the same ε UNet trained without it are below and in docs/toy-world.md.",
         *([f"**Self-attention was supervised too** (from the self-attention phase on, see docs/toy-world.md): "
            f"{m['self_aux_weight']} x "
            "-log of the share of each query cell's self-attention (layer/head mean) that falls on cells of its "
            f"own class, at factors {m.get('self_aux_factors')}, on the same low-noise half of each batch. SD's "
            "self-attention groups pixels by object after long training, which DiffSegmenter and FA-Seg rely on; "
            "this UNet is taught it from the label maps."] if m.get("self_aux_weight") else [])]
        if aux else ["Attention was not supervised: plain diffusion loss."])
    no_aux = _meta(out, "unet_noaux")
    comparison = (["", "The same ε UNet trained without the auxiliary loss (`unet_noaux`, kept in .toy_runs, not "
                   f"shipped; {no_aux.get('steps_done')} steps, {no_aux.get('wall_minutes')} min):",
                   *_probe_lines(out, "unet_noaux")] if no_aux and not rf else
                  ["", "No RF UNet was trained without the auxiliary loss; the ε comparison run is reported in "
                   "diffusion/README.md and docs/toy-world.md."] if aux else [])
    body = [f"# ovss toy {'rectified-flow ' if rf else ''}text-to-image diffusion model", "",
            ("The FA-Seg model of the toy world (stands in for InstaFlow's 2-RF SD-1.5). " if rf else
             "The DiffSegmenter / OVDiff model of the toy world (stands in for SD-1.5 / 2.1; FreeDA's shipped bank "
             f"was generated by the run `{TOY_BANK_GENERATOR}`). ") +
            "StableDiffusionPipeline layout; trained from scratch on 64-px toy scenes. Not a general model.",
            "", "## Parts",
            "- unet: UNet2DConditionModel on 16x16x4 latents, block channels (32, 64, 64, 64), 1 layer per block, "
            "3 CrossAttnDownBlock2D + DownBlock2D, mirrored up, cross-attention mid block: cross and self "
            "attention at factors 1/2/4/8 (grids 16/8/4/2) like SD-1.5's 64/32/16/8; 4 heads, "
            "cross_attention_dim 64",
            vae.get("card_line") or
            f"- vae: AutoencoderKL 64 px -> 16x16x4 (3 levels, factor 4), L1 + L2 + 1e-4 KL; scaling_factor "
            f"{vae.get('scaling_factor')} = 1 / the measured latent std ({vae.get('latent_std_unscaled')}), "
            f"{vae.get('steps_done')} steps, {vae.get('wall_minutes')} min, final loss {vae.get('final_loss')}",
            f"- text_encoder: the text tower of the toy CLIP run `{text_encoder_run(out, run_name)}`, copied and "
            "**frozen** (as SD "
            "does; a jointly trained text encoder gave no word-to-region binding in the issue's trials). A later "
            "CLIP run can ship as clip/ without touching it, as SD-1.5's text encoder and the CLIP a method scores "
            "with are different models too; tokenizer: the real CLIP BPE",
            "- scheduler: DDIMScheduler config of SD-1.x", "", "## Training", *objective,
            f"Prompts: the scene caption; {m.get('class_list_share', CLASS_LIST_SHARE):.0%} FA-Seg-style class lists "
            "(\"ball, grass, sky\", "
            f"shuffled); {CFG_DROP:.0%} the empty prompt (classifier-free guidance). Half of each batch is drawn "
            f"at low noise (t < {AUX_MAX_T}/1000), where the methods read attention.",
            *supervision, *_run_lines(m), "", "## Probe (val scenes)", *_probe_lines(out, run_name), *comparison,
            "", _RETRAIN.format(what="rf_unet" if rf else "unet")]
    return head.format(lib="diffusers") + "\n".join(body) + "\n"


#: The ε UNet run whose images the shipped toy bank holds: the step-5000 UNet on clip/'s text tower, not the
#: shipped diffusion/ (continued on clip_long's tower), whose bank scored lower (toy_full 31.8 vs 40.1; its
#: captions' stuff words bind less, 79 vs 98 %; docs/toy-world.md). FreeDA's bank generator is its own choice
#: (the paper's is SD 2.1); at test time FreeDA reads only DINOv2, CLIP and the bank.
TOY_BANK_GENERATOR = "unet_cl_sa_aux15"

#: Train-split captions the shipped toy bank is generated from (FreeDA's bank uses COCO's 118k images' captions;
#: the toy vocabulary is 12 words, so a thousand captions name each of them hundreds of times).
TOY_BANK_CAPTIONS = 1000


def build_toy_bank(n: int = TOY_BANK_CAPTIONS, dest: str | Path | None = None, threads: int = 1,
                   out: str | Path = ".toy_runs", generator: str | None = None) -> Path:
    """FreeDA's offline stage with the exported toy models (`ovss bank build`'s code path): the first `n`
    train-scene captions generated by an ε diffusion model at 64 px with the paper's schedule (50 steps,
    CFG 7.5), DINOv2 at its 64-px native size, keys from the toy CLIP. The generator is the ε UNet run
    `generator` in `out`, written as it would ship (fp16, its own text tower), or None: the exported
    diffusion/. Written to assets/toy/freeda_bank; finished chunks wait in `out`/bank_shards/<settings hash>,
    so a killed build resumes and a build after the models changed starts afresh beside it."""
    from tqdm import tqdm

    from ovss.banks import settings_hash
    from ovss.banks.build import BuildConfig, Caption, bank_settings, build_local, make_models
    from ovss.models.presets import TOY_CONFIG

    torch.set_num_threads(threads)
    dest = Path(dest) if dest is not None else Path(TOY_CONFIG["freeda"]["bank"])
    captions = [Caption(f"scene{seed}", make_scene(seed, M.TOY_IMAGE_SIZE).caption)
                for seed in split_seeds("train")[:n]]
    # ~5 rows per caption: 512-row chunks let a killed build resume within a minute or two of where it stopped
    config = BuildConfig(dino_size=int(TOY_CONFIG["freeda"]["dino_size"]), batch_size=8, chunk_rows=512)
    roles: str | dict[str, str] = "toy"
    if generator is not None:
        folder = write_diffusion_folder(Path(out), generator, Path(out) / generator / "fp16")
        roles = {"diffusion": str(folder), "dinov2": "toy", "clip": "toy"}
    models = make_models(roles)
    scratch = Path(out) / "bank_shards" / settings_hash(bank_settings(config, models, captions))
    with tqdm(total=len(captions), unit="caption", desc="toy bank") as bar:
        _, bank = build_local(captions, dest, config, models, build_dir=scratch, progress=bar.update)
    log.info("toy bank: %s", bank)
    return bank
