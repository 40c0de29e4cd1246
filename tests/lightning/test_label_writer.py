"""Label-map and RGB PNGs: values and palette read back, atomic writes, and the callbacks under a CPU Trainer."""

import os
import re

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from grounding.data.label_maps import voc_palette
from grounding.lightning import label_writer
from grounding.lightning.label_writer import LabelMapWriter, RGBImageWriter, write_label_png, write_rgb_png


def test_write_label_png_reads_back_the_same_labels_and_palette(tmp_path):
    labels = torch.randint(0, 21, (9, 13))
    labels[0] = 255
    palette = torch.from_numpy(voc_palette(256))
    write_label_png(tmp_path / "x.png", labels, palette)
    with Image.open(tmp_path / "x.png") as image:
        assert image.mode == "P"
        assert np.array_equal(np.asarray(image), labels.numpy())
        assert np.array_equal(np.asarray(image.getpalette()).reshape(-1, 3)[:256], palette.numpy())
    short = torch.tensor([[0, 0, 0], [10, 20, 30]], dtype=torch.uint8)
    write_label_png(tmp_path / "short.png", np.array([[0, 1], [255, 1]]), short)
    with Image.open(tmp_path / "short.png") as image:
        colours = np.asarray(image.getpalette()).reshape(-1, 3)
        assert np.asarray(image).tolist() == [[0, 1], [255, 1]]
        assert colours[1].tolist() == [10, 20, 30] and colours[255].tolist() == [255, 255, 255]
    assert sorted(os.listdir(tmp_path)) == ["short.png", "x.png"]  # no temporary file left


def test_write_label_png_errors_and_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "x.png"
    with pytest.raises(ValueError, match=re.escape(f"label map for {path} holds label 2, outside the palette's 0..1 and not 255")):
        write_label_png(path, torch.tensor([[0, 2]]), torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=re.escape(f"label map for {path} must be (H, W) integers; got (1, 1, 2) float32")):
        write_label_png(path, np.zeros((1, 1, 2), dtype=np.float32), voc_palette(256))
    write_label_png(path, torch.zeros(3, 3, dtype=torch.long), voc_palette(256))
    before = path.read_bytes()

    def broken_save(self, target, *args, **kwargs):
        with open(target, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_label_png(path, torch.ones(3, 3, dtype=torch.long), voc_palette(256))
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["x.png"]


# ------------------------------------------------------------------------------------- the callback
MAPS = {"img_a": torch.arange(12).reshape(3, 4) % 3, "img_b": torch.full((5, 2), 2), "42": torch.tensor([[1, 255]])}


class TinySegmenter(L.LightningModule):
    """Returns the label maps of MAPS for the ids of its batches (a batch is a list of ids)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def test_step(self, batch, batch_idx):
        return {"image_ids": list(batch), "label_maps": [MAPS[i] for i in batch]}

    def predict_step(self, batch, batch_idx):
        return self.test_step(batch, batch_idx)


def run(stage, tmp_path, ids, writer):
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, callbacks=[writer], default_root_dir=tmp_path,
        enable_progress_bar=False, enable_model_summary=False,
    )
    loader = torch.utils.data.DataLoader(ids, batch_size=2, collate_fn=list)
    getattr(trainer, stage)(TinySegmenter(), dataloaders=loader)
    return trainer


@pytest.mark.parametrize("stage", ["test", "predict"])
def test_writer_writes_each_returned_map_once(stage, tmp_path, monkeypatch):
    written = []
    original = label_writer.write_label_png
    monkeypatch.setattr(label_writer, "write_label_png", lambda path, *a: (written.append(path.name), original(path, *a)))
    run(stage, tmp_path, ["img_a", "img_b", "42", "img_a"], LabelMapWriter())  # img_a repeated, as a sampler pads
    folder = tmp_path / "predictions" / "labels"  # no logger: the trainer's log_dir is default_root_dir
    assert sorted(written) == ["42.png", "img_a.png", "img_b.png"]
    assert sorted(os.listdir(folder)) == sorted(written)
    for image_id, labels in MAPS.items():
        with Image.open(folder / f"{image_id}.png") as image:
            assert image.mode == "P" and np.array_equal(np.asarray(image), labels.numpy())


def test_writer_out_dir_and_bad_outputs(tmp_path):
    run("predict", tmp_path, ["img_b"], LabelMapWriter(out_dir=str(tmp_path / "mine")))
    assert os.listdir(tmp_path / "mine") == ["img_b.png"]

    class Silent(TinySegmenter):
        def predict_step(self, batch, batch_idx):
            return {"label_maps": [MAPS[i] for i in batch]}

    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[LabelMapWriter()], default_root_dir=tmp_path,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match=re.escape(
        "LabelMapWriter needs test_step / predict_step to return a dict with 'image_ids' and 'label_maps';"
        " got dict with keys ['label_maps']"
    )):
        trainer.predict(Silent(), dataloaders=torch.utils.data.DataLoader(["img_a"], collate_fn=list))
    writer = LabelMapWriter(out_dir=str(tmp_path))
    writer._folder = tmp_path
    with pytest.raises(ValueError, match=re.escape("image id '../up' cannot be a file name")):
        writer.write({"image_ids": ["../up"], "label_maps": [MAPS["42"]]})


# ------------------------------------------------------------------------------------- RGB images
IMAGES = {"a": torch.randint(0, 256, (3, 4, 5), dtype=torch.uint8), "b": torch.randint(0, 256, (3, 2, 2), dtype=torch.uint8)}


class TinySynthesizer(TinySegmenter):
    def test_step(self, batch, batch_idx):
        return {"image_ids": list(batch), "images": [IMAGES[i] for i in batch]}


def test_rgb_writer_writes_each_image_once_in_its_folder_and_reads_back(tmp_path, monkeypatch):
    written = []
    original = label_writer.write_rgb_png
    monkeypatch.setattr(label_writer, "write_rgb_png", lambda path, image: (written.append(path.name), original(path, image)))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[RGBImageWriter(folder_name="mimic")],
                        default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False)
    trainer.test(TinySynthesizer(), dataloaders=torch.utils.data.DataLoader(["a", "b", "a"], batch_size=2, collate_fn=list))
    assert sorted(written) == ["a.png", "b.png"]
    for image_id, image in IMAGES.items():
        with Image.open(tmp_path / "predictions" / "mimic" / f"{image_id}.png") as picture:
            assert picture.mode == "RGB" and np.array_equal(np.asarray(picture).transpose(2, 0, 1), image.numpy())
    with pytest.raises(ValueError, match=re.escape("image for x.png must be (3, H, W) uint8; got (4, 4) uint8")):
        write_rgb_png("x.png", np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match=re.escape("image id '../up' cannot be a file name")):
        RGBImageWriter(folder_name="../up")
