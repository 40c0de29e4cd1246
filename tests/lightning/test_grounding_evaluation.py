"""Phrase grounding (Flickr30k Entities) through the module, converters seen through the DataModule, and REC /
phrase / box-AP evaluation on two processes equal to one."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torchvision.ops import box_convert

from grounding.data import synthetic as syn
from grounding.data.coco import CocoDetection, detection_transforms
from grounding.data.grounding_data import GroundingDataModule, collate_phrases, span_tokens
from grounding.data.odvg import read_odvg
from grounding.data.odvg_convert import coco_to_odvg, flickr30k_to_odvg
from grounding.data.synthetic.odvg import write_synthetic_odvg
from grounding.lightning.callbacks import LastCheckpoint
from grounding.lightning.grounding_module import GroundingModule
from grounding.metrics.phrase_grounding import PhraseGroundingRecall, phrase_grounding_recall
from grounding.metrics.rec import rec_accuracy
from grounding.models.adaptive_masking import MaskingConfig
from grounding.models.denoising import DenoisingConfig
from grounding.models.tokenizer import build_wordpiece_tokenizer

from ..conftest import TEST_MODEL_CONFIG, run_in_process

REPO = Path(__file__).resolve().parents[2]
L_TEXT = TEST_MODEL_CONFIG["max_text_len"]


def make_module(**kwargs):
    torch.manual_seed(0)
    settings = dict(model="tiny", model_config=TEST_MODEL_CONFIG, masking=MaskingConfig(variant="none"), log_images=False)
    settings.update(kwargs)
    return GroundingModule(**settings)


def flickr_from_synthetic(synthetic_root, folder: Path, images: int = 3) -> tuple[Path, dict]:
    """A Flickr30k Entities folder (Sentences/, Annotations/) over the first synthetic val images: per image one
    sentence naming up to two of its categories, each phrase a chain with every box of that category (a phrase
    of several boxes), boxes written 1-based inclusive as the dataset does. Returns the folder and, per image
    file name, phrase -> the boxes (x0, y0, x1, y1) the converter must give."""
    coco = json.loads(syn.instances_path(synthetic_root, "val").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    (folder / "Sentences").mkdir(parents=True)
    (folder / "Annotations").mkdir()
    expected = {}
    for image in coco["images"][:images]:
        stem = Path(image["file_name"]).stem
        by_category: dict[int, list] = {}
        for a in coco["annotations"]:
            if a["image_id"] == image["id"]:
                by_category.setdefault(a["category_id"], []).append(a["bbox"])
        chosen = sorted(by_category)[:2]
        words, objects, phrases = [], [], {}
        for number, category in enumerate(chosen):
            chain = 100 * image["id"] + number + 1
            words.append(f"[/EN#{chain}/other the {names[category]}]")
            phrases[f"the {names[category]}"] = []
            for x, y, w, h in by_category[category]:
                box = [round(x), round(y), round(x + w), round(y + h)]
                objects.append(f"<object><name>{chain}</name><bndbox><xmin>{box[0] + 1}</xmin><ymin>{box[1] + 1}</ymin>"
                               f"<xmax>{box[2]}</xmax><ymax>{box[3]}</ymax></bndbox></object>")
                phrases[f"the {names[category]}"].append([float(v) for v in box])
        (folder / "Sentences" / f"{stem}.txt").write_text(" next to ".join(words) + " .\n")
        (folder / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><size><width>{image['width']}</width><height>{image['height']}</height><depth>3</depth></size>"
            + "".join(objects) + "</annotation>")
        expected[image["file_name"]] = phrases
    return folder, expected


@pytest.fixture(scope="module")
def flickr_file(synthetic_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("flickr")
    root, expected = flickr_from_synthetic(synthetic_root, folder / "flickr30k_entities")
    summary = flickr30k_to_odvg(root, folder / "flickr_val.jsonl", image_suffix=".jpg")
    assert summary["records"] == len(expected)
    return folder / "flickr_val.jsonl", expected


def phrase_data(synthetic_root, flickr_file, **kwargs):
    settings = dict(val=[{"anno": str(flickr_file), "image_root": str(syn.images_dir(synthetic_root, "val")),
                          "name": "flickr", "protocol": "phrase"}],
                    image_size=96, max_size=128, batch_size=2, num_workers=0)
    settings.update(kwargs)
    return GroundingDataModule(**settings)


# ------------------------------------------------------------------------------------------- phrase grounding
def test_phrase_samples_are_the_converted_flickr30k_phrases(synthetic_root, flickr_file):
    """Every caption once, each phrase's tokens are those of its words in the caption, its boxes those of the
    Flickr30k annotation file (1-based inclusive pixels turned into x0, y0, x1, y1)."""
    path, expected = flickr_file
    data = phrase_data(synthetic_root, path)
    tokenizer = build_wordpiece_tokenizer()
    data.use_tokenizer(tokenizer, L_TEXT)
    dataset = data.phrase_set("val")
    assert len(dataset) == len(expected) and data.sources("val", "rec") == []
    for (_, target), filename in zip((dataset[i] for i in range(len(dataset))), expected):
        assert dict(zip(target["phrases"], (b.tolist() for b in target["gt_boxes"]))) == expected[filename]
        encoded = tokenizer(target["text"], return_offsets_mapping=True)
        for phrase, mask in zip(target["phrases"], target["phrase_masks"]):
            start = target["text"].index(phrase)
            words = tokenizer(phrase, add_special_tokens=False)["input_ids"]
            assert [encoded["input_ids"][i] for i in mask.nonzero().flatten().tolist()] == words
            assert mask.nonzero().flatten().tolist() == list(span_tokens(encoded["offset_mapping"], [[start, start + len(phrase)]]))
    phrase_ids = [i for s in dataset.sentences for i in (p.phrase_id for p in s.phrases)]
    assert phrase_ids == list(range(len(phrase_ids)))


def test_phrase_evaluation_of_hand_made_outputs_gives_what_the_metric_gives():
    """Two captions of 2 and 1 phrases; the model's outputs are made by hand. A phrase's boxes are ranked by the
    mean probability of its own tokens in its caption (computed here independently), and Recall@k ("any box"):
    phrase 0 hits its second ground-truth box with its best box, phrase 1 hits with its 3rd box, phrase 2 never."""
    module = make_module()
    torch.manual_seed(5)
    b, q = 2, 12
    logits = torch.randn(b, q, L_TEXT)
    pred_boxes = torch.cat([torch.rand(b, q, 2) * 0.6 + 0.2, torch.rand(b, q, 2) * 0.3 + 0.1], -1)
    masks = [torch.zeros(2, L_TEXT, dtype=torch.bool), torch.zeros(1, L_TEXT, dtype=torch.bool)]
    masks[0][0, 1:3] = masks[0][1, 4:7] = masks[1][0, 2] = True
    sizes = torch.tensor([[96, 80], [64, 96]])

    def hand_ranked(i, mask):
        scores = (logits[i].sigmoid() * mask).sum(-1) / mask.sum()
        order = torch.sort(scores, descending=True, stable=True).indices[:10]
        h, w = sizes[i].tolist()
        return box_convert(pred_boxes[i, order], "cxcywh", "xyxy") * torch.tensor([w, h, w, h]), scores[order]

    (b00, s00), (b01, s01), (b10, s10) = hand_ranked(0, masks[0][0]), hand_ranked(0, masks[0][1]), hand_ranked(1, masks[1][0])
    gts = [torch.stack([torch.tensor([0.0, 0.0, 1.0, 1.0]), b00[0]]), b01[2][None], torch.tensor([[0.0, 0.0, 2.0, 2.0]])]
    batch = {
        "pixel_values": torch.zeros(b, 3, 96, 96), "pixel_mask": torch.ones(b, 96, 96, dtype=torch.long),
        "input_ids": torch.ones(b, 8, dtype=torch.long), "attention_mask": torch.ones(b, 8, dtype=torch.long), "task": "phrase",
        "targets": [
            {"sentence_id": 0, "image_id": 7, "text": "x", "split": "a", "orig_size": sizes[0], "size": torch.tensor([96, 96]),
             "phrase_masks": masks[0], "phrase_ids": torch.tensor([0, 1]), "phrases": ["p", "q"], "gt_boxes": gts[:2]},
            {"sentence_id": 1, "image_id": 8, "text": "y", "split": "b", "orig_size": sizes[1], "size": torch.tensor([96, 96]),
             "phrase_masks": masks[1], "phrase_ids": torch.tensor([2]), "phrases": ["r"], "gt_boxes": gts[2:]},
        ],
    }
    module.detector.forward = lambda **kwargs: SimpleNamespace(logits=logits, pred_boxes=pred_boxes)
    module.phrase_metrics["val"] = PhraseGroundingRecall(phrase_types=["a", "b"])
    records = module._phrase_step(batch, 0, "val")
    got = {k: float(v) for k, v in module.phrase_metrics["val"].compute().items()}
    hand = [{"boxes": bx, "scores": sc, "gt_boxes": gt, "phrase_types": [t]}
            for bx, sc, gt, t in zip((b00, b01, b10), (s00, s01, s10), gts, "aab")]
    assert got == pytest.approx(phrase_grounding_recall(hand, phrase_types=["a", "b"]), nan_ok=True)
    assert got["R@1"] == pytest.approx(1 / 3) and got["R@5"] == pytest.approx(2 / 3) and got["b/R@10"] == 0.0
    assert [r["phrase_id"] for r in records] == [0, 1, 2] and [r["sentence_id"] for r in records] == [0, 0, 1]
    assert torch.allclose(torch.tensor(records[1]["boxes"]), b01, atol=0.01)


def test_validation_logs_phrase_recall_and_writes_the_phrases(synthetic_root, flickr_file, tmp_path):
    """REC and phrase grounding side by side in one validation: each logged, each written, each equal to its
    metric recomputed from the written records."""
    path, expected = flickr_file
    rec_file = write_synthetic_odvg(synthetic_root, "val").grounding
    data = phrase_data(synthetic_root, path)
    data.hparams.val = [{"anno": str(rec_file), "image_root": str(syn.images_dir(synthetic_root, "val")), "name": "refs"},
                        *data.hparams.val]
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=L.pytorch.loggers.CSVLogger(tmp_path, name="v"),
                        enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.validate(make_module(), datamodule=data, verbose=False)[0]
    (phrases_written,) = (tmp_path / "v").rglob("phrase_val_step*.json")
    (rec_written,) = (tmp_path / "v").rglob("rec_val_step*.json")
    records = json.loads(phrases_written.read_text())
    assert len(records) == metrics["val/phrase_count"] == sum(len(p) for p in expected.values())
    recomputed = phrase_grounding_recall(records)
    for k in (1, 5, 10):
        assert metrics[f"val/phrase_R@{k}"] == pytest.approx(recomputed[f"R@{k}"])
        assert metrics[f"val/flickr/phrase_R@{k}"] == pytest.approx(recomputed[f"R@{k}"])
    rec = json.loads(rec_written.read_text())
    assert metrics["val/rec_acc@1"] == pytest.approx(rec_accuracy(rec)["acc@1"]) and metrics["val/refs/rec_count"] == len(rec)


def test_phrase_sources_are_checked(synthetic_root, flickr_file):
    path, _ = flickr_file
    with pytest.raises(ValueError, match=r"data.val\[0\] \(.*flickr_val.jsonl\): protocol must be one of \('rec', 'phrase'\), got 'mdetr'"):
        phrase_data(synthetic_root, path, val=[{"anno": str(path), "image_root": str(synthetic_root), "protocol": "mdetr"}]).phrase_set("val")
    detection = coco_to_odvg(syn.instances_path(synthetic_root, "val"), path.parent / "det.jsonl")
    with pytest.raises(ValueError, match=r"data.val\[0\]: .*det.jsonl holds detection records"):
        phrase_data(synthetic_root, path, val=[{"anno": detection["out"], "image_root": str(synthetic_root),
                                                "protocol": "phrase"}]).phrase_set("val")


def test_batched_phrases_equal_phrases_alone(synthetic_root, flickr_file):
    """A caption's phrase boxes do not depend on the captions batched with it (padding)."""
    path, _ = flickr_file
    module = make_module().eval()
    data = phrase_data(synthetic_root, path)
    data.use_tokenizer(module.tokenizer, L_TEXT)
    dataset = data.phrase_set("val")
    together = module.locate_phrases(collate_phrases([dataset[0], dataset[1]]))
    for index in (0, 1):
        alone = module.locate_phrases(collate_phrases([dataset[index]]))[0]
        for (a_boxes, a_scores), (t_boxes, t_scores) in zip(alone, together[index]):
            assert torch.allclose(a_scores, t_scores, atol=1e-5) and torch.allclose(a_boxes, t_boxes, atol=1e-3)


# ------------------------------------------------------------------------------------------- converters
def test_coco_converted_to_odvg_trains_on_the_same_boxes_and_names_as_coco(synthetic_root, tmp_path):
    """COCO -> ODVG -> GroundingDataModule gives, for every training image, the pixels, the boxes and (through
    the label map's tokens of the prompt) the category names that CocoDetection gives on the COCO file itself."""
    instances = syn.instances_path(synthetic_root, "train")
    images = syn.images_dir(synthetic_root, "train")
    coco_to_odvg(instances, tmp_path / "train.jsonl", tmp_path / "labels.json")
    data = GroundingDataModule(train=[{"anno": str(tmp_path / "train.jsonl"), "image_root": str(images),
                                       "label_map": str(tmp_path / "labels.json")}],
                               image_size=96, max_size=128, flip_prob=0.0, crop_prob=0.0, num_workers=0, max_negatives=2)
    tokenizer = build_wordpiece_tokenizer()
    data.use_tokenizer(tokenizer, L_TEXT)
    training = data.dataset("train")
    coco = CocoDetection(instances, images, detection_transforms(True, 96, 128, None, 0.0, 0.0), train=True)
    names = {c: " ".join(n.lower().split()) for c, n in coco.categories.items()}
    direct = {}
    for i in range(len(coco)):
        pixels, target = coco[i]
        direct[target["image_id"]] = (pixels, sorted(zip(target["boxes"].tolist(), (names[c] for c in target["category_ids"].tolist()))))
    seen = {}
    for i in range(len(training)):
        pixels, target = training[(i, 0)]
        rows = [tokenizer.decode(target["input_ids"][target["label_map"][row].bool()[: len(target["input_ids"])]])
                for row in target["class_labels"].tolist()]
        seen[target["image_id"]] = (pixels, sorted(zip(target["boxes"].tolist(), rows)))
    assert sorted(seen) == sorted(direct) and len(seen) == len(json.loads(instances.read_text())["images"])
    for image_id, (pixels, boxes) in direct.items():
        assert torch.equal(seen[image_id][0], pixels)
        assert [n for _, n in seen[image_id][1]] == [n for _, n in boxes]
        assert torch.allclose(torch.tensor([b for b, _ in seen[image_id][1]]), torch.tensor([b for b, _ in boxes]), atol=1e-6)


def test_refcoco_style_records_evaluate_on_the_referred_boxes(synthetic_root, tmp_path):
    """The synthetic referring expressions (written as ``grounding-convert refcoco`` writes RefCOCO) seen by the
    REC evaluation: every expression of the refs file once, its box the referred instance's (x0, y0, x1, y1)."""
    files = write_synthetic_odvg(synthetic_root, "val")
    data = GroundingDataModule(val=[{"anno": str(files.grounding), "image_root": str(files.image_root)}],
                               image_size=96, max_size=128, num_workers=0)
    expressions = data.dataset("val").expressions
    refs = json.loads(syn.refs_json_path(synthetic_root, "val").read_text())
    coco = json.loads(syn.instances_path(synthetic_root, "val").read_text())
    boxes = {a["id"]: [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in coco["annotations"]}
    wanted = sorted((r["image_id"], " ".join(s["sent"].split()), tuple(boxes[r["ann_id"]])) for r in refs for s in r["sentences"])
    got = sorted((e.image_id, e.text, tuple(e.gt_boxes[0])) for e in expressions)
    assert all(len(e.gt_boxes) == 1 for e in expressions)
    assert [(i, t) for i, t, _ in got] == [(i, t) for i, t, _ in wanted]
    assert torch.allclose(torch.tensor([b for *_, b in got]), torch.tensor([b for *_, b in wanted]), atol=1e-4)


# ------------------------------------------------------------------------------------------- two processes
@pytest.mark.slow
def test_two_processes_train_and_evaluate_grounding_as_one(synthetic_root, flickr_file, tmp_path):
    """train.py on ODVG detection + referring-expression lines, 2 processes (gloo; ``ddp`` relaunches the script)
    of batch 2 against 1 of batch 4: the same weights (float64, no dropout, no denoising: its group count follows
    each process's batch), then the same REC accuracy, phrase-grounding recall and box AP of the trained model on
    2 processes as on 1, and the same prediction files."""
    from ..test_runs import NO_DROPOUT

    path, _ = flickr_file
    train_files, val_files = write_synthetic_odvg(synthetic_root, "train"), write_synthetic_odvg(synthetic_root, "val")
    train = [{"anno": str(train_files.detection), "label_map": str(train_files.label_map), "image_root": str(train_files.image_root)},
             {"anno": str(train_files.grounding), "image_root": str(train_files.image_root), "weight": 0.25}]
    images = str(val_files.image_root)
    val = [{"anno": str(val_files.grounding), "image_root": images, "name": "refs"},
           {"anno": str(path), "image_root": images, "name": "flickr", "protocol": "phrase"}]
    outputs = {}
    for devices, batch in ((1, 4), (2, 2)):
        args = ["--config", str(REPO / "configs" / "image" / "synthetic_grounding.yaml"),
                "--model.init_args.model_config", json.dumps(NO_DROPOUT), "--model.init_args.denoising.number", "0",
                "--model.init_args.log_images", "false", "--data.init_args.format", "odvg",
                "--data.init_args.synthetic_root", "null", "--data.init_args.detection_eval", "false",
                "--data.init_args.train", json.dumps(train), "--data.init_args.val", json.dumps(val),
                "--data.init_args.val_detection", json.dumps({"annotations": str(syn.instances_path(synthetic_root, "val")), "images": images}),
                "--data.init_args.image_size", "96", "--data.init_args.max_size", "128", "--data.init_args.batch_size", str(batch),
                "--data.init_args.eval_batch_size", "3", "--trainer.max_epochs", "1", "--trainer.check_val_every_n_epoch", "1",
                "--trainer.precision", "64-true", "--validate_before_fit", "false",
                "--trainer.logger.init_args.save_dir", str(tmp_path / f"d{devices}"), "--trainer.enable_progress_bar", "false",
                "--trainer.accelerator", "cpu", "--trainer.devices", str(devices), "--trainer.strategy", "ddp" if devices > 1 else "auto"]
        if devices == 1:  # the reference, in this process: no subprocess imports
            result = run_in_process("train.py", args, tmp_path, threads=1)
        else:
            result = subprocess.run(
                [sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"},
            )
        assert result.returncode == 0, result.stderr[-4000:]
        outputs[devices] = json.loads(result.stdout.strip().splitlines()[-1])
    one, two = outputs[1], outputs[2]
    assert one["steps"] == two["steps"] > 2
    w1, w2 = (torch.load(Path(o["run_dir"]) / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"] for o in (one, two))
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-9
    keys = ["rec_acc@1", "rec_acc@5", "rec_acc@10", "rec_count", "refs/rec_acc@1", "phrase_R@1", "phrase_R@5",
            "phrase_R@10", "phrase_count", "flickr/phrase_R@1", "AP", "AP50"]
    first, second = one["trained"], two["trained"]
    assert first["rec_count"] > 4 and first["phrase_count"] >= 3
    assert {k: second[k] for k in keys} == pytest.approx({k: first[k] for k in keys}, abs=1e-6)
    for pattern in ("rec_val_epoch000.json", "phrase_val_epoch000.json"):
        written = [json.loads((Path(o["run_dir"]) / "predictions" / pattern).read_text()) for o in (one, two)]
        assert torch.allclose(*(torch.tensor([r["boxes"] for r in w]) for w in written), atol=0.05)
        assert torch.allclose(*(torch.tensor([r["scores"] for r in w]) for w in written), atol=1e-4)
        assert [r.get("expression_id", r.get("phrase_id")) for r in written[1]] == list(range(len(written[1])))


def test_a_detection_checkpoint_is_evaluated_on_referring_expressions(trained_detector, synthetic_root, tmp_path):
    """An ImageGroundingModule checkpoint (its parent class) is accepted by a GroundingModule evaluation, whose
    REC accuracy is that of the checkpoint's weights loaded by hand; a class unrelated to it is still refused."""
    from grounding.cli import checkpoint_problem, evaluate
    from grounding.lightning.gem_module import GEMSegmentationModule

    checkpoint = torch.load(trained_detector.path, weights_only=False)
    checkpoint["hyper_parameters"]["_class_path"] = "grounding.lightning.image_module.ImageGroundingModule"  # as LightningCLI saves it
    path = tmp_path / "detector.ckpt"
    torch.save(checkpoint, path)
    files = write_synthetic_odvg(synthetic_root, "val")
    source = [{"anno": str(files.grounding), "image_root": str(files.image_root)}]
    got = evaluate([
        "--config", str(REPO / "configs" / "image" / "synthetic_grounding.yaml"), "--ckpt_path", str(path),
        "--model.init_args.model_config", json.dumps(TEST_MODEL_CONFIG), "--data.init_args.format", "odvg",
        "--data.init_args.synthetic_root", "null", "--data.init_args.detection_eval", "false",
        "--data.init_args.test", json.dumps(source), "--data.init_args.split", "test",
        "--data.init_args.image_size", "96", "--data.init_args.max_size", "128",
        "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
    ])
    module = make_module(denoising=DenoisingConfig(number=3))  # the checkpoint's label table (unused at evaluation)
    module.load_state_dict(checkpoint["state_dict"])
    data = GroundingDataModule(test=source, split="test", image_size=96, max_size=128, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path / "direct")  # where its predictions go
    expected = trainer.test(module, datamodule=data, verbose=False)[0]
    assert got["rec_count"] == expected["test/rec_count"] > 4
    for k in (1, 5, 10):
        assert got[f"rec_acc@{k}"] == pytest.approx(expected[f"test/rec_acc@{k}"], abs=1e-4)
    assert checkpoint_problem(str(path), GroundingModule) is None
    assert "is a checkpoint of ImageGroundingModule" in checkpoint_problem(str(path), GEMSegmentationModule)


# ------------------------------------------------------------------------------------------- resume
def test_a_resumed_grounding_run_ends_with_the_weights_of_the_uninterrupted_one(synthetic_root, tmp_path):
    """Grounding training (detection and referring-expression lines, masking, denoising): the last.ckpt written
    after step 3 of a 6-step run (weights, optimizer, loader position, random state), resumed, ends with the
    uninterrupted run's weights."""

    class KeepStep3(L.Callback):  # after LastCheckpoint has written step 3
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 3:
                shutil.copy(tmp_path / "whole" / "last.ckpt", tmp_path / "step3.ckpt")

    def fit(folder, ckpt_path=None):
        L.seed_everything(0)
        module = make_module(masking=MaskingConfig(variant="rf_gam"), denoising=DenoisingConfig(number=3), lr=1e-3)
        data = GroundingDataModule(format="synthetic", synthetic_root=str(synthetic_root), image_size=96, max_size=128,
                                   batch_size=2, num_workers=0, crop_prob=0.0, max_negatives=3,
                                   synthetic_weights={"detection": 1.0, "grounding": 0.5})
        callbacks = [LastCheckpoint(dirpath=str(folder), every_n_train_steps=3)] + ([] if ckpt_path else [KeepStep3()])
        trainer = L.Trainer(max_steps=6, limit_val_batches=0, logger=False, enable_checkpointing=False, callbacks=callbacks,
                            enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                            default_root_dir=str(tmp_path))
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=False)  # our own file
        return {k: v.detach().clone() for k, v in module.detector.state_dict().items()}, data

    uninterrupted, data = fit(tmp_path / "whole")
    assert len(data.dataset("train")) // 2 > 6  # step 3 falls inside the first epoch
    assert torch.load(tmp_path / "step3.ckpt", weights_only=False)["global_step"] == 3
    resumed, _ = fit(tmp_path / "resumed", ckpt_path=str(tmp_path / "step3.ckpt"))
    for name, value in uninterrupted.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6, msg=name)
