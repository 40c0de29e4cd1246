"""grounding-export: the command writes a folder transformers loads alone; bad input is one line and status 2;
the README's "Use it on your own images" examples run as they stand."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image

from grounding.export import main
from grounding.models.detector import GroundingDetector

from .models.test_detector import Marker, photo

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Use it on your own images"


@pytest.fixture(scope="module")
def checkpoint(trained_detector):
    return trained_detector.path


def error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("grounding-export: error: ")
    return lines[0]


def test_the_command_writes_a_folder_transformers_loads(checkpoint, tmp_path):
    executable = shutil.which("grounding-export") or pytest.fail("grounding-export is not installed (pip install -e .)")
    out = tmp_path / "exported"
    done = subprocess.run([executable, "--ckpt_path", str(checkpoint), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    original = GroundingDetector.from_checkpoint(checkpoint)
    assert summary["out"] == str(out) and summary["parameters"] == original.num_parameters > 0
    assert (summary["image_size"], summary["max_size"]) == (80, 120)
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer_config.json"} <= set(summary["files"])
    assert sorted(summary["files"]) == sorted(p.name for p in out.iterdir())
    assert [p.name for p in tmp_path.iterdir()] == ["exported"]
    # the folder alone gives the checkpoint's detections
    exported = GroundingDetector.from_pretrained(out)
    image = photo(72, 100)
    assert exported(image, classes=["red circle", "blue square"], box_threshold=0.0) == original(
        image, classes=["red circle", "blue square"], box_threshold=0.0)


def test_bad_input_is_one_line_and_status_2(checkpoint, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["--ckpt_path", str(tmp_path / "missing.ckpt"), "--out", out]) == 2
    assert "missing.ckpt: no such file" in error_line(capsys)

    other = torch.load(checkpoint, map_location="cpu", weights_only=False)
    other["hyper_parameters"]["_class_path"] = "grounding.lightning.maskinversion_module.MaskInversionModule"
    torch.save(other, tmp_path / "other.ckpt")
    assert main(["--ckpt_path", str(tmp_path / "other.ckpt"), "--out", out]) == 2
    assert "checkpoint of MaskInversionModule" in error_line(capsys)

    tampered = torch.load(checkpoint, map_location="cpu", weights_only=False)
    tampered["callbacks"] = {"marker": Marker()}
    torch.save(tampered, tmp_path / "tampered.ckpt")
    assert main(["--ckpt_path", str(tmp_path / "tampered.ckpt"), "--out", out]) == 2
    line = error_line(capsys)
    assert "tampered.ckpt" in line and "Marker" in line and "refusing to unpickle arbitrary objects" in line

    assert main(["--ckpt_path", str(checkpoint)]) == 2  # --out is required
    assert "--out" in error_line(capsys)
    assert not (tmp_path / "out").exists()

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert main(["--ckpt_path", str(checkpoint), "--out", out]) == 2
    assert "not empty" in error_line(capsys)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]
    assert main(["--ckpt_path", str(checkpoint), "--out", out, "--overwrite"]) == 0
    assert json.loads(capsys.readouterr().out)["out"] == out
    assert "notes.txt" not in os.listdir(out) and "model.safetensors" in os.listdir(out)


def test_readme_examples_run(checkpoint, tmp_path, monkeypatch):
    text = README.read_text(encoding="utf-8")
    start = text.index(SECTION)
    section = text[start:text.index("\n## ", start + len(SECTION))]
    python = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    bash = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    bash = [block for block in bash if block.startswith("grounding-export")]
    assert len(python) == 2 and len(bash) == 1
    (tmp_path / "RUN" / "checkpoints").mkdir(parents=True)
    shutil.copy(checkpoint, tmp_path / "RUN" / "checkpoints" / "last.ckpt")
    photo(70, 100).save(tmp_path / "photo.jpg", quality=95)
    monkeypatch.chdir(tmp_path)

    namespace: dict = {"__name__": "readme_example"}
    exec(compile(python[0], str(README), "exec"), namespace)
    [result] = namespace["records"]
    assert (result["image_id"], result["path"], result["width"], result["height"]) == ("photo", "photo.jpg", 100, 70)
    assert len(result["boxes"]) == len(result["scores"]) == len(result["labels"])
    assert set(result["labels"]) <= {"red circle", "blue square"}
    assert GroundingDetector.from_checkpoint(checkpoint)("photo.jpg", classes=["red circle", "blue square"], box_threshold=0.3)["boxes"] == result["boxes"]
    assert Image.open("photo_drawn.png").size == (100, 70)

    command = shlex.split(bash[0].split("#")[0])
    assert command[0] == "grounding-export"
    assert main(command[1:]) == 0
    namespace = {"__name__": "readme_example"}
    exec(compile(python[1], str(README), "exec"), namespace)
    assert isinstance(namespace["found"], list)
    assert all({"score", "label", "box"} <= set(entry) for entry in namespace["found"])
