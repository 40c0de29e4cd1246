"""The MaskInversion LightningModule under the Trainer, on the synthetic dataset."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from grounding.data.regions import RegionDataModule
from grounding.lightning.maskinversion_module import MaskInversionModule
from grounding.metrics.retrieval import top1_correct
from grounding.models.maskinversion import MaskInversionSettings

SMALL = {"vision_config": {"num_hidden_layers": 2, "image_size": 64}, "text_config": {"num_hidden_layers": 1}}


def _module(**kwargs):
    settings = {"backbone_config": SMALL, "image_size": 64, "inversion": MaskInversionSettings(iterations=3),
                "log_regions": 2} | kwargs
    return MaskInversionModule(**settings)


def _trainer(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    return L.Trainer(
        accelerator="cpu", devices=1, logger=TensorBoardLogger(str(tmp_path), name="mi"), enable_progress_bar=False,
        enable_model_summary=False,
    )


@pytest.fixture(scope="module")
def class_run(synthetic_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mi_class")
    module = _module()
    data = RegionDataModule(format="synthetic", synthetic_root=str(synthetic_root), task="class", split="val")
    trainer = _trainer(folder)
    metrics = trainer.test(module, datamodule=data, verbose=False)[0]
    return module, data, trainer, metrics


def test_class_protocol_reports_every_method_and_saves_the_embeddings(class_run):
    module, data, trainer, metrics = class_run
    assert {f"test/acc1_{m}" for m in ("maskinversion", "global", "crop", "masked_crop", "red_circle")} <= set(metrics)
    regions = data.dataset.num_regions
    assert metrics["test/regions"] == regions
    saved = torch.load(f"{trainer.log_dir}/predictions/maskinversion_val.pt", weights_only=True)  # plain values only
    assert saved["settings"]["inversion"]["iterations"] == 3
    assert len(saved["keys"]) == regions == saved["embeddings"].shape[0]
    assert saved["embeddings"].shape[1] == module.backbone.embed_dim
    assert set(saved["baselines"]) == {"global", "crop", "masked_crop", "red_circle"}
    # the logged accuracy, recomputed from the saved embeddings and the class prompts
    text = module.backbone.encode_text([f"a photo of a {n}." for n in data.class_names])
    names = {}
    for sample in data.dataset:
        for region, name in zip(sample["region_ids"], sample["class_names"]):
            names[f"{sample['image_id']}/{region}"] = name
    targets = [[data.class_names.index(names[k])] for k in saved["keys"]]
    for method, embeddings in {"maskinversion": saved["embeddings"], **saved["baselines"]}.items():
        expected = top1_correct(embeddings, text, targets).float().mean().item()
        assert metrics[f"test/acc1_{method}"] == pytest.approx(expected, abs=1e-6), method


def test_saved_lets_equal_a_direct_maskinversion_call(class_run):
    module, data, trainer, _ = class_run
    saved = torch.load(f"{trainer.log_dir}/predictions/maskinversion_val.pt", weights_only=False)
    sample = data.dataset[0]
    direct = module.inverter(sample["image"], sample["masks"]).embeddings
    rows = [saved["keys"].index(f"{sample['image_id']}/{r}") for r in sample["region_ids"]]
    torch.testing.assert_close(saved["embeddings"][rows], direct, rtol=1e-5, atol=1e-6)


def test_maps_before_and_after_go_to_tensorboard(class_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, _, trainer, _ = class_run
    events = EventAccumulator(trainer.log_dir)
    events.Reload()
    images = [t for t in events.Tags()["images"] if t.startswith("maskinversion/")]
    assert len(images) == 2  # log_regions
    image = events.Images(images[0])[0]
    # image | mask | map before | map after: square synthetic images enlarged to 512 px, 4 px gaps, a title strip
    assert image.width == 4 * 512 + 3 * 4 and image.height > 512


def test_referring_protocol_uses_the_image_expressions(synthetic_root, tmp_path):
    module = _module(protocol="referring", methods=["maskinversion", "global"])
    assert module.inverter.alpha == 5.0  # the referring protocol's default
    data = RegionDataModule(format="synthetic", synthetic_root=str(synthetic_root), task="referring", split="val")
    metrics = _trainer(tmp_path).test(module, datamodule=data, verbose=False)[0]
    assert 0.0 <= metrics["test/acc1_maskinversion"] <= 1.0
    samples = [data.dataset[i] for i in range(len(data.dataset))]
    scored = sum(len([e for e in s["expressions"] if e]) for s in samples)
    assert metrics["test/regions"] == scored
    # the global embedding is the same for all regions of an image, so it picks one expression per image:
    # right for at most the regions that share that expression
    bound = 0
    for s in samples:
        counts = {}
        for expressions in s["expressions"]:
            for e in set(expressions):
                counts[e] = counts.get(e, 0) + 1
        bound += max(counts.values(), default=0)
    assert round(metrics["test/acc1_global"] * scored) <= bound < scored


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match=r"model.methods must be a non-empty list"):
        _module(methods=["maskinversion", "sam"])
    with pytest.raises(ValueError, match="model.template must contain"):
        _module(template="a photo")
    with pytest.raises(ValueError, match=r"model.inversion.mode must be one of \('decomposed', 'naive'\), got 'fast'"):
        _module(inversion=MaskInversionSettings(mode="fast"))


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--model.protocol", "captioning", r"model.protocol[\s\S]*Literal\['class', 'referring'\]. Got value: captioning"),
        ("--model.methods", "[maskinversion, sam]", r"model.methods[\s\S]*sam"),
        ("--model.inversion.optimizer", "lbfgs", r"model.inversion.optimizer[\s\S]*Literal\['adamw', 'adam', 'sgd'\]"),
        ("--model.inversion.iterations", "-2", r"model.inversion.iterations[\s\S]*NonNegativeInt"),
    ],
)
def test_the_parser_rejects_a_setting_outside_its_type(flag, value, message):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(MaskInversionModule, "model")
    assert parser.parse_args(["--model.inversion.iterations", "4"]).model.inversion.iterations == 4
    with pytest.raises(Exception, match=message):
        parser.parse_args([flag, value])


def test_predict_returns_and_saves_the_embeddings(synthetic_root, tmp_path):
    module = _module(methods=["maskinversion", "crop"])
    data = RegionDataModule(format="synthetic", synthetic_root=str(synthetic_root), task="class", split="test")
    trainer = _trainer(tmp_path)
    batches = trainer.predict(module, datamodule=data)
    outputs = [item for batch in batches for item in batch]
    saved = torch.load(f"{trainer.log_dir}/predictions/maskinversion_test.pt", weights_only=False)
    keys = [f"{o['image_id']}/{r}" for o in outputs for r in o["region_ids"]]
    assert saved["keys"] == keys and len(keys) == data.dataset.num_regions
    torch.testing.assert_close(saved["embeddings"], torch.cat([o["embeddings"]["maskinversion"] for o in outputs]))
    assert set(saved["baselines"]) == {"crop"}
