"""The Gradio page of `ovss serve`: widgets wired to ServeApp's handlers, one request at a time.

Gradio is imported here only, so the handlers (app.py) and the rest of ovss work without the web extra.
Requests go through Gradio's queue with concurrency 1: a second request waits for the models instead of
running a second copy beside them, and the page shows its place in the queue and a progress bar.
"""
from __future__ import annotations

import ipaddress
import logging
import os
from typing import TYPE_CHECKING, Any

from ovss.io import ImageLoadError
from ovss.serve.app import (
    MODEL_PRESETS,
    VOCABULARIES,
    RunRequest,
    ServeApp,
    ServeConfig,
    ServeError,
    resolve_models,
    toy_scene,
    toy_scene_names,
    vocabulary_text,
)

if TYPE_CHECKING:
    import gradio as gr

log = logging.getLogger(__name__)

#: waiting requests beyond this are refused with "queue full" rather than piling up without bound
QUEUE_SIZE = 32
#: Gradio's own copies of served files are deleted after this many seconds (checked as often)
CACHE_SECONDS = 3600
NO_CHOICE = "none"
DEFAULT_THRESHOLD = 0.5
#: display heights in CSS pixels: small inputs (toy scenes) are scaled up to this, large ones down
IMAGE_HEIGHT = 320
GALLERY_HEIGHT = 200
GALLERY_COLUMNS = 6

#: small images (toy scenes) are drawn scaled up to fill their box, with crisp pixels
_CSS = ".ovss-picture img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }"
_INTRO = ("# ovss: open-vocabulary segmentation\n"
          "Upload an image (or pick a toy scene), name the classes, choose methods, press **Segment**. "
          "Runs locally; requests are served one at a time.")


def is_loopback(host: str) -> bool:
    """True when `host` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _user_error(err: Exception) -> "gr.Error":
    import gradio as gr

    return gr.Error(str(err), print_exception=False)


def build_ui(app: ServeApp) -> "gr.Blocks":
    """The page: inputs on the left, a side-by-side comparison and one column per method on the right."""
    import gradio as gr

    _, startup_note = resolve_models(app.config.models)
    with gr.Blocks(title="ovss serve", analytics_enabled=False, delete_cache=(CACHE_SECONDS, CACHE_SECONDS)) as page:
        gr.Markdown(_INTRO)
        note = gr.Markdown(startup_note, elem_id="note")
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                upload = gr.File(label="Image", file_types=["image"], type="binary", elem_id="upload")
                scene = gr.Dropdown([NO_CHOICE, *toy_scene_names()], value=NO_CHOICE, label="…or a bundled toy scene",
                                    elem_id="scene")
                preview = gr.Image(label="Input", type="pil", format="png", interactive=False, height=220,
                                   elem_id="preview")
                classes = gr.Textbox(label="Classes (comma-separated)", placeholder="cat, sofa, floor", lines=2,
                                     elem_id="classes")
                vocabulary = gr.Dropdown([NO_CHOICE, *VOCABULARIES], value=NO_CHOICE,
                                         label="…or a dataset vocabulary", elem_id="vocabulary")
                methods = gr.CheckboxGroup(app.methods, value=app.methods[:1],
                                           label="Methods (several run side by side)", elem_id="methods")
                models = gr.Dropdown(list(MODEL_PRESETS), value=app.config.models, label="Models", elem_id="models")
                background = gr.Checkbox(True, label="Background class where no class reaches the threshold")
                own_threshold = gr.Checkbox(True, label="Each method's own threshold")
                threshold = gr.Slider(0.0, 1.0, value=DEFAULT_THRESHOLD, step=0.01, label="Background threshold",
                                      interactive=False, elem_id="threshold")
                run = gr.Button("Segment", variant="primary", elem_id="run")
            with gr.Column(scale=3):
                comparison = gr.Image(label="Side by side", type="pil", format="png", interactive=False,
                                      height=IMAGE_HEIGHT, elem_id="comparison", elem_classes="ovss-picture")
                per_method = []
                with gr.Row():
                    for m in app.methods:
                        with gr.Column(visible=m in app.methods[:1], min_width=280) as column:
                            overlay = gr.Image(label=f"{m}: overlay", type="pil", format="png", interactive=False,
                                               height=IMAGE_HEIGHT, elem_id=f"overlay-{m}", elem_classes="ovss-picture")
                            summary = gr.Markdown(f"**{m}**", elem_id=f"summary-{m}")
                            masks = gr.Gallery(label=f"{m}: masks", format="png", columns=GALLERY_COLUMNS,
                                               height=GALLERY_HEIGHT, object_fit="contain", elem_id=f"masks-{m}")
                            heatmaps = gr.Gallery(label=f"{m}: class scores (0 purple … 1 yellow)", format="png",
                                                  columns=GALLERY_COLUMNS, height=GALLERY_HEIGHT, object_fit="contain",
                                                  elem_id=f"scores-{m}")
                            files = gr.File(label=f"{m}: label PNG, JSON, overlay, masks", file_count="multiple",
                                            interactive=False, elem_id=f"files-{m}")
                        per_method.append((column, summary, overlay, masks, heatmaps, files))

        def on_upload(data: bytes | None) -> tuple[Any, str]:
            try:
                return app.image(data, None), NO_CHOICE
            except (ImageLoadError, ServeError) as err:
                raise _user_error(err) from None

        def on_scene(name: str) -> tuple[Any, Any]:
            if name == NO_CHOICE:
                return gr.update(), gr.update()
            try:
                return toy_scene(name), None  # a picked scene replaces the upload
            except ServeError as err:
                raise _user_error(err) from None

        def on_vocabulary(name: str) -> Any:
            if name == NO_CHOICE:
                return gr.update()
            try:
                return vocabulary_text(name)
            except ServeError as err:
                raise _user_error(err) from None

        def on_methods(chosen: list[str]) -> list[Any]:
            return [gr.update(visible=m in chosen) for m in app.methods]

        def on_run(data: bytes | None, scene_name: str, class_text: str, chosen: list[str], preset: str,
                   bg: bool, own: bool, tau: float, progress: gr.Progress = gr.Progress()) -> list[Any]:
            request = RunRequest(classes=class_text, methods=list(chosen or []), upload=data or None,
                                 toy_scene=None if scene_name == NO_CHOICE else scene_name, models=preset,
                                 background=bool(bg), bg_threshold=None if own else float(tau))
            try:
                result = app.run(request, progress=lambda f, msg: progress(f, desc=msg))
            except (ImageLoadError, ServeError) as err:
                raise _user_error(err) from None
            views = {v.method: v for v in result.views}
            out: list[Any] = [result.comparison, result.note]
            for m in app.methods:
                v = views.get(m)
                if v is None:
                    out += [gr.update(visible=False), gr.update(), None, None, None, None]
                else:
                    out += [gr.update(visible=True), v.summary, v.overlay, v.masks or None, v.heatmaps or None,
                            [str(p) for p in v.files] or None]
            return out

        upload.upload(on_upload, inputs=upload, outputs=[preview, scene])
        upload.clear(lambda: None, outputs=preview)
        scene.input(on_scene, inputs=scene, outputs=[preview, upload])
        vocabulary.input(on_vocabulary, inputs=vocabulary, outputs=classes)
        own_threshold.change(lambda own: gr.update(interactive=not own), inputs=own_threshold, outputs=threshold)
        methods.change(on_methods, inputs=methods, outputs=[c[0] for c in per_method])
        run.click(on_run, inputs=[upload, scene, classes, methods, models, background, own_threshold, threshold],
                  outputs=[comparison, note, *(w for widgets in per_method for w in widgets)])
    return page


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 7860) -> None:
    """Load the default method's models, then serve the page until interrupted."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no usage reports, no version check online
    app = ServeApp(config)
    try:
        models, note = resolve_models(config.models)
        if note:
            log.warning("%s", note.replace("**", ""))
        print(f"ovss serve: loading {app.methods[0]} ({models} models) ...", flush=True)
        try:
            app.segmenter(app.methods[0], models)
        except Exception as err:  # the page still serves other presets and methods, and shows this error
            log.warning("could not load %s with the %s models: %s", app.methods[0], models,
                        str(err).splitlines()[0] if str(err) else type(err).__name__)
        page = build_ui(app)
        page.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)
        _, url, _ = page.launch(server_name=host, server_port=port, share=False, max_file_size=config.max_upload_bytes,
                                allowed_paths=[str(app.work_dir)], ssr_mode=False, inbrowser=False, css=_CSS,
                                quiet=True, prevent_thread_lock=True)
        print(f"ovss serve: open {url} in a browser (Ctrl+C stops the server)", flush=True)
        page.block_thread()
    finally:
        app.close()
