"""The detector on grounding data: label maps from spans, the patched loss, detection prompts, training steps,
REC evaluation, and the evaluation shares of several processes."""

import random
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from PIL import Image
from transformers.loss.loss_grounding_dino import GroundingDinoForObjectDetectionLoss
from transformers.models.grounding_dino import modeling_grounding_dino
from transformers.models.mm_grounding_dino import modeling_mm_grounding_dino

from grounding.data.grounding_data import (
    GroundingDataModule,
    collate_expressions,
    detection_prompt,
    encode_text,
    expressions_of,
    label_map_from_spans,
    prompt_text,
)
from grounding.data.odvg import OdvgRecord, write_odvg
from grounding.lightning.grounding_module import GroundingModule, expression_scores, rec_predictions
from grounding.metrics.rec import ReferringExpressionAccuracy, rec_accuracy
from grounding.models.adaptive_masking import MaskingConfig
from grounding.models.denoising import DenoisingConfig
from grounding.models.grounding_dino import batch_label_maps, offset_class_labels, tiny_grounding_dino_config
from grounding.models.tokenizer import build_wordpiece_tokenizer, wordpiece_vocabulary

from ..conftest import TEST_MODEL_CONFIG

L_TEXT = TEST_MODEL_CONFIG["max_text_len"]  # 32


@pytest.fixture(scope="module")
def tokenizer():
    return build_wordpiece_tokenizer()


def make_module(**kwargs):
    torch.manual_seed(0)
    settings = dict(model="tiny", model_config=TEST_MODEL_CONFIG, masking=MaskingConfig(variant="rf_gam"), log_images=False)
    settings.update(kwargs)
    return GroundingModule(**settings)


def synthetic_data(root, **kwargs):
    settings = dict(format="synthetic", synthetic_root=str(root), image_size=96, max_size=128, batch_size=4,
                    num_workers=0, crop_prob=0.0, max_negatives=3)
    settings.update(kwargs)
    return GroundingDataModule(**settings)


# ------------------------------------------------------------------------------------------- label maps
CAPTION = "the red circle left of two blue squares"
# tokens: [CLS]0 the1 red2 circle3 left4 of5 two6 blue7 square8 ##s9 [SEP]10


def test_label_maps_of_a_grounding_record_follow_its_spans(tokenizer, tmp_path):
    """A multi-token phrase, two boxes of one phrase, phrases not separated by "." (a hand computation)."""
    regions = [
        {"bbox": [2, 2, 20, 20], "tokens_positive": [[0, 14]]},  # "the red circle": tokens 1, 2, 3
        {"bbox": [30, 30, 40, 40], "tokens_positive": [[27, 39]]},  # "blue squares": tokens 7, 8, 9
        {"bbox": [50, 10, 60, 20], "tokens_positive": [[27, 39]]},  # the same phrase: the same row
    ]
    expected = torch.zeros(2, L_TEXT, dtype=torch.long)
    expected[0, [1, 2, 3]] = 1
    expected[1, [7, 8, 9]] = 1
    _, offsets = encode_text(tokenizer, CAPTION, L_TEXT)
    label_map, rows = label_map_from_spans(offsets, [r["tokens_positive"] for r in regions], L_TEXT)
    assert torch.equal(label_map, expected) and rows == [0, 1, 1]

    # the same through the training set: a one-line ODVG file and its image
    Image.new("RGB", (64, 48), (90, 90, 90)).save(tmp_path / "a.jpg")
    record = {"filename": "a.jpg", "height": 48, "width": 64, "grounding": {"caption": CAPTION, "regions": regions}}
    write_odvg(tmp_path / "vg.jsonl", [record])
    data = GroundingDataModule(train=[{"anno": str(tmp_path / "vg.jsonl"), "image_root": str(tmp_path)}],
                               image_size=64, max_size=100, flip_prob=0.0, crop_prob=0.0, num_workers=0)
    data.use_tokenizer(tokenizer, L_TEXT)
    _, target = data.dataset("train")[(0, 0)]
    assert torch.equal(target["label_map"], expected)
    assert target["class_labels"].tolist() == [0, 1, 1]
    assert target["input_ids"].tolist() == tokenizer(CAPTION + " .")["input_ids"]  # closed by "."
    # the model's own label maps would make one phrase of the whole caption (no delimiter in it)
    own = modeling_grounding_dino.build_label_maps(torch.zeros(1, 1, L_TEXT), target["input_ids"][None])[0]
    assert own.shape[0] == 1 and not torch.equal(own, expected[:1])


def test_expressions_of_a_grounding_record():
    """One expression per distinct span set: the whole caption, or the text under the spans."""
    whole = OdvgRecord("a.jpg", 50, 60, "grounding", boxes=[[1, 1, 10, 10]], caption="the red circle",
                       phrases=["the red circle"], tokens_positive=[[[0, 14]]])
    (one,) = expressions_of(whole, 7, "a.jpg", "val", "f:1")
    assert (one.expression_id, one.text, one.gt_boxes, one.split) == (7, "the red circle", [[1, 1, 10, 10]], "val")
    per_image = OdvgRecord("a.jpg", 50, 60, "grounding", boxes=[[1, 1, 10, 10], [20, 20, 70, 30], [5, 5, 8, 8]],
                           caption="red circle . blue square .", tokens_positive=[[[0, 10]], [[13, 24]], [[0, 10]]])
    found = expressions_of(per_image, 0, "a.jpg", None, "f:2")
    assert [(e.text, e.gt_boxes) for e in found] == [
        ("red circle", [[1, 1, 10, 10], [5, 5, 8, 8]]), ("blue square", [[20, 20, 60, 30]])]  # clipped to the image


# ------------------------------------------------------------------------------------------- the loss
def test_the_patched_loss_equals_transformers_loss_on_a_plain_prompt(tokenizer):
    """"red circle . blue square .": the label maps from the spans are the model's own, so are the losses."""
    module = make_module(masking=MaskingConfig(variant="none"))
    detector = module.detector.eval()  # no dropout: the two passes compute the same thing
    text, spans = prompt_text(["red circle", "blue square"])
    ids, offsets = encode_text(tokenizer, text, L_TEXT)
    ours, _ = label_map_from_spans(offsets, [[list(s)] for s in spans], L_TEXT)
    input_ids = torch.tensor([ids] * 3)
    own = modeling_grounding_dino.build_label_maps(torch.zeros(3, 1, L_TEXT), input_ids)
    assert all(torch.equal(ours, m) for m in own)
    torch.manual_seed(1)
    pixels = torch.randn(3, 3, 96, 96)
    labels = [{"class_labels": torch.tensor(c), "boxes": torch.rand(len(c), 2).repeat(1, 2) * 0.4 + 0.3}
              for c in ([0], [1, 0], [1])]
    inputs = dict(pixel_values=pixels, pixel_mask=torch.ones(3, 96, 96, dtype=torch.long), input_ids=input_ids,
                  attention_mask=torch.ones_like(input_ids))
    with torch.no_grad():
        reference = detector(**inputs, labels=labels)
        with batch_label_maps([ours] * 3) as offsets:
            patched = detector(**inputs, labels=offset_class_labels(labels, offsets))
    assert offsets == [0, 2, 4]
    assert torch.allclose(patched.loss, reference.loss, rtol=1e-5)
    for name, value in reference.loss_dict.items():
        assert torch.allclose(patched.loss_dict[name], value, rtol=1e-5, atol=1e-6), name
    # the library's function is back in both modules
    assert modeling_grounding_dino.build_label_maps is not None
    assert modeling_grounding_dino.build_label_maps.__module__ == modeling_grounding_dino.__name__
    assert modeling_mm_grounding_dino.build_label_maps.__module__ == modeling_mm_grounding_dino.__name__


def test_per_image_label_maps_give_each_image_its_own_loss():
    """Three images with different label maps: the batch loss is the box-weighted sum of each image's loss
    with its own map alone (the library's one-hot offset would pick other images' rows without the stacking)."""
    config = tiny_grounding_dino_config(len(wordpiece_vocabulary()), {"auxiliary_loss": False, "two_stage": False})
    torch.manual_seed(2)
    maps = [torch.zeros(r, L_TEXT, dtype=torch.long) for r in (2, 3, 1)]
    maps[0][0, [1, 2]] = 1
    maps[0][1, [4]] = 1
    maps[1][0, [1]] = 1
    maps[1][1, [3, 4, 5]] = 1
    maps[1][2, [7]] = 1
    maps[2][0, [1, 2, 3]] = 1
    labels = [{"class_labels": torch.tensor(c), "boxes": torch.rand(len(c), 2).repeat(1, 2) * 0.4 + 0.3}
              for c in ([1, 0], [2, 2, 1], [0])]
    logits = torch.randn(3, 6, L_TEXT)
    boxes = torch.rand(3, 6, 2).repeat(1, 1, 2) * 0.5 + 0.25
    text_mask = torch.zeros(3, 6, L_TEXT, dtype=torch.bool)
    text_mask[..., :9] = True

    def loss(index, label_maps, targets):
        return GroundingDinoForObjectDetectionLoss(logits[index], targets, "cpu", boxes[index], config, label_maps,
                                                   text_mask[index])[0]

    with batch_label_maps(maps) as offsets:
        stacked = modeling_grounding_dino.build_label_maps(logits, None)
        batch = loss(slice(None), stacked, offset_class_labels(labels, offsets))
    each = [loss(slice(i, i + 1), (maps[i],), [labels[i]]) for i in range(3)]
    counts = [len(label["boxes"]) for label in labels]
    assert torch.allclose(batch, sum(c * l for c, l in zip(counts, each)) / sum(counts), rtol=1e-5)
    naive = loss(slice(None), tuple(maps), labels)  # the per-image maps handed over as they are
    assert not torch.allclose(naive, batch, rtol=1e-5)


# ------------------------------------------------------------------------------------------- detection prompts
def test_detection_prompts_hold_the_positives_and_at_most_max_negatives():
    labels = list(range(10))
    costs = {label: 2 + label % 3 for label in labels}
    for seed in range(20):
        chosen = detection_prompt([3, 7], labels, costs, 4, 200, random.Random(seed))
        assert {3, 7} <= set(chosen) and len(chosen) == len(set(chosen)) == 6
        assert chosen == detection_prompt([3, 7], labels, costs, 4, 200, random.Random(seed))  # deterministic
    orders = {tuple(detection_prompt([3, 7], labels, costs, 4, 200, random.Random(seed))) for seed in range(20)}
    assert len(orders) > 10  # negatives and order change with the seed
    # too long: whole negatives go first, positives stay
    short = detection_prompt([3, 7], labels, costs, 9, costs[3] + costs[7] + 2, random.Random(0))
    assert {3, 7} <= set(short) and sum(costs[c] for c in short) <= costs[3] + costs[7] + 2
    # the positives alone overflow: only as many as fit are kept
    assert len(detection_prompt([1, 4, 7], labels, costs, 5, costs[1] + costs[4], random.Random(0))) <= 2
    # unshuffled: the same categories as shuffled with that seed, in the label map's order
    backwards = labels[::-1]
    for seed in range(5):
        fixed = detection_prompt([3, 7], backwards, costs, 4, 200, random.Random(seed), shuffle=False)
        assert fixed == sorted(detection_prompt([3, 7], backwards, costs, 4, 200, random.Random(seed)), reverse=True)


def test_detection_samples_are_a_function_of_seed_epoch_and_index(synthetic_root, tokenizer):
    data = synthetic_data(synthetic_root)
    data.prepare_data()
    data.use_tokenizer(tokenizer, L_TEXT)
    dataset = data.dataset("train")
    names = set(dataset.sources[0].names.values())
    detection = [i for i in range(len(dataset)) if dataset.record(i, 0)[1].kind == "detection"]
    for index in detection[:6]:
        _, target = dataset[(index, 0)]
        _, again = dataset[(index, 0)]
        assert target["text"] == again["text"] and torch.equal(target["boxes"], again["boxes"])
        record = dataset.record(index, 0)[1]
        prompt = target["text"][:-2].split(" . ")
        assert set(record.categories) <= set(prompt) <= names
        assert len(prompt) - len(set(record.categories)) <= 3  # max_negatives
        rows = target["label_map"]
        assert rows.shape[0] == len(prompt)
        for box_category, row in zip(record.categories, target["class_labels"].tolist()):
            assert prompt[row] == box_category  # each box trained against its category's phrase
    texts = {dataset[(i, epoch)][1]["text"] for i in detection[:6] for epoch in range(4)}
    assert len(texts) > 6  # another epoch draws other negatives and another order


def test_source_weights_repeat_records_per_epoch(synthetic_root, tokenizer):
    data = synthetic_data(synthetic_root, synthetic_weights={"detection": 2.0, "grounding": 0.5})
    data.prepare_data()
    data.use_tokenizer(tokenizer, L_TEXT)
    dataset = data.dataset("train")
    detection, grounding = dataset.sources
    assert len(dataset) == 2 * len(detection.records) + round(0.5 * len(grounding.records))
    tables = [dataset.epoch_table(epoch) for epoch in (0, 1, 0)]
    for table in tables:
        counts = torch.bincount(torch.as_tensor(table[table[:, 0] == 0, 1]), minlength=len(detection.records))
        assert (counts == 2).all()  # weight 2: every detection record twice
    chosen = [set(t[t[:, 0] == 1, 1].tolist()) for t in tables]
    assert chosen[0] == chosen[2] and chosen[0] != chosen[1]  # the half drawn anew each epoch, reproducibly


# ------------------------------------------------------------------------------------------- training
class Terms(L.Callback):
    def __init__(self):
        self.names = set()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.names |= set(trainer.callback_metrics)


def test_two_training_steps_with_masking_and_denoising_move_the_weights(synthetic_root):
    module = make_module(denoising=DenoisingConfig(number=6), lr=1e-3, freeze_text_encoder=False)
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    terms = Terms()
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[terms])
    trainer.fit(module, datamodule=synthetic_data(synthetic_root))
    assert trainer.global_step == 2
    assert {"train/loss", "train/loss_ce_dn", "mask/ratio_level0"} <= terms.names
    moved = [n for n, p in module.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any(n.startswith("detector.model.text_backbone") for n in moved)
    assert any(n.startswith("denoising.") for n in moved)
    assert len(moved) > 0.9 * len(before)
    assert modeling_grounding_dino.build_label_maps.__module__ == modeling_grounding_dino.__name__


# ------------------------------------------------------------------------------------------- REC evaluation
def test_rec_scores_are_the_mean_token_probability_of_the_expression():
    logits = torch.full((1, 2, 4), -torch.inf)
    logits[0, 0, :3] = torch.tensor([0.0, 2.0, -2.0])
    logits[0, 1, :3] = torch.tensor([3.0, 3.0, -5.0])
    mask = torch.tensor([[False, True, True, False]])
    p = torch.sigmoid
    expected = torch.stack([(p(torch.tensor(2.0)) + p(torch.tensor(-2.0))) / 2, (p(torch.tensor(3.0)) + p(torch.tensor(-5.0))) / 2])
    assert torch.allclose(expression_scores(logits, mask)[0], expected)
    assert torch.allclose(expression_scores(logits, mask, "max")[0], torch.stack([p(torch.tensor(2.0)), p(torch.tensor(3.0))]))


def test_rec_evaluation_of_hand_made_outputs_gives_what_the_metric_gives():
    module = make_module()
    torch.manual_seed(3)
    b, q = 3, 12
    logits = torch.randn(b, q, L_TEXT)
    centres = torch.rand(b, q, 2) * 0.6 + 0.2
    pred_boxes = torch.cat([centres, torch.rand(b, q, 2) * 0.3 + 0.1], -1)
    token_mask = torch.zeros(b, L_TEXT, dtype=torch.bool)
    token_mask[0, 1:3] = token_mask[1, 1:5] = token_mask[2, 1:2] = True
    sizes = torch.tensor([[96, 96], [80, 120], [96, 64]])
    ranked = rec_predictions(logits, pred_boxes, token_mask, sizes, top_k=10)
    # ground truth: expression 0 hits with its best box, 1 with its 4th, 2 misses
    gts = [ranked[0][0][0].clone(), ranked[1][0][3].clone(), torch.tensor([0.0, 0.0, 2.0, 2.0])]
    batch = {
        "pixel_values": torch.zeros(b, 3, 96, 96), "pixel_mask": torch.ones(b, 96, 96, dtype=torch.long),
        "input_ids": torch.ones(b, 4, dtype=torch.long), "attention_mask": torch.ones(b, 4, dtype=torch.long),
        "token_mask": token_mask, "task": "rec",
        "targets": [{"expression_id": i, "image_id": i, "text": "x", "gt_boxes": gts[i][None], "split": s,
                     "orig_size": sizes[i], "size": torch.tensor([96, 96])} for i, s in enumerate(["a", "b", "a"])],
    }
    module.detector.forward = lambda **kwargs: SimpleNamespace(logits=logits, pred_boxes=pred_boxes)
    module.rec_metrics["val"] = ReferringExpressionAccuracy(splits=["a", "b"])
    records = module._rec_step(batch, 1, "val")
    got = {k: float(v) for k, v in module.rec_metrics["val"].compute().items()}
    # what the metric gives on the same expressions, scored by hand: mean token probability, best 10
    hand = []
    for i in range(b):
        scores = (logits[i].sigmoid() * token_mask[i]).sum(-1) / token_mask[i].sum()
        order = torch.sort(scores, descending=True, stable=True).indices[:10]
        h, w = sizes[i].tolist()
        xyxy = torch.cat([pred_boxes[i, order, :2] - pred_boxes[i, order, 2:] / 2, pred_boxes[i, order, :2] + pred_boxes[i, order, 2:] / 2], -1)
        hand.append({"boxes": xyxy * torch.tensor([w, h, w, h]), "scores": scores[order], "gt_boxes": gts[i], "split": ["a", "b", "a"][i]})
    assert got == pytest.approx(rec_accuracy(hand, splits=["a", "b"]))
    assert got["acc@1"] == pytest.approx(1 / 3) and got["acc@5"] == pytest.approx(2 / 3) and got["b/acc@1"] == 0.0
    assert [len(r["boxes"]) for r in records] == [10, 10, 10] and records[1]["split"] == "b"


def test_rec_scores_do_not_depend_on_padding_or_batch_neighbours(synthetic_root, tokenizer):
    """An expression scored alone and in a padded batch of longer ones gets the same boxes and scores."""
    module = make_module().eval()
    data = synthetic_data(synthetic_root)
    data.prepare_data()
    data.use_tokenizer(module.tokenizer, L_TEXT)
    dataset = data.dataset("val")
    lengths = [len(dataset[i][1]["input_ids"]) for i in range(len(dataset))]
    short = min(range(len(dataset)), key=lengths.__getitem__)
    longest = max(range(len(dataset)), key=lengths.__getitem__)
    assert lengths[short] < lengths[longest]
    for index in (short, longest):  # the expression's own tokens, not the "." closing it
        _, target = dataset[index]
        words = tokenizer(target["text"], add_special_tokens=False)["input_ids"]
        assert target["token_mask"].sum() == len(words) and target["input_ids"][-2] == 1012
    alone = module.locate(collate_expressions([dataset[short]]))[0]
    together = module.locate(collate_expressions([dataset[longest], dataset[short]]))[1]
    assert torch.allclose(alone[1], together[1], atol=1e-5) and torch.allclose(alone[0], together[0], atol=1e-3)


def test_two_processes_share_the_expressions_without_overlap(synthetic_root, tokenizer, monkeypatch):
    data = synthetic_data(synthetic_root, detection_eval=True)
    data.prepare_data()
    data.use_tokenizer(tokenizer, L_TEXT)
    data.setup("validate")
    ids = [e.expression_id for e in data.dataset("val").expressions]
    assert ids == list(range(len(ids))) and len(ids) > 4
    shares, images = [], []
    for rank in (0, 1):
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
        monkeypatch.setattr(torch.distributed, "get_rank", lambda rank=rank: rank)
        rec_loader, detection_loader = data.val_dataloader()
        shares.append([ids[i] for i in rec_loader.sampler])
        images.append(list(detection_loader.sampler))
    assert not set(shares[0]) & set(shares[1]) and sorted(shares[0] + shares[1]) == ids
    assert not set(images[0]) & set(images[1]) and len(images[0] + images[1]) == len(data.detection_set("val"))


def test_validation_logs_rec_accuracy_and_box_ap_and_writes_the_predictions(synthetic_root, tmp_path):
    module = make_module()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=L.pytorch.loggers.CSVLogger(tmp_path, name="v"),
                        enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.validate(module, datamodule=synthetic_data(synthetic_root, detection_eval=True), verbose=False)[0]
    assert {"val/rec_acc@1", "val/rec_acc@5", "val/rec_acc@10", "val/rec_count", "val/AP", "val/AP50"} <= set(metrics)
    (written,) = (tmp_path / "v").rglob("rec_val_step*.json")
    import json

    records = json.loads(written.read_text())
    assert len(records) == metrics["val/rec_count"] and [r["expression_id"] for r in records] == list(range(len(records)))
    assert rec_accuracy(records)["acc@1"] == pytest.approx(metrics["val/rec_acc@1"])


def test_settings_are_checked(synthetic_root):
    with pytest.raises(ValueError, match="rec_top_k"):
        make_module(rec_top_k=0)
    with pytest.raises(ValueError, match="unknown key"):
        GroundingDataModule(train=[{"anno": "a.jsonl", "image_root": ".", "wieght": 2}]).dataset("train")
    with pytest.raises(ValueError, match="format=synthetic reads"):
        GroundingDataModule(format="synthetic", synthetic_root=str(synthetic_root), train=[{"anno": "x"}])
    with pytest.raises(FileNotFoundError, match="nosuch.jsonl"):
        GroundingDataModule(val=[{"anno": "nosuch.jsonl", "image_root": str(synthetic_root)}]).dataset("val")
