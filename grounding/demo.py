"""``grounding-demo``: a local web page (Gradio) that runs the project's methods on an uploaded image.

::

    pip install -e ".[demo]"
    grounding-demo                                     # the two offline synthetic models, http://127.0.0.1:7860
    grounding-demo --model RUN/ --model gem/synthetic.yaml --model IDEA-Research/grounding-dino-tiny --out demo_outputs/

Every ``--model`` is a source ``grounding.predictor.Predictor.load`` takes (a checkpoint, a run folder, a
config, a detector's hub id or transformers folder); a model is loaded the first time it is chosen, then
kept. Models with random weights (the synthetic configs) are built under ``--seed``, so one source gives the
same model at every start.

The page takes an image, a prompt (class names separated by commas, or, for the detector, a sentence), the
model and the detector's thresholds; it shows the drawing (boxes, or the label map with its legend) and the
record, and offers the record as a JSON file. Each run writes two files under ``--out``, each atomically
(a temporary file in the same folder, then a rename): ``<image id>_<method>_<time>_<tag>.png`` and the
``.json`` beside it, the record of ``grounding.predictor.json_record`` with ``"model"`` and ``"method"``,
``"path"`` the uploaded file's name, and for a label map ``"class_pixels"`` (pixels per class). Gradio's
own files (uploads, the copies it serves) go to ``--out``/gradio_cache; nothing is written elsewhere, and
only ``--out`` is served. An upload that does not decode as an image is refused with an error naming it
(and deleted). The server listens on 127.0.0.1 unless ``--host`` says otherwise; ``--share`` (a public
gradio.live link) is off unless asked for.
"""

from __future__ import annotations

import argparse
import html
import inspect
import json
import os
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from PIL import Image

from grounding.utils import write_atomic

PROG = "grounding-demo"
#: the models of ``grounding-demo`` without ``--model``: both offline, random weights
DEFAULT_MODELS = ("image/synthetic.yaml", "gem/synthetic.yaml")
DEFAULT_OUT = "demo_outputs"
#: the folder under ``--out`` where Gradio keeps uploads and the files it serves
CACHE_FOLDER = "gradio_cache"
MAX_FILE_SIZE = "64mb"
PROMPT_KINDS = ("classes", "sentence")


class ModelCache:
    """Named model sources, each loaded on first use (under ``seed``) and kept; a lock per model so one
    model runs one request at a time (a method keeps its classes between calls)."""

    def __init__(self, models: Mapping[str, Any], seed: int = 0, device: str | None = None) -> None:
        self.sources = dict(models)
        self.seed, self.device = seed, device
        self.loaded: dict[str, Any] = {name: value for name, value in self.sources.items() if not isinstance(value, (str, Path))}
        self.locks = {name: threading.Lock() for name in self.sources}

    @property
    def names(self) -> list[str]:
        return list(self.sources)

    def get(self, name: str) -> Any:
        """The predictor named ``name``, loaded now if this is its first use. Call it holding ``locks[name]``."""
        if name not in self.sources:
            raise KeyError(f"no model named {name!r}; the models: {', '.join(self.sources)}")
        if name not in self.loaded:
            from grounding.predictor import Predictor

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                self.loaded[name] = Predictor.load(self.sources[name], device=self.device)
        return self.loaded[name]


def name_models(models: Sequence[Any] | Mapping[str, Any]) -> dict[str, Any]:
    """``{display name: source or Predictor}``: a source's name is itself, a Predictor's its method
    (numbered when repeated)."""
    if isinstance(models, Mapping):
        named = dict(models)
    else:
        named = {}
        for model in models:
            base = str(model) if isinstance(model, (str, Path)) else str(getattr(model, "method", "model"))
            name, count = base, 2
            while name in named:
                name, count = f"{base} ({count})", count + 1
            named[name] = model
    if not named:
        raise ValueError("no model given")
    return named


# ------------------------------------------------------------------------------------------------- one request
def checked_image(path: str) -> tuple[Path, str]:
    """The uploaded file and its name, after decoding it whole with PIL; an error naming it otherwise (the
    rejected upload is deleted)."""
    import gradio as gr

    file = Path(path)
    name = file.name
    try:
        with Image.open(file) as image:
            image.load()
    except Exception as error:  # noqa: BLE001 - PIL raises many kinds for a file that is not an image
        reason = " ".join(str(error).replace(str(file), name).split()) or type(error).__name__
        _forget_upload(file)
        raise gr.Error(f"{_escape(name)} is not an image (it does not decode: {_escape(reason)})") from None
    return file, name


def _escape(text: str) -> str:
    """``text`` safe in Gradio's error modal (which renders HTML), quotes kept readable."""
    return html.escape(str(text), quote=False)


def _forget_upload(file: Path) -> None:
    """Delete a rejected upload when it lies in Gradio's upload folder (never a file of the user's own)."""
    from gradio.utils import get_upload_folder

    folder = Path(get_upload_folder()).resolve()
    try:
        resolved = file.resolve()
        if folder in resolved.parents:
            resolved.unlink()
            if resolved.parent != folder and not any(resolved.parent.iterdir()):
                resolved.parent.rmdir()
    except OSError:
        pass


def parse_boxes(text: str | None) -> list[list[float]] | None:
    """``"x0,y0,x1,y1; x0,y0,x1,y1"`` -> boxes in pixels (MaskInversion's regions); empty -> None."""
    if not text or not text.strip():
        return None
    boxes = []
    for index, part in enumerate(p for p in re.split(r"[;\n]", text) if p.strip()):
        values = [v for v in re.split(r"[,\s]+", part.strip().strip("[]()")) if v]
        try:
            box = [float(v) for v in values]
        except ValueError:
            box = []
        if len(box) != 4:
            raise ValueError(f"box {index + 1} ({part.strip()!r}) is not four numbers x0, y0, x1, y1")
        boxes.append(box)
    return boxes


def output_stem(record: dict, method: str) -> str:
    """``<image id>_<method>_<time>_<tag>``, safe as a file name, unique per request."""
    ident = str(record.get("image_id") or record.get("target_id") or "image")
    ident = re.sub(r"[^A-Za-z0-9._-]+", "_", ident).strip("._") or "image"
    return f"{ident[:80]}_{method}_{time.strftime('%Y%m%d-%H%M%S')}_{uuid.uuid4().hex[:6]}"


def demo_json(record: dict, model: str, method: str, name: str | None) -> dict:
    """The JSON written for ``record``: ``json_record`` with the model, the method, the upload's name as path
    and, for a label map, the pixels of every class."""
    from grounding.predictor import json_record

    payload = {"model": model, "method": method, **json_record(record)}
    if "path" in payload:
        payload["path"] = name
    labels = record.get("label_map")
    if isinstance(labels, torch.Tensor) and "classes" in record:
        payload["class_pixels"] = {cls: int((labels == index).sum()) for index, cls in enumerate(record["classes"])}
    return payload


def run_model(cache: ModelCache, out: Path, image_path: str | None, model: str, prompt: str, prompt_kind: str,
              boxes: str, box_threshold: float, text_threshold: float, top_k: float | None) -> tuple[str, str, dict]:
    """One request: (the drawing's path, the JSON's path, the JSON) under ``out``."""
    import gradio as gr

    if model not in cache.sources:
        raise gr.Error(f"Unknown model {_escape(str(model))}.")
    prompt = " ".join((prompt or "").split())
    if not prompt:
        raise gr.Error("Type the class names (comma-separated) or, for the detector, a sentence.")
    file, name = checked_image(image_path) if image_path else (None, None)
    with cache.locks[model]:
        try:
            predictor = cache.get(model)
        except Exception as error:  # noqa: BLE001 - any failure to load is shown on the page
            raise gr.Error(f"Cannot load {_escape(model)}: {_escape(str(error))}") from None
        method = predictor.method
        if method == "mimic":
            file = name = None  # MIMIC synthesizes its image
        elif file is None:
            raise gr.Error("Upload an image first.")
        arguments: dict[str, Any] = {"text": prompt} if prompt_kind == "sentence" else {"classes": prompt}
        if method == "detector":
            arguments.update(box_threshold=float(box_threshold), text_threshold=float(text_threshold),
                             top_k=int(top_k) if top_k else None)
        elif method == "maskinversion":
            try:
                arguments["boxes"] = parse_boxes(boxes)
            except ValueError as error:
                raise gr.Error(_escape(str(error))) from None
            if arguments["boxes"] is None:
                raise gr.Error("MaskInversion describes regions: give boxes as x0,y0,x1,y1; x0,y0,x1,y1.")
        elif method == "mimic" and "classes" in arguments and len(arguments["classes"].split(",")) != 1:
            raise gr.Error("MIMIC synthesizes one target text at a time here: give one.")
        try:
            records = predictor(None if file is None else str(file), **arguments)
            picture = predictor.draw(records[0], None if file is None else str(file))
        except (ValueError, TypeError) as error:
            message = str(error) if file is None else str(error).replace(str(file), name)
            raise gr.Error(_escape(" ".join(message.split()))) from None
    record = records[0]
    payload = demo_json(record, model, method, name)
    stem = output_stem(record, method)
    drawing, record_file = out / f"{stem}.png", out / f"{stem}.json"
    write_atomic(drawing, lambda temporary: picture.save(temporary, format="PNG"))
    write_atomic(record_file, lambda temporary: Path(temporary).write_text(json.dumps(payload, indent=2), encoding="utf-8"))
    return str(drawing), str(record_file), payload


# ------------------------------------------------------------------------------------------------- the app
def build_app(models: Sequence[Any] | Mapping[str, Any] = DEFAULT_MODELS, out: str | Path = DEFAULT_OUT,
              seed: int = 0, device: str | None = None):
    """The page (a ``gr.Blocks``) over ``models``: sources ``Predictor.load`` takes, ``Predictor`` objects, or
    a mapping of names to either. Creates ``out`` and points Gradio's upload folder there (the environment
    variable ``GRADIO_TEMP_DIR``, read by Gradio as it runs); start it with ``launch``."""
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ["GRADIO_TEMP_DIR"] = str(out / CACHE_FOLDER)
    import gradio as gr

    cache = ModelCache(name_models(models), seed=seed, device=device)

    def predict(image, model, prompt, prompt_kind, boxes, box_threshold, text_threshold, top_k):
        return run_model(cache, out, image, model, prompt, prompt_kind, boxes, box_threshold, text_threshold, top_k)

    with gr.Blocks(title="grounding demo", analytics_enabled=False) as app:
        gr.Markdown("## grounding: detect or segment what you name\nUpload an image, name the classes, choose a model. "
                    f"Results are written to `{out}`.")
        with gr.Row():
            with gr.Column():
                image = gr.File(label="Image", type="filepath", file_count="single", elem_id="image")
                model = gr.Dropdown(cache.names, value=cache.names[0], label="Model", elem_id="model")
                prompt = gr.Textbox(label="Classes (comma-separated), or a sentence for the detector",
                                    placeholder="red circle, blue square", elem_id="prompt")
                prompt_kind = gr.Radio(list(PROMPT_KINDS), value="classes", label="The prompt is",
                                       elem_id="prompt_kind")
                with gr.Accordion("Detector", open=True):
                    box_threshold = gr.Slider(0, 1, value=0.35, step=0.01, label="Box threshold", elem_id="box_threshold")
                    text_threshold = gr.Slider(0, 1, value=0.25, step=0.01, label="Text threshold", elem_id="text_threshold")
                    top_k = gr.Number(value=0, precision=0, minimum=0, label="Keep the top k boxes (0: all)", elem_id="top_k")
                with gr.Accordion("MaskInversion", open=False):
                    boxes = gr.Textbox(label="Regions: boxes x0,y0,x1,y1 separated by ;", elem_id="boxes")
                submit = gr.Button("Run", variant="primary", elem_id="submit")
            with gr.Column():
                drawing = gr.Image(label="Result", type="filepath", format="png", interactive=False, elem_id="drawing")
                record_file = gr.File(label="Record (JSON)", interactive=False, elem_id="record_file")
                record = gr.JSON(label="Record", elem_id="record")
        submit.click(predict, [image, model, prompt, prompt_kind, boxes, box_threshold, text_threshold, top_k],
                     [drawing, record_file, record], api_name="predict")
    app.demo_out = out
    app.demo_models = cache
    return app


def served_paths(out: Path, models: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(allowed, blocked) paths of Gradio's file route: ``out`` only; blocked are Gradio's default examples
    cache (a folder of the working directory) and the local model files, unless they hold ``out``."""
    from gradio.utils import get_cache_folder

    blocked = [Path(get_cache_folder()).resolve()]
    for source in models.values():
        if isinstance(source, (str, Path)) and Path(source).expanduser().exists():
            blocked.append(Path(source).expanduser().resolve())
    blocked = [path for path in blocked if path != out and path not in out.parents]
    return [str(out)], [str(path) for path in dict.fromkeys(blocked)]


def launch(app, host: str = "127.0.0.1", port: int | None = None, share: bool = False, block: bool = True,
           quiet: bool = False):
    """Serve ``app`` (from ``build_app``) on ``host:port``; ``block=False`` returns once it is up
    (``app.close()`` stops it)."""
    allowed, blocked = served_paths(app.demo_out, app.demo_models.sources)
    settings = {"server_name": host, "server_port": port, "share": share, "prevent_thread_lock": not block,
                "allowed_paths": allowed, "blocked_paths": blocked, "max_file_size": MAX_FILE_SIZE, "show_error": True,
                "quiet": quiet, "inbrowser": False, "ssr_mode": False, "enable_monitoring": False, "run_history": False}
    accepted = inspect.signature(app.launch).parameters  # run_history is newer than Gradio 5
    return app.launch(**{key: value for key, value in settings.items() if key in accepted})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="A local web page that runs the detector, GEM, InvSeg, "
                                     "MaskInversion or MIMIC on an uploaded image.")
    parser.add_argument("--model", action="append", metavar="SOURCE",
                        help="a checkpoint, run folder, config (e.g. gem/synthetic.yaml) or detector hub id; repeatable "
                             f"(default: {' and '.join(DEFAULT_MODELS)}, offline)")
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=None, help="the port (default: the first free from 7860)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"the folder of the drawings and records (default {DEFAULT_OUT}/)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    parser.add_argument("--seed", type=int, default=0, help="the seed under which each model is built (random weights)")
    parser.add_argument("--device", default=None, help="the device of the models (e.g. cuda); default: as loaded")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Console script ``grounding-demo``."""
    args = build_parser().parse_args(argv)
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise SystemExit(f"{PROG}: error: Gradio is not installed; pip install -e \".[demo]\" (or pip install 'gradio>=5')") from None
    app = build_app(args.model or list(DEFAULT_MODELS), out=args.out, seed=args.seed, device=args.device)
    launch(app, host=args.host, port=args.port, share=args.share, block=False, quiet=True)
    print(f"{PROG}: serving {app.local_url}" + (f" and {app.share_url}" if getattr(app, "share_url", None) else "")
          + f"; outputs in {app.demo_out}; Ctrl+C stops it", flush=True)
    app.block_thread()


if __name__ == "__main__":
    main()
