"""CLIPScore against the cosine of the CLIP embeddings, LPIPS diversity against the pairwise distances."""

import sys

import numpy as np
import pytest
import torch

from grounding.metrics.image_scores import clip_score, load_lpips, lpips_diversity


def test_clip_score_equals_the_cosine_of_the_clip_embeddings():
    from grounding.models.clip import build_clip

    clip = build_clip("tiny", image_size=32)
    images = torch.rand(2, 3, 40, 40)
    scores = clip_score(clip, images, ["a red circle", "a blue square"])
    with torch.no_grad():
        for i, text in enumerate(["a red circle", "a blue square"]):
            a = clip.encode_image(clip.preprocess(images[i]))[0]
            b = clip.encode_text([text])[0]
            cosine = float(a @ b / (a.norm() * b.norm()))
            assert float(scores[i]) == pytest.approx(100 * max(cosine, 0.0), abs=1e-4)


def test_lpips_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", None)
    with pytest.raises(ImportError, match=r"^LPIPS diversity needs the optional package lpips: pip install lpips "
                                          r"\(or leave model.scoring.lpips_diversity false\)$"):
        load_lpips()


def test_lpips_diversity_is_the_mean_pairwise_distance():
    pytest.importorskip("lpips")
    distance = load_lpips(pretrained_backbone=False)
    images = torch.rand(3, 3, 32, 32)
    same = lpips_diversity(distance, images[:1].expand(2, -1, -1, -1))
    assert same == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        pairs = [float(distance(images[i:i + 1] * 2 - 1, images[j:j + 1] * 2 - 1)) for i, j in ((0, 1), (0, 2), (1, 2))]
    assert lpips_diversity(distance, images) == pytest.approx(np.mean(pairs), rel=1e-5)
    with pytest.raises(ValueError, match=r"^LPIPS diversity needs at least 2 samples of a concept "
                                         r"\(model.synthesis.samples_per_target >= 2\)$"):
        lpips_diversity(distance, images[:1])
