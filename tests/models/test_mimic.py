"""MIMIC's loss terms against direct loop computations, the label alignment, the hooks, the statistics cache and the
synthesis loop without Lightning."""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from grounding.models import mimic
from grounding.models.mimic import (
    IGNORE_LABEL,
    BatchNormPrior,
    FeatureStatistics,
    MimicObjective,
    MimicWeights,
    SynthesisSettings,
    TinyBNCNN,
    answer_loss,
    bn_layer_loss,
    build_cnn,
    build_sequence,
    build_vlm,
    clamp_pixels,
    expand_image_tokens,
    feature_statistics_loss,
    jitter_flip,
    l2_loss,
    patch_border_loss,
    reference_statistics,
    statistics_cache_key,
    synthesize,
    token_statistics,
    tv_losses,
    vision_tower,
    vlm_logits,
)

SCE_ONLY = MimicWeights(sce=1.0, bn=0, base=0, patch=0, tv_l1=0, tv_l2=0, l2=0)


@pytest.fixture(scope="module")
def vlm():
    return build_vlm("tiny")


def _hooks(module):
    """MIMIC's hooks on ``module`` (transformers keeps and lazily adds hooks of its own: not counted)."""
    return sum(str(getattr(hook, "__module__", None)).startswith("grounding.models.mimic.")
               for m in module.modules() for hook in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()))


# ------------------------------------------------------------------------------------- regularizers
def test_tv_losses_equal_a_pixel_loop():
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    l1, l2 = tv_losses(x)
    directions = {(0, 1): [], (1, 0): [], (1, -1): [], (1, 1): []}
    for (dy, dx), values in directions.items():
        for b in range(2):
            for c in range(3):
                for i in range(5):
                    for j in range(6):
                        if 0 <= i + dy < 5 and 0 <= j + dx < 6:
                            values.append(float(x[b, c, i, j] - x[b, c, i + dy, j + dx]))
    want_l1 = sum(np.mean(np.abs(v)) for v in directions.values())
    want_l2 = sum(math.sqrt(sum(d * d for d in v)) for v in directions.values())
    assert float(l1) == pytest.approx(want_l1, rel=1e-12)
    assert float(l2) == pytest.approx(want_l2, rel=1e-12)


def test_l2_loss_is_the_mean_image_norm():
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    want = np.mean([math.sqrt(sum(float(v) ** 2 for v in x[b].flatten())) for b in range(3)])
    assert float(l2_loss(x)) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("height, width, patch", [(12, 12, 4), (10, 13, 4), (3, 3, 4)])
def test_patch_border_loss_equals_a_loop_over_border_pixel_pairs(height, width, patch):
    x = torch.randn(2, 3, height, width, dtype=torch.float64)
    pairs = []
    for b in range(2):
        for c in range(3):
            for i in range(height):
                for j in range(width):
                    if j % patch == 0 and j > 0:  # j - 1 | j straddle a vertical border
                        pairs.append(float(x[b, c, i, j] - x[b, c, i, j - 1]) ** 2)
                    if i % patch == 0 and i > 0:
                        pairs.append(float(x[b, c, i, j] - x[b, c, i - 1, j]) ** 2)
    want = np.mean(pairs) if pairs else 0.0
    assert float(patch_border_loss(x, patch)) == pytest.approx(want, rel=1e-12, abs=0)


def test_bn_prior_equals_a_channel_loop_with_the_first_layer_times_ten():
    cnn = build_cnn("tiny").double()
    pixels = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    prior = BatchNormPrior(cnn, first_multiplier=10.0)
    loss, logits = prior(pixels)
    imagenet_mean, imagenet_std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the CNN's input normalization
    x = (pixels - torch.tensor(imagenet_mean, dtype=torch.float64).view(3, 1, 1)) / torch.tensor(
        imagenet_std, dtype=torch.float64).view(3, 1, 1)
    want, first = 0.0, True
    for layer in cnn.features:
        if isinstance(layer, nn.BatchNorm2d):
            mean_sq = var_sq = 0.0
            for c in range(x.shape[1]):
                values = x[:, c].flatten().tolist()
                mean = sum(values) / len(values)
                var = sum((v - mean) ** 2 for v in values) / len(values)
                mean_sq += (mean - float(layer.running_mean[c])) ** 2
                var_sq += (var - float(layer.running_var[c])) ** 2
            want += (10.0 if first else 1.0) * (math.sqrt(mean_sq) + math.sqrt(var_sq))
            first = False
        x = layer(x)
    assert float(loss) == pytest.approx(want, rel=1e-6)
    assert torch.allclose(logits, cnn.head(x.mean(dim=(2, 3))))
    assert _hooks(cnn) == 0


def test_bn_prior_on_a_random_resnet18_weights_its_first_layer_ten_times():
    cnn = build_cnn("resnet18")
    pixels = torch.rand(2, 3, 32, 32)
    ten, _ = BatchNormPrior(cnn, 10.0)(pixels)
    one, _ = BatchNormPrior(cnn, 1.0)(pixels)
    x = mimic.from_unit(pixels, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    first = bn_layer_loss(cnn.conv1(x), cnn.bn1)
    assert float(ten - one) == pytest.approx(9 * float(first), rel=1e-4)
    assert _hooks(cnn) == 0


def test_a_cnn_without_batchnorm_is_named():
    with pytest.raises(ValueError, match=r"^Sequential has no BatchNorm2d layer: the R_V prior needs a BatchNorm CNN$"):
        BatchNormPrior(nn.Sequential(nn.Conv2d(3, 4, 3)))


def test_feature_statistics_equal_a_loop():
    tokens = torch.randn(2, 5, 3, dtype=torch.float64)
    mean, var = token_statistics(tokens)
    for c in range(3):
        values = tokens[..., c].flatten().tolist()
        m = sum(values) / len(values)
        assert float(mean[c]) == pytest.approx(m, rel=1e-6)
        assert float(var[c]) == pytest.approx(sum((v - m) ** 2 for v in values) / len(values), rel=1e-6)
    maps = torch.randn(2, 3, 4, 4)  # (B, C, H, W): the positions are the tokens
    assert torch.allclose(token_statistics(maps)[0], maps.mean(dim=(0, 2, 3)))
    targets = [(torch.zeros(3), torch.ones(3)), (torch.ones(3), torch.zeros(3))]
    stats = [(mean.float(), var.float()), (mean.float() * 2, var.float())]
    want = sum(math.sqrt(sum((float(a[c]) - float(b[c])) ** 2 for c in range(3))) for (s, t) in zip(stats, targets)
               for a, b in ((s[0], t[0]), (s[1], t[1])))
    assert float(feature_statistics_loss(stats, targets)) == pytest.approx(want, rel=1e-5)


def test_jitter_flip_rolls_and_flips_and_clamp_keeps_the_valid_range():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    generator = torch.Generator().manual_seed(1)
    seen = set()
    for _ in range(40):
        view, (dy, dx, flipped) = jitter_flip(x, 2, True, generator)
        want = torch.roll(x, (dy, dx), (-2, -1))
        assert torch.equal(view, torch.flip(want, (-1,)) if flipped else want)
        assert -2 <= dy <= 2 and -2 <= dx <= 2
        seen.add(flipped)
    assert seen == {True, False}
    images = torch.randn(2, 3, 4, 4) * 5
    clamp_pixels(images, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    pixels = mimic.to_unit(images, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    low, high = mimic.pixel_bounds((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    assert torch.all(images >= low - 1e-6) and torch.all(images <= high + 1e-6)
    assert torch.allclose(mimic.from_unit(pixels, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)), images, atol=1e-5)


# ------------------------------------------------------------------------------------- labels
def test_labels_are_aligned_after_the_image_token_expansion():
    image = 99
    ids, labels = build_sequence([1, 5, image, 6, 7], [8, 9, 2], image, count=3)
    assert ids.tolist() == [1, 5, 99, 99, 99, 6, 7, 8, 9, 2]
    assert labels.tolist() == [IGNORE_LABEL] * 7 + [8, 9, 2]
    ids, labels = expand_image_tokens(torch.tensor([image, 4, 5]), image, 2, torch.tensor([7, 4, 5]))
    assert ids.tolist() == [99, 99, 4, 5] and labels.tolist() == [IGNORE_LABEL, IGNORE_LABEL, 4, 5]
    with pytest.raises(ValueError, match=r"^the prompt must hold exactly one image token \(id 99\); it holds 2$"):
        build_sequence([image, 1, image], [3], image, 4)
    with pytest.raises(ValueError, match=r"^the target answer has no token$"):
        build_sequence([image], [], image, 4)


def test_answer_loss_equals_transformers_own_loss_on_the_expanded_sequence(vlm):
    ids, labels = vlm.sequence("What is in the image?", "a red circle")
    assert int((ids == vlm.image_token_id).sum()) == vlm.num_image_tokens == 64
    answer = vlm.answer_ids("a red circle")
    assert vlm.answer_ids("a red circle", "What is in the image?") == answer  # together or alone: the same split
    assert labels[-len(answer):].tolist() == answer and bool((labels[:-len(answer)] == IGNORE_LABEL).all())
    assert ids[-len(answer):].tolist() == answer
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = vlm.model(input_ids=ids[None], pixel_values=pixels, labels=labels[None])
        ours = answer_loss(vlm_logits(vlm, pixels, ids[None]), labels[None])
    assert float(ours) == pytest.approx(float(out.loss), rel=1e-5)


def test_the_expansion_matches_transformers_llava_processor(vlm):
    """The processor's own expansion of the conversation text (prompt + answer; the end token is ours) is the
    sequence the labels are aligned with."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}),
        tokenizer=vlm.tokenizer, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        image_token="<image>",
    )
    text = vlm.prompt_text("What is in the image?") + " a red circle"
    expanded = processor(text=text, images=torch.zeros(3, 64, 64, dtype=torch.uint8), return_tensors="pt")["input_ids"][0]
    ids, labels = vlm.sequence("What is in the image?", "a red circle")
    assert ids.tolist() == expanded.tolist() + [vlm.tokenizer.eos_token_id]
    assert labels.tolist()[-4:] == ids.tolist()[-4:] and (labels[:-4] == IGNORE_LABEL).all()


# ------------------------------------------------------------------------------------- hooks, cache, optimization
def test_hooks_are_removed_after_a_run_and_the_model_equals_an_unhooked_copy(vlm, tmp_path):
    folder = _reference_folder(tmp_path / "refs", 2)
    statistics = reference_statistics(vlm, folder, None)
    prior = BatchNormPrior(build_cnn("tiny"))
    objective = MimicObjective(vlm, MimicWeights(), prior)
    tower = vision_tower(vlm.model)
    with FeatureStatistics(tower):
        assert _hooks(tower) == 3  # the patch embedding and the 2 blocks' MLPs
    result = synthesize(objective, "What is in the image?", "a red circle", SynthesisSettings(iterations=2, jitter=2),
                        statistics, generator=torch.Generator().manual_seed(0))
    assert set(result.history[0]) == {"sce", "base", "bn", "patch", "tv_l1", "tv_l2", "l2", "total"}
    assert _hooks(vlm.model) == 0 and _hooks(prior.cnn) == 0
    fresh = build_vlm("tiny")  # the same seeded weights, never hooked
    ids, _ = vlm.sequence("What is in the image?", "a red circle")
    with torch.no_grad():
        assert torch.equal(vlm_logits(vlm, result.normalized, ids[None]), vlm_logits(fresh, result.normalized, ids[None]))


def _reference_folder(folder, count, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (20 + 4 * i, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_reference_statistics_are_exact_cached_atomically_and_reloaded(vlm, tmp_path, monkeypatch):
    folder = _reference_folder(tmp_path / "refs", 3)
    cache = tmp_path / "cache"
    first = reference_statistics(vlm, folder, cache, batch_size=2)
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].name.startswith("featstats-") and files[0].suffix == ".pt"
    # exact over all tokens of all images: equal to the statistics of one batch of every image
    images = mimic.load_reference_images(folder, vlm.image_size)
    with FeatureStatistics(vision_tower(vlm.model)) as recorder, torch.no_grad():
        vision_tower(vlm.model)(mimic.from_unit(images, vlm.mean, vlm.std))
        direct = recorder.current()
    for (m, v), (dm, dv) in zip(first, direct):
        assert torch.allclose(m, dm, atol=1e-5) and torch.allclose(v, dv, atol=1e-5, rtol=1e-4)

    def fail(*args, **kwargs):
        raise AssertionError("recomputed instead of read from the cache")

    monkeypatch.setattr(mimic.statistics, "compute_reference_statistics", fail)
    again = reference_statistics(vlm, folder, cache)
    assert len(again) == len(first)
    for (m, v), (m2, v2) in zip(first, again):
        assert torch.equal(m, m2) and torch.equal(v, v2)
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]


def test_a_changed_folder_gets_a_new_cache_key(tmp_path):
    folder = _reference_folder(tmp_path / "refs", 2)
    key = statistics_cache_key("tiny", folder, 64)
    assert statistics_cache_key("tiny", folder, 64) == key
    assert statistics_cache_key("other", folder, 64) != key and statistics_cache_key("tiny", folder, 32) != key
    _reference_folder(tmp_path / "refs", 3, seed=1)  # one more image (and the others rewritten)
    changed = statistics_cache_key("tiny", folder, 64)
    assert changed != key
    (folder / "2.png").unlink()
    import os

    stat = (folder / "0.png").stat()
    os.utime(folder / "0.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same files, one touched
    assert statistics_cache_key("tiny", folder, 64) not in (key, changed)


def test_an_empty_reference_folder_is_named(vlm, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"reference-image folder .*empty holds no image \(\.jpg, \.jpeg, \.png, \.bmp, \.webp\)$"):
        reference_statistics(vlm, tmp_path / "empty", tmp_path / "cache")


def test_a_tiny_run_lowers_the_answer_loss(vlm):
    settings = SynthesisSettings(iterations=12, lr=0.25, lr_min=0.025, jitter=0, flip=False)
    result = synthesize(MimicObjective(vlm, SCE_ONLY), "What is in the image?", "a red circle", settings,
                        generator=torch.Generator().manual_seed(0))
    sce = [h["sce"] for h in result.history]
    assert sce[-1] < sce[0] - 0.03, sce
    assert result.images.min() >= 0 and result.images.max() <= 1
    # the returned images give the last loss's neighbourhood: recomputing the loss on them is below the start
    ids, labels = vlm.sequence("What is in the image?", "a red circle")
    with torch.no_grad():
        final = answer_loss(vlm_logits(vlm, result.normalized, ids[None]), labels[None])
    assert float(final) < sce[0] - 0.03


def test_a_learning_rate_floor_above_the_start_is_named(vlm):
    settings = SynthesisSettings(lr=0.1, lr_min=0.2)
    message = (r"^synthesis.lr_min must be at most the starting lr \(the cosine runs from lr down to lr_min\), "
               r"got lr=0.1, lr_min=0.2$")
    with pytest.raises(ValueError, match=message):
        settings.check()
    with pytest.raises(ValueError, match=message):
        synthesize(MimicObjective(vlm, SCE_ONLY), "What is in the image?", "a red circle", settings)
    assert SynthesisSettings(lr=0.1, lr_min=0.1).check().lr_min == 0.1


def test_the_synthesis_runs_without_lightning_and_is_seeded_by_its_generator():
    """The plain-function path (the package docstring's example): a fresh tiny VLM, no Trainer; the same
    generator seed gives the same images, another seed other images."""
    vlm = build_vlm("tiny")
    objective = MimicObjective(vlm, MimicWeights(), BatchNormPrior(build_cnn("tiny")))
    settings = SynthesisSettings(iterations=3, jitter=2, samples_per_target=2)
    runs = [synthesize(objective, "What is in the image?", "a red circle", settings,
                       generator=torch.Generator().manual_seed(seed)) for seed in (0, 0, 1)]
    assert runs[0].images.shape == (2, 3, 64, 64) and len(runs[0].history) == 3
    assert set(runs[0].history[0]) == {"sce", "bn", "patch", "tv_l1", "tv_l2", "l2", "total"}  # no references: no L_base
    assert torch.equal(runs[0].images, runs[1].images) and not torch.equal(runs[0].images, runs[2].images)
    # the returned images are the optimized normalized values mapped back to [0, 1]
    mean, std = torch.tensor(vlm.mean).view(3, 1, 1), torch.tensor(vlm.std).view(3, 1, 1)
    assert torch.allclose(runs[0].images, (runs[0].normalized * std + mean).clamp(0, 1))
    weighted = sum(getattr(MimicWeights(), name) * value for name, value in runs[0].history[-1].items() if name != "total")
    assert runs[0].history[-1]["total"] == pytest.approx(weighted, rel=1e-5)


def test_tiny_cnn_and_its_running_statistics_are_seeded():
    a, b = build_cnn("tiny"), build_cnn("tiny")
    assert isinstance(a, TinyBNCNN) and not a.training
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    with pytest.raises(ValueError, match=r"^CNN 'no_such_net'"):
        build_cnn("no_such_net")


def test_gradient_checkpointing_with_the_statistics_hooks_gives_the_same_images(vlm, tmp_path):
    """The backward pass of a checkpointed block re-runs its forward, hooks included: the hooks stay for the
    whole run (``MimicObjective.hooked``), and the result equals the run without checkpointing."""
    statistics = reference_statistics(vlm, _reference_folder(tmp_path / "refs", 2), None)
    settings = SynthesisSettings(iterations=2, jitter=1)
    plain = synthesize(MimicObjective(vlm, MimicWeights()), "What is in the image?", "a red circle", settings, statistics,
                       generator=torch.Generator().manual_seed(0))
    checkpointed = build_vlm("tiny")
    mimic.enable_checkpointing(checkpointed.model)
    with mimic.train_mode(checkpointed.model, True):
        result = synthesize(MimicObjective(checkpointed, MimicWeights()), "What is in the image?", "a red circle", settings,
                            statistics, generator=torch.Generator().manual_seed(0))
    assert not checkpointed.model.training and _hooks(checkpointed.model) == 0
    assert torch.allclose(result.normalized, plain.normalized, atol=1e-5)
    assert result.history[-1]["base"] == pytest.approx(plain.history[-1]["base"], rel=1e-5)


def test_a_saved_folder_loads_through_the_pretrained_path_to_the_same_model(vlm, tmp_path):
    """build_vlm(folder): the hub/folder path (config, model class, processor, image token, token count,
    normalization) on the tiny LLaVA saved with its processor gives the same sequence and logits."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64},
                                           image_mean=list(vlm.mean), image_std=list(vlm.std)),
        tokenizer=vlm.tokenizer, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        image_token="<image>",
    )
    vlm.model.save_pretrained(tmp_path / "llava")
    processor.save_pretrained(tmp_path / "llava")
    loaded = build_vlm(str(tmp_path / "llava"))
    assert (loaded.image_token_id, loaded.num_image_tokens, loaded.image_size, loaded.patch_size) == (
        vlm.image_token_id, vlm.num_image_tokens, vlm.image_size, vlm.patch_size)
    assert loaded.mean == pytest.approx(vlm.mean) and loaded.std == pytest.approx(vlm.std)
    ids, labels = loaded.sequence("What is in the image?", "a red circle")
    expected_ids, expected_labels = vlm.sequence("What is in the image?", "a red circle")
    assert torch.equal(ids, expected_ids) and torch.equal(labels, expected_labels)
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(vlm_logits(loaded, pixels, ids[None]), vlm_logits(vlm, pixels, ids[None]), atol=1e-5)
