"""grounding-predict throughput against the plain per-image loops it wraps, on the same images and weights.

    python bench/bench_predict.py --quick   # 32 synthetic 96 px images, 1 round (CPU, < 1 minute)
    python bench/bench_predict.py           # 128 images, 3 rounds, also --batch_size 4
    python bench/bench_predict.py --scale base   # the published models' sizes (random weights), 8 images of 320 px

Two methods, each in this process, on one folder of synthetic images (``grounding.data.synthetic``):

- detector: the tiny random Grounding DINO of ``configs/image/synthetic.yaml``, built once and saved as a
  transformers folder (``GroundingDetector.save_pretrained``, the resize of the config's data); grounding-predict
  loads that folder (``--model.model FOLDER``). Anchor: transformers' own loop on the same folder, one image at a
  time: PIL read, ``AutoProcessor``, ``AutoModelForZeroShotObjectDetection``,
  ``processor.post_process_grounded_object_detection``. Both get the same prompt, threshold and top-k; their
  boxes and scores are compared (largest absolute difference, in pixels / probability).
- GEM: ``configs/gem/synthetic.yaml``'s settings (depth, short side, background rule), two anchors:
  ``reference``: the public GEM code's own loop (gem_torch's ``GEMWrapper`` on open_clip, its PIL transform, the
  class text embedded on every call as its README runs it; ``gem_reference_anchor``), on the same weights: a
  random open_clip CLIP of the synthetic config's tiny sizes (ViT-B/16 at ``--scale base``) saved to a file,
  which grounding-predict loads as ``--model.backbone open_clip:NAME/FILE``. Needs gem_torch and open_clip (both
  in the ``dev`` extra); without them, or with ``--no_gem_reference``, only the
  second anchor runs, on the config's own CLIP. ``gem_reference_pixels_agree``: the share of label-map pixels
  on which the reference and grounding-predict agree (the reference resizes with PIL and upsamples its maps
  twice, so a few pixels on class borders differ). ``function``: the README's "Without Lightning" loop with
  the same settings (``read_image``, ``DenseSimilarity``, the arg-max with the config's background rule
  ``labels_with_background``, the class text embedded once): the very function grounding-predict calls, so
  the least a call can cost; its label maps are compared with the PNGs grounding-predict wrote.

``--vocabulary coco`` gives the detector (both sides) the COCO class names instead of the three synthetic ones,
as many of them, in the benchmark's order, as fit the model's ``max_text_len`` tokens (all 80 fit Grounding
DINO's 256 BERT tokens; the offline tokenizer of the random models spends more tokens a name): a long prompt, as
a user's class list is. grounding-predict runs the text encoder once per prompt for the whole call
(``grounding.models.grounding_dino.cached_text_features``), transformers' loop once per image, so the longer the
prompt, the larger the share of the loop's time grounding-predict saves. GEM always gets the synthetic classes.

``--scale base`` replaces the tiny models by random models of the published sizes, so that the model's cost
weighs as it does for a user: the detector with ``GroundingDinoConfig()``'s architecture (Swin-T, BERT-base sized
text encoder; ``SWIN_T`` of bench_masking_overhead.py) resized to 320 px (``--predict.image_size``, the exported
processor alike), GEM on a ViT-B/16 CLIP (open_clip's ``ViT-B-16``, or ``build_clip("vit-b16-random")`` without the
reference) with GEM's own settings (depth 7, short side 448). Its defaults: 8 images of 320 px, 1 round, no ``--no_pictures`` or
batch-4 calls (each call costs the model's minutes).

grounding-predict runs in-process through ``grounding.cli.predict([...])``, each call into a fresh ``--out``
folder (nothing skipped), so a timed call includes what a user's second call pays: building the model and the
Trainer, reading, predicting and writing every output (drawn boxes or label maps, heatmaps, records,
predictions.json), but not the imports. The first call of each method, on one image (imports and lazy
initialization included), is timed apart (``*_first_call_s``), as is a call on one image (``*_one_image_call_s``: the fixed
cost of a call). The two sides take turns every round; images/s = images / median time of a round.
``*_no_pictures_*``: the same call with ``--no_pictures`` (records and label maps only, as for a large folder).
``*_steady_*``: (images - 1) / (a call's median time - the one-image call's time), the rate of a call once its
fixed cost (the model and the Trainer built, the outputs gathered) is paid, as on a large folder.
grounding-predict's picture writers (``--writer_threads``, its default) run beside torch's thread; the anchors
write nothing.
``detector_paired_*`` (``--paired_passes``, default 1): the detector's per-image step of grounding-predict
(``GroundingDetector.__call__``, what its ``predict_step`` runs) and transformers' loop timed image by image in
alternation on one shared model instance (``paired_detector_steps``): the median and quartiles of the ratio, a
figure that a shared machine's minutes-long swings do not move. ``detector_draw_ms_per_image``: ``grounding.visualize.draw_boxes`` alone on the written records, the part of
the detector's writing that grows with the number of boxes. On a CPU shared with other work, torch's
threads wait for each other whenever one core is taken (a 2-thread matrix product ran up to 9x slower than
alone on the 2-core sandbox while other jobs ran, and ``--quick`` took 4-5 minutes instead of half of one), so
both sides run on one thread by default (``--threads 0``: torch's own choice); ``loadavg_1min_start_end``
records the load. Prints the detector's figures as a JSON line before GEM runs, and ends with the
JSON line of all of them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from grounding.data.synthetic import SyntheticConfig, generate  # noqa: E402

DETECTOR_CONFIG = REPO / "configs" / "image" / "synthetic.yaml"
GEM_CONFIG = REPO / "configs" / "gem" / "synthetic.yaml"
DETECTOR_CLASSES = ["red circle", "blue square", "green triangle"]
#: --scale base: the detector's resize (shorter side, longer side's cap) and GEM's settings on the ViT-B/16
BASE_DETECTOR_SIZE = (320, 533)
BASE_GEM = {"backbone": "vit-b16-random", "depth": 7, "short_side": 448}
GEM_CLASSES = ["background", *DETECTOR_CLASSES]
#: the open_clip name the bench registers for the tiny CLIP of the GEM reference anchor
OPEN_CLIP_TINY = "bench-tiny-vit-16"


def coco_classes(tokenizer, max_text_len: int) -> list[str]:
    """The COCO class names (``class_names/coco_object.txt``, the first name of each line, background left
    out), as many as fit ``max_text_len`` tokens as one prompt."""
    from grounding.data.label_maps import read_class_synonyms
    from grounding.models.detector import class_prompt

    names = [synonyms[0] for synonyms in read_class_synonyms("coco_object")[1:]]
    count = len(names)
    while count > 1 and len(tokenizer(class_prompt(names[:count]))["input_ids"]) > max_text_len:
        count -= 1
    return names[:count]


def init_args(config: Path, section: str) -> dict:
    return dict(yaml.safe_load(config.read_text())[section]["init_args"])


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class PredictRunner:
    """``grounding.cli.predict`` of one config on the image folder, each call into a new output folder."""

    def __init__(self, work: Path, base: list[str], device: str, num_workers: int = 0) -> None:
        accelerator = ["--trainer.accelerator", "gpu", "--trainer.devices", "1"] if device.startswith("cuda") else \
            ["--trainer.accelerator", "cpu", "--trainer.devices", "1"]
        self.work, self.calls = work, 0
        self.base = [*base, *accelerator, "--num_workers", str(num_workers), "--trainer.logger", "false", "--progress.mode", "never",
                     "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(work / "root")]

    def __call__(self, inputs: list[str], batch_size: int, device: str, extra: tuple[str, ...] = ()) -> tuple[float, Path, dict]:
        from grounding.cli import predict

        self.calls += 1
        out = self.work / f"out{self.calls}"
        synchronize(device)
        start = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # its summary line; the bench's own JSON line ends stdout
            summary = predict([*self.base, "--inputs", *inputs, "--out", str(out), "--batch_size", str(batch_size), *extra])
        synchronize(device)
        seconds = time.perf_counter() - start
        if summary["predicted"] != summary["images"]:
            raise SystemExit(f"grounding-predict predicted {summary['predicted']} of {summary['images']} images")
        return seconds, out, summary


def detector_anchor(folder: Path, prompt: str, threshold: float, text_threshold: float,
                    top_k: int | None, device: str, model: torch.nn.Module | None = None):
    """transformers' own loop over ``files``, one image at a time (``model``: this instance instead of one
    loaded from ``folder``); returns a function that runs it."""
    from PIL import Image
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    if model is None:
        model = AutoModelForZeroShotObjectDetection.from_pretrained(folder).to(device).eval()

    def run(which: list[Path]) -> dict[str, dict]:
        results = {}
        for path in which:
            image = Image.open(path).convert("RGB")
            inputs = processor(images=image, text=prompt, return_tensors="pt").to(device)
            with torch.no_grad():
                outputs = model(**inputs)
            result = processor.post_process_grounded_object_detection(
                outputs, input_ids=inputs["input_ids"], threshold=threshold, text_threshold=text_threshold,
                target_sizes=[(image.height, image.width)])[0]
            order = torch.argsort(result["scores"], descending=True, stable=True)[:top_k]
            results[path.stem] = {"boxes": result["boxes"][order].cpu(), "scores": result["scores"][order].cpu()}
        return results

    return run


def gem_settings(overrides: dict | None = None) -> dict:
    """GEM's settings of the synthetic config, ``overrides`` replacing some."""
    return {**init_args(GEM_CONFIG, "model"), **(overrides or {})}


def gem_anchor(files: list[Path], device: str, settings: dict):
    """The README's GEM loop with ``settings``: ``DenseSimilarity``, the function grounding-predict calls; returns
    a function that runs it."""
    from torchvision.io import read_image

    from grounding.models.clip import build_clip
    from grounding.models.gem import DenseSimilarity, labels_with_background

    backbone = build_clip(settings["backbone"], image_size=448).to(device).eval()  # as GEMSegmentationModule builds it
    gem = DenseSimilarity(backbone, method=settings["method"], depth=settings["depth"], iterations=settings["iterations"],
                          short_side=settings["short_side"])
    background, foreground = gem_foreground()
    text = gem.text([GEM_CLASSES[c] for c in foreground]).to(device)

    def run(which: list[Path]) -> dict[str, np.ndarray]:
        labels = {}
        for path in which:
            image = read_image(str(path)).to(device)
            maps = gem(image, text)
            labels[path.stem] = labels_with_background(
                maps, foreground, background, settings["background_threshold"]).cpu().numpy()
        return labels

    return run


def gem_foreground() -> tuple[int, list[int]]:
    background = GEM_CLASSES.index("background")
    return background, [c for c in range(len(GEM_CLASSES)) if c != background]


def gem_torch_available() -> bool:
    try:
        import gem.gem_wrapper  # noqa: F401  (gem_torch)
        import open_clip  # noqa: F401
    except ImportError:
        return False
    return True


def open_clip_weights(work: Path, base_scale: bool) -> tuple[str, Path]:
    """A random open_clip CLIP (ViT-B/16, or at tiny scale one of ``TINY_CLIP_CONFIG``'s sizes, registered with
    open_clip under ``OPEN_CLIP_TINY``) saved as a checkpoint file; returns its open_clip name and the file."""
    import open_clip

    from grounding.models.clip import TINY_CLIP_CONFIG

    name = "ViT-B-16"
    if not base_scale:
        vision, text = TINY_CLIP_CONFIG["vision_config"], TINY_CLIP_CONFIG["text_config"]
        config = {"embed_dim": TINY_CLIP_CONFIG["projection_dim"],
                  "vision_cfg": {"image_size": vision["image_size"], "layers": vision["num_hidden_layers"],
                                 "width": vision["hidden_size"], "patch_size": vision["patch_size"],
                                 "head_width": vision["hidden_size"] // vision["num_attention_heads"],
                                 "mlp_ratio": vision["intermediate_size"] / vision["hidden_size"]},
                  "text_cfg": {"context_length": text["max_position_embeddings"], "vocab_size": 49408,
                               "width": text["hidden_size"], "heads": text["num_attention_heads"],
                               "layers": text["num_hidden_layers"]}}
        folder = work / "open_clip_configs"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{OPEN_CLIP_TINY}.json").write_text(json.dumps(config))
        open_clip.add_model_config(folder)
        name = OPEN_CLIP_TINY
    torch.manual_seed(0)
    model = open_clip.create_model(name)
    weights = work / f"{name}.pt"
    torch.save(model.state_dict(), weights)
    return name, weights


def gem_reference_anchor(files: list[Path], device: str, settings: dict, name: str, weights: Path):
    """The public GEM code's own loop (gem_torch's ``GEMWrapper`` on open_clip, its image transform), one image
    at a time, on the same weights and settings; returns a function that runs it.

    gem_torch 1.0.1 was written for open_clip's sequence-first blocks: its wrapper hands every block (L, N, D)
    tokens, and its own GEM blocks read them so. Current open_clip (>= 2.24) builds batch-first blocks, which
    would take those tokens as L images of N tokens; the anchor therefore sets the unmodified blocks' attention
    to sequence-first (``nn.MultiheadAttention.batch_first = False``), which is what the reference computed on the
    open_clip it was written for. (Its ``create_gem_model`` calls ``open_clip.create_model`` positionally with the
    old signature, so the anchor builds the open_clip model itself and wraps it.) Per image: PIL read, the
    reference's transform (bicubic resize to a square of ``short_side``, tensor, CLIP normalization), the
    wrapper's forward (it embeds the class text on every call, as its README runs it), raw cosines
    (``normalize=False``), bilinear resize to the image's size and the config's background rule
    (``labels_with_background``, as on the other sides). The bench's images are square, so the reference's
    square resize is the short-side resize of grounding-predict."""
    import open_clip
    import torch.nn.functional as F
    from gem.gem import get_gem_img_transform
    from gem.gem_wrapper import GEMWrapper
    from PIL import Image

    from grounding.models.gem import labels_with_background

    model = open_clip.create_model(name, pretrained=str(weights))
    wrapper = GEMWrapper(model, open_clip.get_tokenizer(name), depth=settings["depth"],
                         ss_attn_iter=settings["iterations"]).to(device).eval()
    for block in model.visual.transformer.resblocks:
        if isinstance(getattr(block, "attn", None), torch.nn.MultiheadAttention):
            block.attn.batch_first = False
    transform = get_gem_img_transform(img_size=(settings["short_side"], settings["short_side"]))
    background, foreground = gem_foreground()
    names = [GEM_CLASSES[c] for c in foreground]

    def run(which: list[Path]) -> dict[str, np.ndarray]:
        labels = {}
        for path in which:
            image = Image.open(path).convert("RGB")
            pixels = transform(image)[None].to(device)
            with torch.no_grad():
                maps = wrapper(pixels, names, normalize=False)
            maps = F.interpolate(maps, size=(image.height, image.width), mode="bilinear", align_corners=False)[0]
            labels[path.stem] = labels_with_background(
                maps, foreground, background, settings["background_threshold"]).cpu().numpy()
        return labels

    return run


def paired_detector_steps(folder: Path, classes: list[str], files: list[Path], args, device: str) -> dict:
    """The per-image step of grounding-predict's detector (``GroundingDetector.__call__``, which its
    ``predict_step`` runs) against transformers' loop, image by image in alternation on one shared model
    instance (the order flipped every pair), ``args.paired_passes`` passes over ``files`` after one warm-up
    pair: the median and quartiles of the per-image ratio anchor time / step time. Pairing cancels what a
    shared machine does to both within seconds, which whole calls minutes apart do not."""
    from grounding.models.detector import GroundingDetector, class_prompt

    detector = GroundingDetector.from_pretrained(folder, device=device)
    anchor = detector_anchor(folder, class_prompt(classes), args.box_threshold, args.text_threshold, args.top_k,
                             device, model=detector.model)

    def step(path: Path) -> None:
        detector(str(path), classes=classes, box_threshold=args.box_threshold, top_k=args.top_k)

    def timed(function, path: Path) -> float:
        synchronize(device)
        start = time.perf_counter()
        function(path)
        synchronize(device)
        return time.perf_counter() - start

    timed(step, files[0]), timed(lambda path: anchor([path]), files[0])  # warm-up pair
    ratios = []
    for index, path in enumerate([path for _ in range(args.paired_passes) for path in files]):
        if index % 2:
            step_s, anchor_s = timed(step, path), timed(lambda path: anchor([path]), path)
        else:
            anchor_s, step_s = timed(lambda path: anchor([path]), path), timed(step, path)
        ratios.append(anchor_s / step_s)
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return {"detector_paired_pairs": len(ratios),
            "detector_paired_step_over_anchor": round(statistics.median(ratios), 3),
            "detector_paired_quartiles": [round(quartiles[0], 3), round(quartiles[2], 3)]}


def compare_detections(out: Path, anchor: dict[str, dict]) -> dict:
    records = json.loads((out / "predictions.json").read_text())
    box_diff = score_diff = 0.0
    counts_equal, boxes = True, 0
    for record in records:
        expected = anchor[record["image_id"]]
        got_boxes = torch.tensor(record["boxes"], dtype=torch.float32).reshape(-1, 4)
        got_scores = torch.tensor(record["scores"], dtype=torch.float32)
        boxes += len(got_scores)
        if got_boxes.shape != expected["boxes"].shape:
            counts_equal = False
            continue
        if len(got_scores):
            box_diff = max(box_diff, float((got_boxes - expected["boxes"]).abs().max()))
            score_diff = max(score_diff, float((got_scores - expected["scores"]).abs().max()))
    return {"detector_boxes_max_abs_diff": box_diff, "detector_scores_max_abs_diff": score_diff,
            "detector_box_counts_equal": counts_equal and len(records) == len(anchor),
            "detector_boxes_per_image": round(boxes / max(len(records), 1), 2)}


def draw_ms_per_image(out: Path) -> float:
    from grounding.data.images import image_tensor, read_rgb_image
    from grounding.visualize import PRED_COLOR, draw_boxes

    records = json.loads((out / "predictions.json").read_text())
    images = [image_tensor(read_rgb_image(record["path"])) for record in records]
    start = time.perf_counter()
    for image, record in zip(images, records):
        labels = [f"{label} {score:.2f}" for label, score in zip(record["labels"], record["scores"])]
        draw_boxes(image, torch.tensor(record["boxes"]).reshape(-1, 4), labels, PRED_COLOR)
    return 1000 * (time.perf_counter() - start) / max(len(records), 1)


def measure(name: str, runner: PredictRunner, anchors: dict, files: list[Path], folder: Path, args,
            device: str) -> tuple[dict, Path, dict]:
    """First call, rounds of predict and each anchor (``anchors``: figure name -> loop) in turn, batch
    ``also_batch``, a one-image call. Returns the figures, the last call's output folder and each anchor's
    results."""
    inputs = [str(folder)]
    first, _, _ = runner([str(files[0])], args.batch_size, device)  # imports and lazy initialization: one image
    for anchor in anchors.values():
        anchor(files[:2])  # the anchor's own lazy initialization, untimed
    predict_times, batched_times, bare_times = [], [], []
    anchor_times: dict[str, list[float]] = {key: [] for key in anchors}
    last_out, anchor_results = None, {}
    for _ in range(args.rounds):
        seconds, last_out, _ = runner(inputs, args.batch_size, device)
        predict_times.append(seconds)
        for key, anchor in anchors.items():
            synchronize(device)
            start = time.perf_counter()
            anchor_results[key] = anchor(files)
            synchronize(device)
            anchor_times[key].append(time.perf_counter() - start)
        if args.also_batch and args.also_batch != args.batch_size:
            batched_times.append(runner(inputs, args.also_batch, device)[0])
        if args.no_pictures_calls:
            bare_times.append(runner(inputs, args.batch_size, device, ("--no_pictures",))[0])
    one, _, _ = runner([str(files[0])], args.batch_size, device)
    n = len(files)
    predict_rate = n / statistics.median(predict_times)
    figures = {
        f"{name}_first_call_s": round(first, 2),
        f"{name}_one_image_call_s": round(one, 2),
        f"{name}_predict_images_per_s": round(predict_rate, 2),
    }
    rates = {key: n / statistics.median(times) for key, times in anchor_times.items()}
    for key, rate in rates.items():
        figures[f"{name}_{key}_images_per_s"] = round(rate, 2)
        figures[f"{name}_predict_over_{key}"] = round(predict_rate / rate, 3)
    if bare_times:
        bare_rate = n / statistics.median(bare_times)
        figures[f"{name}_no_pictures_images_per_s"] = round(bare_rate, 2)
        for key, rate in rates.items():
            figures[f"{name}_no_pictures_over_{key}"] = round(bare_rate / rate, 3)
    if n > 1 and statistics.median(predict_times) > one:  # the per-image rate once a call's fixed cost is paid
        steady = (n - 1) / (statistics.median(predict_times) - one)
        figures[f"{name}_steady_images_per_s"] = round(steady, 2)
        for key, rate in rates.items():
            figures[f"{name}_steady_over_{key}"] = round(steady / rate, 3)
    if batched_times:
        figures[f"{name}_predict_batch{args.also_batch}_images_per_s"] = round(n / statistics.median(batched_times), 2)
    return figures, last_out, anchor_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 images, 1 round")
    parser.add_argument("--scale", choices=["tiny", "base"], default="tiny",
                        help="tiny: the synthetic configs' models; base: random models of the published sizes")
    parser.add_argument("--images", type=int, default=None, help="synthetic images (default 128; quick 32; base 8)")
    parser.add_argument("--size", type=int, default=None, help="side of the synthetic images in pixels (default 96; base 320)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 3; quick and base 1)")
    parser.add_argument("--batch_size", type=int, default=1, help="grounding-predict's --batch_size (default 1)")
    parser.add_argument("--num_workers", type=int, default=0, help="grounding-predict's --num_workers (default 0)")
    parser.add_argument("--also_batch", type=int, default=None,
                        help="also time grounding-predict at this --batch_size (default 4; base 0: no)")
    parser.add_argument("--box_threshold", type=float, default=0.35, help="detector threshold, both sides (default 0.35)")
    parser.add_argument("--text_threshold", type=float, default=0.25)
    parser.add_argument("--top_k", type=int, default=20, help="detector: at most this many boxes per image, both sides "
                        "(default 20: the random models score nearly every query above the threshold, a trained one keeps "
                        "tens of boxes; 0: every box)")
    parser.add_argument("--vocabulary", choices=["synthetic", "coco"], default="synthetic",
                        help="the detector's classes: the three synthetic shapes, or the COCO names that fit its prompt")
    parser.add_argument("--methods", nargs="+", choices=["detector", "gem"], default=["detector", "gem"])
    parser.add_argument("--paired_passes", type=int, default=1, help="detector: passes over the images timing "
                        "grounding-predict's per-image step and transformers' loop in alternation on one model (0: none)")
    parser.add_argument("--no_gem_reference", dest="gem_reference", action="store_false",
                        help="GEM: leave out the public GEM code's loop (gem_torch), and run the synthetic config's CLIP")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=1, help="torch's CPU threads (default 1; 0: torch's own choice)")
    parser.add_argument("--out", default=None, help="also write the JSON figures to this file")
    args = parser.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.top_k = args.top_k or None
    if args.threads and device == "cpu":
        torch.set_num_threads(args.threads)
    base_scale = args.scale == "base"
    images = args.images or (8 if base_scale else 32 if args.quick else 128)
    args.size = args.size or (320 if base_scale else 96)
    args.rounds = args.rounds or (1 if args.quick or base_scale else 3)
    args.also_batch = (0 if base_scale else 4) if args.also_batch is None else args.also_batch
    args.no_pictures_calls = not base_scale
    load_start = os.getloadavg()[0]

    figures: dict = {"device": f"{device} x{torch.get_num_threads()}" if device == "cpu" else torch.cuda.get_device_name(),
                     "scale": args.scale, "images": images, "top_k": args.top_k, "image_px": args.size, "rounds": args.rounds, "batch_size": args.batch_size,
                     "num_workers": args.num_workers, "vocabulary": args.vocabulary}
    with tempfile.TemporaryDirectory(prefix="bench_predict_") as tmp:
        work = Path(tmp)
        root = generate(work / "data", SyntheticConfig(image_size=args.size, num_train=0, num_val=images, num_test=0, seed=7))
        folder = root / "images" / "val"
        files = sorted(folder.glob("*.jpg"))

        if "detector" in args.methods:
            from grounding.models.detector import GroundingDetector, build_processor, class_prompt
            from grounding.models.grounding_dino import build_grounding_dino

            data = init_args(DETECTOR_CONFIG, "data")
            torch.manual_seed(0)
            if base_scale:
                from bench_masking_overhead import SWIN_T

                model, tokenizer = build_grounding_dino("tiny", SWIN_T)
                data = {"image_size": BASE_DETECTOR_SIZE[0], "max_size": BASE_DETECTOR_SIZE[1]}
            else:
                model, tokenizer = build_grounding_dino(init_args(DETECTOR_CONFIG, "model")["model"])
            classes = DETECTOR_CLASSES if args.vocabulary == "synthetic" else coco_classes(tokenizer, model.config.max_text_len)
            figures["detector_classes"] = len(classes)
            figures["detector_prompt_tokens"] = len(tokenizer(class_prompt(classes))["input_ids"])
            processor = build_processor(tokenizer, data["image_size"], data["max_size"])
            exported = GroundingDetector(model, processor).save_pretrained(work / "detector")
            del model
            base = ["--config", str(DETECTOR_CONFIG), "--model.model", str(exported), "--classes", ", ".join(classes),
                    "--box_threshold", str(args.box_threshold), "--text_threshold", str(args.text_threshold),
                    *(["--top_k", str(args.top_k)] if args.top_k else []),
                    "--predict.image_size", str(data["image_size"]), "--predict.max_size", str(data["max_size"])]
            runner = PredictRunner(work / "detector_runs", base, device, args.num_workers)
            anchor = detector_anchor(exported, class_prompt(classes), args.box_threshold, args.text_threshold,
                                     args.top_k, device)
            measured, out, anchor_results = measure("detector", runner, {"anchor": anchor}, files, folder, args, device)
            figures.update(measured)
            figures.update(compare_detections(out, anchor_results["anchor"]))
            figures["detector_draw_ms_per_image"] = round(draw_ms_per_image(out), 2)
            if args.paired_passes:
                figures.update(paired_detector_steps(exported, classes, files, args, device))
            if "gem" in args.methods:  # the detector's figures so far, should the run be stopped during GEM's
                print(json.dumps(figures), flush=True)

        if "gem" in args.methods:
            from PIL import Image

            settings = gem_settings(BASE_GEM if base_scale else {})
            anchors, reference = {}, None
            if args.gem_reference and gem_torch_available():
                reference = open_clip_weights(work, base_scale)
                settings["backbone"] = f"open_clip:{reference[0]}/{reference[1]}"
                anchors["reference"] = gem_reference_anchor(files, device, settings, *reference)
            figures["gem_backbone"] = settings["backbone"].replace(str(work), "WORK")
            figures["gem_reference"] = "gem_torch GEMWrapper" if reference else \
                ("off" if not args.gem_reference else "gem_torch or open_clip not installed: pip install gem_torch open_clip_torch")
            anchors["function"] = gem_anchor(files, device, settings)
            options = [f"--model.{key}={settings[key]}" for key in ("backbone", "depth", "short_side")]
            runner = PredictRunner(work / "gem_runs", ["--config", str(GEM_CONFIG), "--classes", ", ".join(GEM_CLASSES),
                                                       *options], device, args.num_workers)
            measured, out, anchor_results = measure("gem", runner, anchors, files, folder, args, device)
            figures.update(measured)
            predicted = {image_id: np.array(Image.open(out / "labels" / f"{image_id}.png")) for image_id in anchor_results["function"]}
            equal = sum(np.array_equal(predicted[image_id], labels) for image_id, labels in anchor_results["function"].items())
            figures["gem_label_maps_equal"] = f"{equal}/{len(predicted)}"
            if reference:
                agree = [float((predicted[image_id] == labels).mean()) for image_id, labels in anchor_results["reference"].items()]
                figures["gem_reference_pixels_agree"] = round(statistics.mean(agree), 4)
    figures["loadavg_1min_start_end"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]
    line = json.dumps(figures)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(line + "\n")
    print(line, flush=True)


if __name__ == "__main__":
    main()
