"""Contrastive denoising: the queries and attention mask against direct computations, the matching part left
exactly as it is, the denoising loss against torchvision's focal / L1 / GIoU, and the hooks' clean-up."""

import pytest
import torch
from torchvision.ops import box_convert, generalized_box_iou_loss, sigmoid_focal_loss

from grounding.data.prompts import build_prompts
from grounding.lightning.image_module import ImageGroundingModule
from grounding.models.denoising import (
    ContrastiveDenoising,
    DenoisingConfig,
    DenoisingQueries,
    denoising_attention_mask,
    denoising_loss,
    denoising_training,
)
from grounding.models.grounding_dino import build_grounding_dino, trained_proposals

from ..conftest import TEST_MODEL_CONFIG

LABELS = [
    {"class_labels": torch.tensor([0, 2, 1]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.4], [0.5, 0.2, 0.6, 0.1]])},
    {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])},
]


def test_attention_mask_against_a_loop():
    matching, groups, size = 4, 3, 2
    blocked = denoising_attention_mask(matching, groups, size)
    total = matching + groups * size
    for i in range(total):
        for j in range(total):
            if i < matching:
                expected = j >= matching  # matching queries never see a denoising query
            elif j < matching:
                expected = False  # denoising queries see the matching ones
            else:
                expected = (i - matching) // size != (j - matching) // size  # nor another group
            assert bool(blocked[i, j]) == expected, (i, j)


def test_queries_count_groups_pad_and_assign_as_dino():
    torch.manual_seed(0)
    denoiser = ContrastiveDenoising(DenoisingConfig(number=10, label_noise=0.0), d_model=8, num_labels=16)
    queries = denoiser.build(LABELS, num_classes=3, num_matching=5)
    assert (queries.groups, queries.group_size, queries.count) == (10 // 3, 6, 3 * 6)
    assert queries.blocked.shape == (5 + 18, 5 + 18)
    weight = denoiser.label_embedding.weight
    for b, label in enumerate(LABELS):
        n = len(label["boxes"])
        positives, targets = queries.indices[b]
        assert positives.tolist() == [g * 6 + j for g in range(3) for j in range(n)]
        assert targets.tolist() == list(range(3 * n))
        assert torch.equal(queries.targets[b]["class_labels"], label["class_labels"].repeat(3))
        assert torch.equal(queries.targets[b]["boxes"], label["boxes"].repeat(3, 1))
        for g in range(3):
            for part in (0, 3):  # positives, negatives: the label's embedding (no label noise)
                rows = queries.content[b, g * 6 + part: g * 6 + part + n]
                assert torch.equal(rows, weight[label["class_labels"]])
            padding = [g * 6 + part + j for part in (0, 3) for j in range(n, 3)]
            assert not queries.content[b, padding].any()
            assert torch.equal(queries.reference[b, padding], torch.full((len(padding), 4), 0.5))


def test_positives_stay_within_half_a_box_and_negatives_move_one_to_two_halves():
    torch.manual_seed(1)
    scale = 0.8
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.3]] * 50)  # far from the image border: no clipping
    labels = [{"class_labels": torch.zeros(50, dtype=torch.long), "boxes": boxes}]
    queries = ContrastiveDenoising(DenoisingConfig(number=50, box_noise=scale), 4, 4).build(labels, 1, 3)
    corners = box_convert(boxes, "cxcywh", "xyxy")
    half = boxes[:, 2:].repeat(1, 2) / 2 * scale
    moved_positive = (box_convert(queries.reference[0, :50], "cxcywh", "xyxy") - corners).abs() / half
    moved_negative = (box_convert(queries.reference[0, 50:], "cxcywh", "xyxy") - corners).abs() / half
    assert moved_positive.max() < 1 + 1e-5 and moved_negative.min() > 1 - 1e-5 and moved_negative.max() < 2 + 1e-5
    assert moved_positive.std() > 0.2  # spread over the range, not a constant shift


def test_label_noise_replaces_labels_with_categories_of_the_prompt():
    torch.manual_seed(2)
    labels = [{"class_labels": torch.zeros(400, dtype=torch.long), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]).repeat(400, 1)}]
    denoiser = ContrastiveDenoising(DenoisingConfig(number=400, label_noise=0.5), 6, 8)
    queries = denoiser.build(labels, num_classes=4, num_matching=2)
    distances = torch.cdist(queries.content[0], denoiser.label_embedding.weight)
    chosen = distances.argmin(-1)
    assert set(chosen.tolist()) == {0, 1, 2, 3}  # drawn among the prompt's 4 categories only
    # replaced with probability 0.25, by a draw that is again label 0 a quarter of the time: 3/16 change
    assert (chosen != 0).float().mean() == pytest.approx(3 / 16, abs=0.04)


def test_no_box_or_number_zero_gives_no_queries():
    empty = [{"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}]
    assert ContrastiveDenoising(DenoisingConfig(number=10), 4, 4).build(empty, 1, 3) is None
    assert ContrastiveDenoising(DenoisingConfig(number=0), 4, 4).build(LABELS, 3, 3) is None


def test_denoising_loss_against_torchvision():
    """Known assignment: focal loss over the valid tokens of every denoising query (the positives' target is
    their phrase's tokens, the rest none), L1 and GIoU of the positives, each over the number of positives."""
    torch.manual_seed(3)
    layers, batch, count, tokens = 2, 2, 6, 7
    logits, boxes = torch.randn(layers, batch, count, tokens), torch.rand(layers, batch, count, 4) * 0.5 + 0.25
    label_maps = tuple(torch.tensor([[0, 1, 0, 0, 0, 0, 0], [0, 0, 0, 1, 1, 0, 0.0]]) for _ in range(batch))
    text_mask = torch.zeros(batch, 9, tokens, dtype=torch.bool)
    text_mask[:, :, :6] = True
    targets = [{"class_labels": torch.tensor([1, 0]), "boxes": torch.tensor([[0.4, 0.4, 0.2, 0.3], [0.6, 0.5, 0.1, 0.2]])},
               {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]])}]
    indices = [(torch.tensor([0, 3]), torch.tensor([0, 1])), (torch.tensor([2]), torch.tensor([0]))]
    queries = DenoisingQueries(torch.zeros(batch, count, 4), torch.zeros(batch, count, 4), torch.zeros(1, 1, dtype=torch.bool),
                               targets, indices, 1, count)
    config = build_grounding_dino("tiny", TEST_MODEL_CONFIG)[0].config
    total, terms = denoising_loss(logits, boxes, queries, label_maps, text_mask, config)
    positives = 3
    expected_total = 0.0
    for layer, suffix in ((1, ""), (0, "_0")):
        goal = torch.zeros(batch, count, tokens)
        for b, (rows, columns) in enumerate(indices):
            goal[b, rows] = label_maps[b][targets[b]["class_labels"][columns]]
        valid = text_mask[:, :1].expand(-1, count, -1)
        focal = sigmoid_focal_loss(logits[layer][valid], goal[valid], alpha=config.focal_alpha, gamma=2, reduction="sum") / positives
        predicted = torch.cat([boxes[layer, b, rows] for b, (rows, _) in enumerate(indices)])
        truth = torch.cat([targets[b]["boxes"][columns] for b, (_, columns) in enumerate(indices)])
        l1 = (predicted - truth).abs().sum() / positives
        giou = generalized_box_iou_loss(box_convert(predicted, "cxcywh", "xyxy"), box_convert(truth, "cxcywh", "xyxy"), reduction="sum") / positives
        assert terms[f"loss_ce_dn{suffix}"] == pytest.approx(float(focal), rel=1e-5)
        assert terms[f"loss_bbox_dn{suffix}"] == pytest.approx(float(l1), rel=1e-5)
        assert terms[f"loss_giou_dn{suffix}"] == pytest.approx(float(giou), rel=1e-5)
        expected_total += 2.0 * focal + config.bbox_loss_coefficient * l1 + config.giou_loss_coefficient * giou
    assert float(total) == pytest.approx(float(expected_total), rel=1e-5)


@pytest.fixture(scope="module", params=["tiny", "tiny-mm"])
def model_and_prompt(request):
    """The tiny Grounding DINO and the tiny MM-Grounding-DINO (its class heads scale and bias the scores)."""
    torch.manual_seed(0)
    model, tokenizer = build_grounding_dino(request.param, TEST_MODEL_CONFIG)
    prompt = build_prompts({1: "red circle", 2: "blue square", 3: "green star"}, tokenizer, model.config.max_text_len)[0]
    return model, prompt


def _forward(model, prompt, labels):
    ids = prompt.input_ids[None].repeat(len(labels), 1)
    torch.manual_seed(5)
    pixels = torch.randn(len(labels), 3, 96, 96)
    return model(pixel_values=pixels, input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)


def test_matching_queries_and_their_loss_are_untouched_and_the_denoising_terms_are_added(model_and_prompt):
    """The attention mask keeps the matching queries from seeing the denoising ones: with dropout off, their
    predictions and every term of the library's loss are those of a pass without denoising."""
    model, prompt = model_and_prompt
    model.eval()
    plain = _forward(model, prompt, LABELS)
    denoiser = ContrastiveDenoising(DenoisingConfig(number=12), model.config.d_model, model.config.max_text_len)
    queries = denoiser.build(LABELS, 3, model.config.num_queries)
    with denoising_training(model, queries):
        noised = _forward(model, prompt, LABELS)
    finite = torch.isfinite(plain.logits)
    assert torch.equal(finite, torch.isfinite(noised.logits))
    assert torch.allclose(plain.logits[finite], noised.logits[finite], atol=1e-5)
    assert torch.allclose(plain.pred_boxes, noised.pred_boxes, atol=1e-6)
    for name, value in plain.loss_dict.items():
        assert torch.allclose(value, noised.loss_dict[name], atol=1e-5), name
    added = {name: value for name, value in noised.loss_dict.items() if "_dn" in name}
    layers = model.config.decoder_layers
    assert len(added) == 3 * layers
    weight = {"ce": 2.0, "bbox": model.config.bbox_loss_coefficient, "giou": model.config.giou_loss_coefficient}
    expected = sum(weight[name.split("_")[1]] * value for name, value in added.items())
    assert torch.allclose(noised.loss - plain.loss, expected, rtol=1e-5)


def test_hooks_and_settings_are_restored_also_after_an_error(model_and_prompt):
    model, prompt = model_and_prompt
    denoiser = ContrastiveDenoising(DenoisingConfig(number=6), model.config.d_model, model.config.max_text_len)
    queries = denoiser.build(LABELS, 3, model.config.num_queries)
    before = (model.config.num_queries, model.loss_function, "_loss_function" in vars(model))
    with pytest.raises(RuntimeError, match="inside"):
        with trained_proposals(model), denoising_training(model, queries):
            raise RuntimeError("inside")
    with denoising_training(model, queries):
        _forward(model, prompt, LABELS)
    assert (model.config.num_queries, model.loss_function, "_loss_function" in vars(model)) == before
    for module in (model.model, model.model.decoder):
        assert not module._forward_hooks and not module._forward_pre_hooks


@pytest.mark.parametrize("name", ["tiny", "tiny-mm"])
def test_every_parameter_of_the_module_gets_a_gradient_with_denoising(synthetic_root, name):
    """DDP without find_unused_parameters: the label table too, also on a batch without any box."""
    from grounding.data.coco import collate_detection
    from grounding.data.detection import CocoDetectionDataModule

    torch.manual_seed(0)
    module = ImageGroundingModule(model=name, model_config=TEST_MODEL_CONFIG, denoising=DenoisingConfig(number=20))
    data = CocoDetectionDataModule(synthetic_root=str(synthetic_root), image_size=96, max_size=128, batch_size=2, num_workers=0)
    data.setup("fit")
    module.set_categories(data.categories)
    batch = collate_detection([data.datasets["train"][i] for i in range(2)])
    for targets_kept in (True, False):
        if not targets_kept:
            for target in batch["targets"]:
                target["boxes"], target["category_ids"] = target["boxes"][:0], target["category_ids"][:0]
        module.zero_grad(set_to_none=True)
        module.training_step(batch, 0).backward()
        missing = {name for name, p in module.named_parameters() if p.requires_grad and p.grad is None}
        assert missing == set()
        assert (module.denoising.label_embedding.weight.grad.abs().sum() > 0) == targets_kept


@pytest.mark.parametrize("kwargs, message", [
    ({"number": -1}, "denoising.number must be an integer >= 0 (0 turns denoising off), got -1"),
    ({"label_noise": 1.5}, "denoising.label_noise must be in [0, 1], got 1.5"),
    ({"box_noise": -0.1}, "denoising.box_noise must be >= 0, got -0.1"),
])
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError) as error:
        DenoisingConfig(**kwargs)
    assert str(error.value) == message


def test_number_zero_builds_no_denoiser_and_trains_as_before(synthetic_root):
    from grounding.data.coco import collate_detection
    from grounding.data.detection import CocoDetectionDataModule

    losses = []
    for denoising in (None, DenoisingConfig(number=0)):
        torch.manual_seed(0)
        module = ImageGroundingModule(model="tiny", model_config=TEST_MODEL_CONFIG, denoising=denoising)
        assert module.denoising is None
        data = CocoDetectionDataModule(synthetic_root=str(synthetic_root), image_size=96, max_size=128, batch_size=2, num_workers=0)
        data.setup("fit")
        module.set_categories(data.categories)
        torch.manual_seed(1)
        losses.append(module.training_step(collate_detection([data.datasets["train"][i] for i in range(2)]), 0))
    assert torch.equal(losses[0], losses[1])
