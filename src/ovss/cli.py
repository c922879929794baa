"""The `ovss` command: one entry point, one `_add_<name>` function per subcommand.

A subcommand is added by writing `_add_<name>(subparsers)` (it builds its parser and sets `func`) and
listing it in COMMANDS. Handlers return the exit code: 0 success, 1 some inputs failed, 2 bad usage.
Everything that can be checked cheaply (classes, options, the output folder) is checked before any model
or image is loaded, so a typo costs a second, not a model load.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import os
import sys
import types
import typing
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

import ovss
from ovss.io import ImageLoadError, expand_inputs, load_image, save_segmentation, write_json
from ovss.models import PRESETS
from ovss.registry import get_method_class, list_methods
from ovss.text.classes import BACKGROUND, validate_classes

#: outputs written next to the per-image files; an image called e.g. summary.jpg gets another stem
_RESERVED_STEMS = ("summary", "classes")
_BOOLS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
_NONE = ("none", "null")


class CLIError(Exception):
    """A user-facing failure: printed as one line, no traceback, exit with `code`."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keep the hand-written examples' line breaks (defaults are stated in each option's help)."""


def _add_device_options(p: argparse.ArgumentParser,
                        dtype: str | None = "float16, bfloat16 or float32 (default: the method's choice)") -> None:
    """--device (and --dtype, unless dtype=None), worded alike on every subcommand that loads models."""
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    if dtype is not None:
        p.add_argument("--dtype", default=None, help=dtype)


# -- ovss methods -------------------------------------------------------------------------------------


def method_line(name: str) -> str:
    """`name  role=hub-id (kind)  ...` for one registered method."""
    preset = PRESETS.get(name, {})
    declared = get_method_class(name).roles
    roles = list(declared) + [r for r in preset if r not in declared]
    parts = []
    for role in roles:
        if role in preset:
            kind, hub_id = preset[role]
            parts.append(f"{role}={hub_id} ({kind})")
        else:
            parts.append(f"{role}=(no preset)")
    return f"{name:<15} {'  '.join(parts) or '(no models)'}"


def _cmd_methods(args: argparse.Namespace) -> int:
    for name in list_methods():
        print(method_line(name))
    return 0


def _add_methods(sub: Any) -> None:
    p = sub.add_parser(
        "methods", formatter_class=_Formatter, help="list the segmentation methods and the models they use",
        description="List every registered method, one line each, with its model roles and the hub id each\n"
                    "role loads by default (the paper's models). Override a role with --models role=SOURCE.",
        epilog="Examples:\n  ovss methods\n  ovss segment photo.jpg -m faseg -c cat,dog --models diffusion=./my-sd -o out")
    p.set_defaults(func=_cmd_methods)


# -- ovss segment -------------------------------------------------------------------------------------


def read_classes(text: str | None, file: str | None) -> list[str]:
    """-c "cat,dog" or a file (one or more names a line, comma-separated; '#' comments and blank lines ignored)."""
    if file is not None:
        try:
            raw = Path(file).read_text(encoding="utf-8")
        except OSError as err:
            raise CLIError(f"cannot read the classes file {file}: {err.strerror or err}") from None
        lines = [ln for ln in raw.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        text = "\n".join(lines)
    try:
        return validate_classes(text or "")
    except ValueError as err:
        raise CLIError(f"bad class list: {err}") from None


def read_labels_file(file: str, classes: list[str]) -> dict[str, list[str]]:
    """--labels-file: JSON {image file name or stem: [class, ...]}, e.g. ground-truth image-level labels."""
    try:
        data = json.loads(Path(file).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CLIError(f"cannot read the labels file {file}: {getattr(err, 'strerror', None) or err}") from None
    if not isinstance(data, dict) or not all(isinstance(v, list) and all(isinstance(c, str) for c in v)
                                             for v in data.values()):
        raise CLIError(f"labels file {file}: expected a JSON object {{image name: [class, ...]}}")
    unknown = sorted({c for v in data.values() for c in v} - set(classes))
    if unknown:
        raise CLIError(f"labels file {file}: classes {unknown} are not in the class list")
    return data


def parse_models(text: str | None) -> None | str | dict[str, str]:
    """--models: absent or "paper" -> None (the paper's hub ids); "tiny"/"toy"; "role=src,role=src" -> dict."""
    if text is None or text.strip() == "paper":
        return None
    text = text.strip()
    if text in ("tiny", "toy"):
        return text
    if "=" not in text:
        raise CLIError(f"--models {text!r}: use paper, tiny, toy or role=SOURCE[,role=SOURCE...]")
    out: dict[str, str] = {}
    for item in text.split(","):
        role, sep, src = item.partition("=")
        if not sep or not role.strip() or not src.strip():
            raise CLIError(f"--models: {item!r} is not role=SOURCE")
        out[role.strip()] = src.strip()
    return out


def parse_value(text: str) -> Any:
    """A --set value: int, float, bool (true/false/yes/no/on/off), none, a comma list of those, or a string."""
    if "," in text:
        return [parse_value(part) for part in text.split(",")]
    t = text.strip()
    if t.lower() in _BOOLS:
        return _BOOLS[t.lower()]
    if t.lower() in _NONE:
        return None
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    return t


def _coerce(value: Any, raw: str, hint: Any) -> Any:
    """Fit a parsed value to the field's annotation where the guess was ambiguous ("1" for a str field)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]
    origin = typing.get_origin(hint) or hint
    if hint is str:
        return raw
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin in (list, tuple) and value is not None:
        items = value if isinstance(value, list) else [value]
        return tuple(items) if origin is tuple else items
    return value


def config_overrides(method_cls: type, sets: list[str], seed: int | None) -> dict[str, Any]:
    """--set KEY=VALUE pairs (and --seed) checked against the method's Config fields."""
    fields = {f.name for f in dataclasses.fields(method_cls.Config) if f.init}
    try:
        hints = typing.get_type_hints(method_cls.Config)
    except (NameError, TypeError):
        hints = {}
    out: dict[str, Any] = {}
    for item in sets:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CLIError(f"--set {item!r}: expected KEY=VALUE")
        if key not in fields:
            raise CLIError(f"--set {key}: {method_cls.name} has no option {key!r}; "
                           f"valid options: {', '.join(sorted(fields))}")
        out[key] = _coerce(parse_value(raw), raw.strip(), hints.get(key))
    if seed is not None:
        if "seed" in fields:
            out["seed"] = seed
        else:
            logging.getLogger(__name__).warning("%s has no seed option; --seed ignored", method_cls.name)
    return out


def prepare_out_dir(path: Path) -> Path:
    """Create OUT (and parents) and prove it is writable, before any expensive work."""
    if path.exists() and not path.is_dir():
        raise CLIError(f"output {path} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".ovss-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise CLIError(f"output folder {path} cannot be created or written: {err.strerror or err}") from None
    return path


def unique_stems(paths: list[Path]) -> list[str]:
    """File stems, made distinct ("cat", "cat_2") case-insensitively and away from OUT's own files."""
    used = {s.lower() for s in _RESERVED_STEMS}
    stems = []
    for p in paths:
        cand, k = p.stem, 2
        while cand.lower() in used:
            cand, k = f"{p.stem}_{k}", k + 1
        used.add(cand.lower())
        stems.append(cand)
    return stems


def _model_sources(method: Any) -> dict[str, str] | None:
    sources = getattr(getattr(method, "models", None), "sources", None)
    return dict(sources()) if callable(sources) else None


def _cmd_segment(args: argparse.Namespace) -> int:
    classes = read_classes(args.classes, args.classes_file)
    labels = None if args.labels_file is None else read_labels_file(args.labels_file, classes)
    try:
        method_cls = get_method_class(args.method)
    except ValueError as err:
        raise CLIError(str(err)) from None
    config = config_overrides(method_cls, args.set or [], args.seed)
    models = parse_models(args.models)
    if args.batch_size is not None and args.batch_size < 1:
        raise CLIError("--batch-size must be at least 1")
    out = prepare_out_dir(Path(args.out))

    paths, problems = expand_inputs(args.inputs)
    failures: list[dict[str, str]] = []

    def skip(item: str, reason: str) -> None:
        failures.append({"input": item, "reason": reason})
        tqdm.write(f"ovss: skipped {item}: {reason}", file=sys.stderr)

    for item, reason in problems:
        skip(item, reason)
    if not paths:
        raise CLIError("no images to segment", code=1)
    unlabelled = [str(p) for p in paths if labels is not None and p.name not in labels and p.stem not in labels]
    if unlabelled:
        raise CLIError(f"the labels file has no entry for {len(unlabelled)} image(s): {', '.join(unlabelled[:5])}")

    try:
        method = ovss.create(args.method, models=models, device=args.device, dtype=args.dtype, **config)
    except (TypeError, ValueError) as err:
        raise CLIError(str(err)) from None
    except (RuntimeError, OSError) as err:
        raise CLIError(f"could not load the {args.method} models: {err}", code=1) from None

    vocab = ([BACKGROUND] if args.background else []) + classes
    write_json(out / "classes.json", {"classes": vocab, "background": args.background})
    pending: deque[tuple[Path, str, Any]] = deque()
    done: list[dict[str, Any]] = []
    bar = tqdm(total=len(paths), unit="image", desc=f"ovss segment {args.method}", file=sys.stderr)

    def images():
        for path, stem in zip(paths, unique_stems(paths)):
            try:
                im = load_image(path)
            except ImageLoadError as err:
                skip(str(path), err.reason)
                bar.update(1)
                continue
            pending.append((path, stem, im))
            yield im

    def segmented():
        if labels is None:
            yield from method.segment_many(images(), classes, batch_size=args.batch_size,
                                           background=args.background, bg_threshold=args.bg_threshold)
            return
        # Per batch, so that each image's labels follow it even when an unreadable image is skipped.
        loaded = images()
        while batch := list(itertools.islice(loaded, args.batch_size or method.default_batch_size)):
            given = [labels.get(path.name, labels.get(path.stem)) for path, _, _ in pending]
            yield from method.segment_many(batch, classes, batch_size=len(batch), background=args.background,
                                           bg_threshold=args.bg_threshold, given=given)

    completed = False
    try:
        for seg in segmented():
            path, stem, im = pending.popleft()
            if list(seg.classes) != vocab:
                raise RuntimeError(f"{args.method} returned classes {seg.classes} for {path}, expected {vocab}")
            files = save_segmentation(seg, out, stem, image=im, masks=args.masks)
            done.append({"input": str(path), "stem": stem,
                         "files": {k: os.path.relpath(v, out) for k, v in files.items()}})
            bar.update(1)
        completed = True
    finally:
        bar.close()
        write_json(out / "summary.json", {
            "method": args.method, "models": _model_sources(method),
            "config": dataclasses.asdict(method.config) if dataclasses.is_dataclass(method.config) else None,
            "classes": vocab, "background": args.background, "bg_threshold": args.bg_threshold,
            "images": done, "failures": failures, "completed": completed, "ovss_version": ovss.__version__})
    print(f"ovss: {len(done)} image(s) segmented, {len(failures)} skipped; outputs in {out}", file=sys.stderr)
    return 1 if failures else 0


_SEGMENT_EPILOG = """\
Outputs (in OUT):
  <stem>.png          label map, palette PNG: pixel value = index into classes.json
  <stem>_overlay.png  the image tinted with class colours, legend on the right
  <stem>.json         classes, pixel fraction per class present, size, method details
  <stem>_masks/       one black/white PNG per class present (with --masks)
  classes.json        the class list the label PNGs index ("background" first when on)
  summary.json        method, models, options, files per image, skipped inputs

Examples:
  ovss segment cat.jpg -m faseg -c "cat,sofa,floor" -o out/
  ovss segment photos/ "more/*.png" -m faseg --classes-file voc.txt --batch-size 4 -o out/
  ovss segment cat.jpg -m faseg -c cat,dog --models tiny -o /tmp/smoke      # random tiny models, seconds
  ovss segment cat.jpg -m diffsegmenter -c cat,dog --no-background --seed 0 -o out/
  ovss segment cat.jpg -m faseg -c cat,dog --set bg_threshold=0.55 -o out/    # any Config field
  ovss segment cat.jpg -m faseg -c cat,dog --models diffusion=./local-sd,captioner=tiny -o out/

Unreadable, corrupt or non-image files are reported, skipped, and the rest finish; the exit code is then 1.
See `ovss methods` for method names, model roles and default models."""


def _add_segment(sub: Any) -> None:
    p = sub.add_parser(
        "segment", formatter_class=_Formatter, help="segment images over a list of class names",
        description="Label every pixel of each image with one of the given class names (open vocabulary:\n"
                    "any names). PATH may be an image, a folder (searched recursively) or a glob pattern.",
        epilog=_SEGMENT_EPILOG)
    p.add_argument("inputs", nargs="+", metavar="PATH", help="image files, folders or glob patterns")
    p.add_argument("-m", "--method", required=True, help="method name (see `ovss methods`)")
    cls = p.add_mutually_exclusive_group(required=True)
    cls.add_argument("-c", "--classes", help='comma-separated class names, e.g. "cat,dog,sofa"')
    cls.add_argument("--classes-file", metavar="FILE", help="file of class names (one a line or comma-separated)")
    p.add_argument("--background", action=argparse.BooleanOptionalAction, default=True,
                   help="add a background class (index 0) for pixels no class explains (default: on)")
    p.add_argument("--bg-threshold", type=float, default=None, metavar="X",
                   help="score below which a pixel is background (default: the method's paper value)")
    _add_device_options(p)
    p.add_argument("--batch-size", type=int, default=None, metavar="N", help="images per model call (default: the method's)")
    p.add_argument("--seed", type=int, default=None, help="random seed for methods that draw noise (sets the Config's seed)")
    p.add_argument("--models", default=None, metavar="SPEC",
                   help="paper (the paper's hub ids, default), tiny (random, for smoke tests), toy, or "
                        "role=SOURCE,... where SOURCE is a hub id, a local folder or tiny")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any field of the method's Config, e.g. --set bg_threshold=0.55; a,b,c gives a list (repeatable)")
    p.add_argument("--masks", action="store_true", help="also write one binary mask PNG per class present")
    p.add_argument("--labels-file", metavar="FILE",
                   help='JSON {"image name or stem": [classes]}: score only those classes per image (e.g. image-level '
                        'labels, for weakly supervised pseudo-masks)')
    p.add_argument("-o", "--out", required=True, metavar="OUT", help="output folder (created if missing)")
    p.set_defaults(func=_cmd_segment)


#: one function per subcommand; later subcommands (eval, bank, prototypes, demo, bench, serve) append here
# -- ovss demo ----------------------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace) -> int:
    from ovss.demo import run_demo

    out = prepare_out_dir(Path(args.out))
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    result = run_demo(out, models=args.models, n=args.n, size=args.size, methods=methods, device=args.device,
                      seed=args.seed)
    print(result.markdown())
    print(f"\nwrote {out}/grid.png (scene | truth | each method), per-method overlays and results.json")
    return 1 if result.failures else 0


def _add_demo(sub: Any) -> None:
    p = sub.add_parser(
        "demo", formatter_class=_Formatter, help="run every method on a few toy-world scenes (offline)",
        description="Generate a few scenes of the toy world (textured stuff, coloured things, exact ground truth),\n"
                    "segment them with every method over the toy things (stuff = background) using the shipped\n"
                    "toy models, and write overlays, a side-by-side grid and an mIoU table next to the trivial\n"
                    "baselines. Without the toy models it runs tiny random-weight models and says so.",
        epilog="Examples:\n  ovss demo\n  ovss demo -o out/demo --n 12 --methods faseg\n  ovss demo --models tiny")
    p.add_argument("-o", "--out", default="out/demo", help="output folder (default: out/demo)")
    p.add_argument("--models", choices=("toy", "tiny"), default=None,
                   help="toy (default when installed) or tiny (random weights)")
    p.add_argument("--n", type=int, default=6, help="number of scenes (default: 6)")
    p.add_argument("--size", type=int, default=160, help="scene side in pixels (default: 160)")
    p.add_argument("--methods", default=None, help="comma-separated subset of methods (default: all)")
    _add_device_options(p, dtype=None)
    p.add_argument("--seed", type=int, default=None,
                   help="sets the seed of every method that has one (default: each method's own, e.g. OVDiff's "
                        "support-set seed 42, so that its cached prototypes are reused)")
    p.set_defaults(func=_cmd_demo)


# -- ovss eval ----------------------------------------------------------------------------------------


def _cmd_eval(args: argparse.Namespace) -> int:
    from ovss.data.datasets import LayoutError
    from ovss.eval.reports import compare_files
    from ovss.eval.runner import EvalConfig, EvalConfigError, ModelLoadError, evaluate, parse_sweep

    if args.compare:
        try:
            print(compare_files(args.compare), end="")
        except ValueError as err:
            raise CLIError(str(err)) from None
        return 0
    missing = [flag for flag, value in (("-m/--method", args.method), ("--dataset", args.dataset),
                                        ("-o/--out", args.out)) if value is None]
    if missing:
        raise CLIError(f"{', '.join(missing)} required (or --compare A.json B.json ...)")
    try:
        method_cls = get_method_class(args.method)
        sweep = None if args.sweep_threshold is None else parse_sweep(args.sweep_threshold)
    except ValueError as err:
        raise CLIError(str(err)) from None
    config = config_overrides(method_cls, args.set or [], args.seed)
    models = parse_models(args.models)
    classes = None if args.classes_file is None else read_classes(None, args.classes_file)
    if args.batch_size is not None and args.batch_size < 1:
        raise CLIError("--batch-size must be at least 1")
    cfg = EvalConfig(
        method=args.method, dataset=args.dataset, out_dir=args.out, data_root=args.data_root, protocol=args.protocol,
        split=args.split, limit=args.limit, models=models, device=args.device, dtype=args.dtype,
        batch_size=args.batch_size, workers=args.workers, method_options=config, classes=classes,
        classes_file=args.classes_file, name_set=args.name_set, candidates_file=args.candidates_file,
        sweep_threshold=sweep, grid=args.grid, seed=args.seed, size=args.size)
    out = prepare_out_dir(Path(args.out))
    try:
        results = evaluate(cfg)
    except (EvalConfigError, LayoutError) as err:
        raise CLIError(str(err)) from None
    except ModelLoadError as err:
        raise CLIError(str(err), code=1) from None
    except KeyboardInterrupt:
        print(f"ovss eval: interrupted; finished predictions are kept in {out / 'preds'}: rerun the same command "
              "to resume", file=sys.stderr)
        return 130
    print((out / "results.md").read_text(encoding="utf-8"), end="")
    print(f"ovss eval: {results['n_images']} images; results.json, results.md"
          f"{', grid.png' if args.grid else ''} in {out}", file=sys.stderr)
    return 0


_EVAL_EPILOG = """\
Outputs (in OUT):
  results.json   mIoU (nanmean), mIoU (plain mean), aAcc, per-class IoU (percent), per-image mIoU, dataset,
                 split, protocol, method config, models, class names, candidates file + sha256, threshold,
                 sweep (oracle), timing, software versions, date, device
  results.md     the same as a Markdown report
  grid.png       image | ground truth | prediction for the first --grid images
  preds/<id>.png cached label maps: a killed run resumes from them (rerun the same command)
  scores/<id>.npz  best foreground score + class per pixel (with --sweep-threshold)
  run.json       the settings the cache belongs to (other settings are refused, not mixed in)

Protocols (evaluation.md): tcl (short side 448, windows 448/224), candidates (whole image, per-image
candidate lists, plain mean; voc21/context60/coco_object), sclip (336/224/112), ovdiff. Default: the
method's paper protocol. Datasets: voc20 voc21 context59 context60 coco_object coco_stuff cityscapes
ade20k (under --data-root, standard layouts: docs/evaluation.md), toy and toy_full (generated).

Examples:
  ovss eval -m faseg --dataset voc21 --data-root data/ -o runs/faseg_voc21
  ovss eval -m faseg --dataset context60 --data-root data/ --set bg_threshold=context \\
            --candidates-file candidate_classes_context.json -o runs/faseg_ctx
  ovss eval -m diffsegmenter --dataset voc21 --data-root data/ --sweep-threshold 0.30:0.74:0.01 -o runs/ds
  ovss eval -m faseg --dataset toy --models toy --limit 20 -o /tmp/toy      # offline, minutes on a CPU
  ovss eval --compare runs/faseg_voc21/results.json runs/ds/results.json"""


def _add_eval(sub: Any) -> None:
    from ovss.eval.protocols import PROTOCOLS

    p = sub.add_parser(
        "eval", formatter_class=_Formatter, help="score a method on a benchmark (mIoU), resumably",
        description="Run a method over one split of a benchmark under a named protocol and score it with the\n"
                    "dataset-level confusion matrix (mmseg semantics). Rerunning the same command resumes.",
        epilog=_EVAL_EPILOG)
    p.add_argument("-m", "--method", help="method name (see `ovss methods`)")
    p.add_argument("--dataset", metavar="KEY", help="benchmark key, e.g. voc21, context59, ade20k, toy")
    p.add_argument("--data-root", metavar="DIR", help="folder holding VOCdevkit/, coco_stuff164k/, ... (not for toy)")
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), help="default: the method's paper protocol, else tcl")
    p.add_argument("--split", help="default: the evaluation split (val; validation for ADE20K)")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N images of the split")
    p.add_argument("--size", type=int, metavar="PX", help="image side of the toy datasets (default: 64)")
    p.add_argument("--classes-file", metavar="FILE",
                   help="class names in label order replacing the dataset's (background datasets: foreground only)")
    p.add_argument("--name-set", metavar="NAME", help="a named spelling of the class names (ovss.data.names), "
                                                      "e.g. faseg, ovdiff (default: the method's, if any)")
    p.add_argument("--candidates-file", metavar="FILE",
                   help="per-image candidate lists (JSON) for the candidates protocol (default: the method's stage)")
    p.add_argument("--sweep-threshold", metavar="A:B:STEP",
                   help="also score every background threshold A..B on cached scores and report the best "
                        "(an ORACLE, DiffSegmenter's protocol), e.g. 0.30:0.74:0.01")
    p.add_argument("--models", default=None, metavar="SPEC", help="paper (default), tiny, toy or role=SOURCE,...")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any field of the method's Config (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="random seed for methods that draw noise")
    _add_device_options(p)
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="images per model call (default: the method's)")
    p.add_argument("--workers", type=int, default=2, metavar="N", help="threads loading images ahead (default: 2)")
    p.add_argument("--grid", type=int, default=8, metavar="N", help="examples in grid.png (default: 8; 0 = none)")
    p.add_argument("-o", "--out", metavar="OUT", help="output folder (created if missing)")
    p.add_argument("--compare", nargs="+", metavar="RESULTS_JSON",
                   help="print results.json files side by side (Markdown) instead of running")
    p.set_defaults(func=_cmd_eval)


# -- ovss serve ---------------------------------------------------------------------------------------


def _cmd_serve(args: argparse.Namespace) -> int:
    from ovss.serve import ServeConfig

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    if args.max_upload_mb <= 0 or args.max_megapixels <= 0:
        raise CLIError("--max-upload-mb and --max-megapixels must be positive")
    try:
        config = ServeConfig(models=args.models, methods=methods, device=args.device, dtype=args.dtype,
                             max_upload_bytes=int(args.max_upload_mb * 2**20),
                             max_pixels=int(args.max_megapixels * 1_000_000))
    except ValueError as err:
        raise CLIError(str(err)) from None
    try:
        from ovss.serve.server import is_loopback, serve
        import gradio  # noqa: F401
    except ImportError:
        raise CLIError("ovss serve needs the web extra (Gradio): pip install 'ovss[web]'", code=1) from None
    if not is_loopback(args.host):
        print(f"ovss serve: warning: listening on {args.host}, not only on this machine: anyone who can reach "
              f"port {args.port} can use the app and your CPU/GPU (there is no login)", file=sys.stderr)
    try:
        serve(config, host=args.host, port=args.port)
    except OSError as err:
        raise CLIError(f"cannot serve on {args.host}:{args.port}: {err}", code=1) from None
    return 0


def _add_serve(sub: Any) -> None:
    from ovss.serve.app import MAX_PIXELS, MAX_UPLOAD_BYTES, MODEL_PRESETS

    p = sub.add_parser(
        "serve", formatter_class=_Formatter, help="a local web app: upload an image, name classes, look",
        description="Serve a web page (Gradio; needs `pip install 'ovss[web]'`) to segment uploaded images or\n"
                    "bundled toy scenes with one or several methods side by side: overlay with legend, per-class\n"
                    "masks and score maps, label PNG and JSON to download. Models load once and stay warm;\n"
                    "requests queue and run one at a time. Listens on 127.0.0.1 (this machine only) by default.",
        epilog="Examples:\n  ovss serve                                   # http://127.0.0.1:7860, toy models\n"
               "  ovss serve --models paper --methods faseg,diffsegmenter --device cuda\n"
               "  ovss serve --host 0.0.0.0 --port 8080        # reachable from the network: no login!")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1; 0.0.0.0 exposes the app to the network)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    p.add_argument("--models", choices=MODEL_PRESETS, default="toy",
                   help="models preset selected in the page (default: toy; tiny random-weight models stand in "
                        "until the toy models are installed)")
    p.add_argument("--methods", default=None, help="comma-separated methods to offer (default: all)")
    _add_device_options(p)
    p.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_BYTES / 2**20,
                   help="largest accepted upload in MiB (default: %(default)g)")
    p.add_argument("--max-megapixels", type=float, default=MAX_PIXELS / 1e6,
                   help="largest accepted image in megapixels, checked before decoding (default: %(default)g)")
    p.set_defaults(func=_cmd_serve)


# -- ovss bench ---------------------------------------------------------------------------------------


def _parse_batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise CLIError(f"--batch-sizes {text!r}: expected comma-separated integers, e.g. 1,4,16") from None
    if not sizes or min(sizes) < 1:
        raise CLIError(f"--batch-sizes {text!r}: every batch size must be at least 1")
    return sizes


def _cmd_bench(args: argparse.Namespace) -> int:
    from ovss.bench import BenchConfig, markdown_table, run_bench

    out = Path(args.out)
    if out.is_dir():
        raise CLIError(f"-o {out}: is a folder; give a JSON file name")
    try:
        cfg = BenchConfig(method=args.method, models=args.models, batch_sizes=_parse_batch_sizes(args.batch_sizes),
                          repeats=args.repeats, warmup=args.warmup, device=args.device, dtype=args.dtype,
                          classes=args.classes, naive=args.naive, compile=args.compile, resolution=args.resolution,
                          threads=args.threads, seed=args.seed)
    except ValueError as err:
        raise CLIError(str(err)) from None
    prepare_out_dir(out.parent)
    report = run_bench(cfg)
    write_json(out, report)
    print(markdown_table(report))
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


_BENCH_EPILOG = """\
Timings start from decoded images with given candidates and a given caption (the FA-Seg paper's Table 2
excludes candidate extraction and captioning). Each batch size runs --warmup untimed and --repeats timed
runs of the optimized method, then of the baseline on the same images: FA-Seg's naive per-image version
(ovss.bench.naive_faseg) or DiffSegmenter's one UNet pass per class. The JSON holds every repeat's time, the
median, IQR, min/max, images/s, peak memory (CUDA: max allocated; CPU: sampled RSS high-water), the speedup,
the max abs score difference between the two, device, dtype, threads, versions and the date.

Examples:
  ovss bench -m faseg --models tiny -o out/bench_tiny.json                          # CPU, about a minute
  ovss bench -m faseg --resolution 128 --batch-sizes 1 --repeats 1 --warmup 0 -o /tmp/ci.json   # seconds
  ovss bench -m faseg --models random --batch-sizes 1 --repeats 1 --warmup 0 --no-naive --threads 2 -o cpu.json
  ovss bench -m faseg --models random --device cuda --dtype float16 --batch-sizes 1,4,16 -o gpu.json
  ovss bench -m diffsegmenter --models random --device cuda --classes 10 --batch-sizes 1 -o ds.json
See benchmarks/README.md and docs/performance.md."""


def _add_bench(sub: Any) -> None:
    p = sub.add_parser(
        "bench", formatter_class=_Formatter, help="time a method against its straightforward baseline",
        description="Measure a method's speed and peak memory next to a plain implementation of the same\n"
                    "algorithm, in the same process, and check that both give the same scores.",
        epilog=_BENCH_EPILOG)
    p.add_argument("-m", "--method", default="faseg", help="faseg (default) or diffsegmenter")
    p.add_argument("--models", default="tiny",
                   help="tiny (default; seconds) or random (full-size SD-1.5 shapes, random weights, no download)")
    p.add_argument("--batch-sizes", default="1,4", metavar="B,B,...", help="images per call (default: 1,4)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per batch size (default: 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default: 1)")
    _add_device_options(p)
    p.add_argument("--classes", type=int, default=3, help="candidate classes per image (default: 3, at most 20)")
    p.add_argument("--naive", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the baseline, for the speedup and the output check (default: on)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (eager if compiling fails)")
    p.add_argument("--resolution", type=int, default=None, metavar="PX",
                   help="working resolution (default: the model's native size, 512 for SD-1.5)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the images and the method's noise (default: 0)")
    p.add_argument("-o", "--out", required=True, metavar="OUT.json", help="report file (JSON)")
    p.set_defaults(func=_cmd_bench)


# -- ovss prototypes ----------------------------------------------------------------------------------


def _dataset_classes(key: str) -> list[str]:
    """--dataset: the benchmark's foreground names, in OVDiff's spelling where its name set covers them."""
    from ovss.data.names import DATASET_CLASSES, class_names

    if key not in DATASET_CLASSES:
        raise CLIError(f"unknown dataset {key!r}; available: {', '.join(DATASET_CLASSES)}")
    try:
        names = class_names(key, "ovdiff")
    except ValueError:
        names = class_names(key)
    return [n for n in names if n != BACKGROUND]


def _cmd_prototypes_build(args: argparse.Namespace) -> int:
    from ovss.banks.storage import parse_shard

    classes = _dataset_classes(args.dataset) if args.dataset else read_classes(args.classes, args.classes_file)
    try:
        shard = None if args.shard is None else parse_shard(args.shard)
    except ValueError as err:
        raise CLIError(str(err)) from None
    method_cls = get_method_class("ovdiff")
    config = config_overrides(method_cls, args.set or [], args.seed)
    config.update(cache_dir=str(prepare_out_dir(Path(args.cache))), build_missing=True)
    models = parse_models(args.models)
    try:
        method = ovss.create("ovdiff", models=models, device=args.device, dtype=args.dtype, **config)
    except (TypeError, ValueError) as err:
        raise CLIError(str(err)) from None
    except (RuntimeError, OSError) as err:
        raise CLIError(f"could not load the ovdiff models: {err}", code=1) from None
    try:
        status = method.build_prototypes(classes, shard=shard, progress=not args.quiet)
    except KeyboardInterrupt:
        print(f"ovss prototypes: interrupted; finished classes are kept in {args.cache}: rerun the same command "
              "to resume", file=sys.stderr)
        return 130
    built = sum(s == "built" for s in status.values())
    where = "" if shard is None else f" (shard {shard[0]}/{shard[1]}: {len(status)} of {len(classes)} classes)"
    print(f"ovss prototypes: {built} class(es) built, {len(status) - built} already cached{where}; cache {args.cache}")
    return 0


_PROTOTYPES_EPILOG = """\
Every class is built once (sampling N support images, masks, features, prototypes) and stored under
CACHE/<class>/<settings hash>/ as safetensors + a JSON manifest; reruns skip finished classes, an
interrupted class is redone, and any vocabulary containing a class reuses it. `ovss segment -m ovdiff
--set cache_dir=CACHE` then reads them. Settings that change prototypes (models, --set ...) must match
between building and segmenting, or the classes are built again.

Examples:
  ovss prototypes build -c "cat,dog,sofa" --cache ~/ovdiff-cache
  ovss prototypes build --dataset voc21 --cache /shared/ovdiff --shard 0/4     # machine 1 of 4
  ovss prototypes build --classes-file mine.txt --cache c/ --set feature_extractors=sd,dino
  ovss prototypes build -c cat,dog --cache /tmp/c --models tiny --set n_support=4 --set steps=2"""


def _add_prototypes(sub: Any) -> None:
    p = sub.add_parser("prototypes", formatter_class=_Formatter, help="OVDiff's per-class prototype cache",
                       description="Manage OVDiff's prototype cache (support sets and prototypes per class).")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    b = actions.add_parser("build", formatter_class=_Formatter, help="build prototypes for a list of classes",
                           description="Sample support sets and compute OVDiff prototypes for every class that the\n"
                                       "cache does not hold yet, with a progress bar per class and overall.",
                           epilog=_PROTOTYPES_EPILOG)
    cls = b.add_mutually_exclusive_group(required=True)
    cls.add_argument("-c", "--classes", help='comma-separated class names, e.g. "cat,dog,sofa"')
    cls.add_argument("--classes-file", metavar="FILE", help="file of class names (one a line or comma-separated)")
    cls.add_argument("--dataset", metavar="KEY", help="a benchmark's class names, e.g. voc21, context60, ade20k")
    b.add_argument("--cache", required=True, metavar="DIR", help="cache folder (created if missing; may be shared)")
    b.add_argument("--shard", metavar="I/N", help="build only shard I of N (0-based; every N-th class from I)")
    b.add_argument("--models", default=None, metavar="SPEC", help="paper (default), tiny, toy or role=SOURCE,...")
    b.add_argument("--set", action="append", metavar="KEY=VALUE", help="any field of OVDiff's Config (repeatable)")
    b.add_argument("--seed", type=int, default=None, help="support-set seed (default: the paper's 42)")
    _add_device_options(b, dtype="float16, bfloat16 or float32 (default: float16 on CUDA)")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=_cmd_prototypes_build)


# -- ovss bank ----------------------------------------------------------------------------------------


def _bank_index_after(bank: Path, kind: str) -> None:
    if kind != "none":
        from ovss.banks.index import build_index

        print(f"ovss bank: {kind} index written to {build_index(bank, kind)}", file=sys.stderr)


def _cmd_bank_build(args: argparse.Namespace) -> int:
    from ovss.banks.bank import BankError, shard_range
    from ovss.banks.storage import parse_shard
    from ovss.banks.build import BuildConfig, build_local, build_ray, make_models, read_captions

    shard = None
    try:
        if args.shard is not None:
            shard = parse_shard(args.shard)
        captions = read_captions(args.captions, args.limit)
    except (OSError, ValueError) as err:
        raise CLIError(f"--captions {args.captions}: {getattr(err, 'strerror', None) or err}"
                       if isinstance(err, OSError) else str(err)) from None
    if shard is not None and args.ray is not None:
        raise CLIError("--shard and --ray exclude each other: Ray splits the captions itself")
    options = config_overrides(types.SimpleNamespace(Config=BuildConfig, name="bank build"), args.set or [], args.seed)
    if args.batch_size is not None:
        options["batch_size"] = args.batch_size
    try:
        config = BuildConfig(**options)
    except (TypeError, ValueError) as err:
        raise CLIError(str(err)) from None
    models = parse_models(args.models)
    out = prepare_out_dir(Path(args.out))
    try:
        if args.ray is not None:
            reports, bank = build_ray(args.captions, out, config, workers=args.ray, n_shards=args.shards,
                                      limit=args.limit, models=models, device=args.device, dtype=args.dtype,
                                      build_dir=args.build_dir)
            built = sum(int(r["captions"]) for r in reports)
            seconds = max((float(r["seconds"]) for r in reports), default=0.0)
        else:
            model_set = make_models(models, args.device, args.dtype)
            start, end = shard_range(len(captions), *(shard or (0, 1)), align=config.batch_size)
            with tqdm(total=end - start, unit="caption", desc="bank build") as bar:
                report, bank = build_local(captions, out, config, model_set, shard=shard, build_dir=args.build_dir,
                                           progress=bar.update)
            built, seconds = report.captions, report.seconds
    except BankError as err:
        raise CLIError(str(err), code=1) from None
    rate = f"; {built / seconds:.2f} captions/s" if built and seconds > 0 else ""
    if bank is None:
        print(f"ovss bank build: shard {args.shard} done ({built} captions built{rate}); merge all shards with "
              f"`ovss bank merge {args.build_dir or out / 'shards'} -o BANK`", file=sys.stderr)
        return 0
    print(f"ovss bank build: bank written to {bank} ({built} captions built{rate})", file=sys.stderr)
    _bank_index_after(bank, args.index)
    return 0


def _cmd_bank_merge(args: argparse.Namespace) -> int:
    from ovss.banks.bank import Bank, BankError, merge_shards

    try:
        bank = merge_shards(args.shards, args.out)
        n = len(Bank(bank))
    except BankError as err:
        raise CLIError(str(err), code=1) from None
    print(f"ovss bank merge: {n} rows in {bank}", file=sys.stderr)
    _bank_index_after(bank, args.index)
    return 0


def _cmd_bank_index(args: argparse.Namespace) -> int:
    from ovss.banks.bank import BankError
    from ovss.banks.index import build_index

    try:
        path = build_index(args.bank, args.kind, hnsw_m=args.hnsw_m, ef_construction=args.ef_construction)
    except BankError as err:
        raise CLIError(str(err), code=1) from None
    print(f"ovss bank index: {args.kind} index written to {path}", file=sys.stderr)
    return 0


def _cmd_bank_convert(args: argparse.Namespace) -> int:
    from ovss.banks.bank import BankError
    from ovss.banks.convert import convert_release

    try:
        bank = convert_release(args.index, args.prototypes, args.out, clip=args.clip, dinov2=args.dinov2)
    except (BankError, OSError, RuntimeError) as err:
        raise CLIError(str(err), code=1) from None
    print(f"ovss bank convert: {len(bank)} rows in {bank.root}", file=sys.stderr)
    return 0


_BANK_EPILOG = """\
Examples:
  ovss bank build --captions captions_train2017.json -o banks/coco          # one process, then merged
  ovss bank build --captions caps.txt -o banks/mine --index hnsw --set steps=30
  ovss bank build --captions caps.json -o banks/coco --shard 3/8           # one of 8 manual splits
  ovss bank merge banks/coco/shards -o banks/coco                          # after all 8 finished
  ovss bank build --captions caps.json -o /shared/banks/coco --ray 8       # Ray Data, one GPU per worker
  ovss bank index banks/coco --kind flat
  ovss bank convert --index release/knn.index --prototypes release/prototypes -o banks/release
  ovss segment photo.jpg -m freeda -c "cat,sofa" --set bank=banks/coco -o out/

Rerunning an interrupted build resumes it: finished captions are never redone. docs/methods/freeda.md
describes the bank format and a COCO-scale build on a Ray cluster."""


def _add_bank(sub: Any) -> None:
    p = sub.add_parser(
        "bank", formatter_class=_Formatter, help="build, merge, index or convert a FreeDA prototype bank",
        description="FreeDA's offline stage: generate an image per caption with Stable Diffusion, turn each caption\n"
                    "noun's cross-attention into a mask, pool DINOv2 features inside it (the prototype) and embed\n"
                    "the noun in its caption with CLIP (the key). Banks are safetensors parts + a JSON manifest.",
        epilog=_BANK_EPILOG)
    bank_sub = p.add_subparsers(dest="bank_command", metavar="ACTION", required=True)
    index_kinds = ("flat", "hnsw", "none")

    b = bank_sub.add_parser("build", formatter_class=_Formatter, help="build a bank (or one shard) from captions",
                            epilog=_BANK_EPILOG)
    b.add_argument("--captions", required=True, metavar="FILE",
                   help="COCO captions JSON, JSON/JSONL records {id, text}, or a text file (one caption a line)")
    b.add_argument("-o", "--out", required=True, metavar="BANK", help="bank folder (shards go to BANK/shards)")
    b.add_argument("--shard", metavar="I/N", help="build only shard I of N (0-based); merge them afterwards")
    b.add_argument("--build-dir", metavar="DIR", help="where shards are written (default: BANK/shards)")
    b.add_argument("--ray", type=int, metavar="WORKERS", help="build on Ray with this many workers, then merge")
    b.add_argument("--shards", type=int, metavar="N", help="shards for --ray (default: 4 per worker)")
    b.add_argument("--limit", type=int, metavar="N", help="only the first N captions")
    b.add_argument("--index", choices=index_kinds, default="flat", help="index to build after merging (default: flat)")
    b.add_argument("--models", default=None, metavar="SPEC", help="paper (default), tiny or role=SOURCE,...")
    b.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a BuildConfig field, e.g. steps=50, guidance=7.5, gamma=0.45, alpha=0.9 (repeatable)")
    b.add_argument("--seed", type=int, default=None, help="base noise seed (each caption derives its own)")
    b.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="captions per generation batch (default: 4); every shard of a bank must use the same")
    _add_device_options(b, dtype="generator dtype (default: float16 on CUDA)")
    b.set_defaults(func=_cmd_bank_build)

    m = bank_sub.add_parser("merge", formatter_class=_Formatter, help="merge finished shards into one bank")
    m.add_argument("shards", nargs="+", metavar="SHARD", help="shard folders, or folders holding shard-* folders")
    m.add_argument("-o", "--out", required=True, metavar="BANK", help="bank folder")
    m.add_argument("--index", choices=index_kinds, default="flat", help="index to build after merging (default: flat)")
    m.set_defaults(func=_cmd_bank_merge)

    x = bank_sub.add_parser("index", formatter_class=_Formatter, help="(re)build the faiss index beside a bank")
    x.add_argument("bank", metavar="BANK")
    x.add_argument("--kind", choices=("flat", "hnsw"), default="flat", help="exact inner product (default) or HNSW")
    x.add_argument("--hnsw-m", type=int, default=32, metavar="M", help="HNSW graph degree (default: 32)")
    x.add_argument("--ef-construction", type=int, default=200, metavar="N", help="HNSW build depth (default: 200)")
    x.set_defaults(func=_cmd_bank_index)

    c = bank_sub.add_parser("convert", formatter_class=_Formatter, help="convert the authors' released collection")
    c.add_argument("--index", required=True, metavar="FILE", help="the release's knn.index (or its folder)")
    c.add_argument("--prototypes", required=True, metavar="DIR", help="the release's folder of .npy prototypes")
    c.add_argument("-o", "--out", required=True, metavar="BANK", help="bank folder")
    c.add_argument("--clip", default="openai/clip-vit-large-patch14", help="the CLIP that made the keys")
    c.add_argument("--dinov2", default="facebook/dinov2-large", help="the DINOv2 that made the prototypes")
    c.set_defaults(func=_cmd_bank_convert)


# -- entry point --------------------------------------------------------------------------------------


COMMANDS: list[Callable[[Any], None]] = [
    _add_segment, _add_methods, _add_demo, _add_eval, _add_serve, _add_bench, _add_prototypes, _add_bank,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ovss", formatter_class=_Formatter,
        description="Training-free open-vocabulary semantic segmentation with diffusion models.",
        epilog="Examples:\n  ovss methods\n  ovss segment cat.jpg -m faseg -c \"cat,sofa\" -o out/\n"
               "  ovss segment --help      (every subcommand explains itself with examples)")
    parser.add_argument("--version", action="version", version=f"ovss {ovss.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `ovss ARGS`; returns the exit code (argparse's own exits are returned, not raised)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(format="ovss: %(message)s", level=logging.WARNING)
    try:
        return args.func(args)
    except CLIError as err:
        print(f"ovss {args.command}: error: {err}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:
        print("ovss: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
