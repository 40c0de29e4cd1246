"""Shared fixtures: a tiny synthetic dataset generated once per session, tiny models."""

from __future__ import annotations

import pytest
import torch

from grounding.data.synthetic import SyntheticConfig, generate

TINY_DATA = {"image_size": 96, "num_train": 12, "num_val": 5, "num_test": 4, "max_objects": 3, "seed": 3}

#: a smaller Grounding DINO than the demo model, for fast tests
TEST_MODEL_CONFIG = {
    "backbone_config": {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "window_size": 3},
    "text_config": {"hidden_size": 32, "intermediate_size": 64},
    "d_model": 32, "encoder_layers": 1, "decoder_layers": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
    "encoder_attention_heads": 2, "decoder_attention_heads": 2, "num_queries": 30, "max_text_len": 32,
}


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """Folder of a tiny synthetic dataset (96 px, 12/5/4 images)."""
    return generate(tmp_path_factory.mktemp("synthetic") / "data", SyntheticConfig(**TINY_DATA))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def trained_detector(synthetic_root, tmp_path_factory):
    """Two training steps of the test-sized detector, saved by the Trainer (``train_checkpoint``): ``.module``,
    ``.data``, ``.path``."""
    from .models.test_detector import train_checkpoint

    return train_checkpoint(synthetic_root, tmp_path_factory.mktemp("detector_run"))
