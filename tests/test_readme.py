"""The README's "Without Lightning" examples run as they stand, on a generated photo, and give what they say."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Without Lightning: a method on one image"


def examples() -> list[str]:
    """The ```python blocks of the README's "Without Lightning" section, in order."""
    text = README.read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.index("\n## ", start + len(SECTION))
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


@pytest.fixture()
def photo_folder(tmp_path):
    """A 70 x 100 photo: a red disc on the left, a blue square on the right, on grey."""
    pixels = np.full((70, 100, 3), 128, dtype=np.uint8)
    yy, xx = np.mgrid[:70, :100]
    pixels[(yy - 35) ** 2 + (xx - 25) ** 2 < 18 ** 2] = (220, 30, 30)
    pixels[20:50, 62:92] = (30, 40, 220)
    Image.fromarray(pixels).save(tmp_path / "photo.jpg", quality=95)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    yield tmp_path
    os.chdir(cwd)


def run(code: str) -> dict:
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(code, str(README), "exec"), namespace)
    return namespace


def test_the_section_has_one_example_per_test_time_method():
    found = examples()
    assert len(found) == 4
    for name in ("DenseSimilarity", "InvSeg(", "MaskInversion(", "synthesize("):
        assert sum(name in code for code in found) == 1, name


def test_gem_example(photo_folder):
    code = next(c for c in examples() if "DenseSimilarity" in c)
    ns = run(code)
    assert ns["maps"].shape == (2, 70, 100) and ns["labels"].shape == (70, 100)
    assert torch.equal(ns["labels"], ns["maps"].argmax(0))
    assert float(ns["maps"].abs().max()) <= 1 + 1e-5  # cosine similarities


def test_invseg_example(photo_folder):
    code = next(c for c in examples() if "InvSeg(" in c)
    ns = run(code)
    result = ns["result"]
    assert result.index.shape == (70, 100) and int(result.index.max()) < 3
    assert result.after.shape == (3, 16, 16) and len(result.losses) == 5


def test_maskinversion_example(photo_folder):
    code = next(c for c in examples() if "MaskInversion(" in c)
    ns = run(code)
    result, scores = ns["result"], ns["scores"]
    assert result.embeddings.shape == (2, ns["backbone"].embed_dim) and result.maps.shape == (2, 70, 100)
    assert scores.shape == (2, 2) and float(scores.abs().max()) <= 1 + 1e-5


def test_mimic_example(photo_folder):
    code = next(c for c in examples() if "synthesize(" in c)
    ns = run(code)
    images = ns["result"].images
    assert images.dim() == 4 and images.shape[1] == 3
    assert 0 <= float(images.min()) and float(images.max()) <= 1
