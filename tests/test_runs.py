"""Runs as a user launches them: DDP training on 2 CPU processes, interruption by a signal, resuming.

- 2 gloo processes with batch 2 take the same steps as 1 process with batch 4 (same global batch): the same
  weights after training, within float tolerance.
- SIGTERM (or SIGUSR1) in the middle of training writes last.ckpt at the end of the current step and exits
  with 128 + signal; resuming from it gives the weights and metrics of the uninterrupted run.
- SIGUSR1 during evaluation exits non-zero and leaves no predictions file.
- A run whose output goes to a file logs plain progress lines.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .conftest import TEST_MODEL_CONFIG, run_in_process

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

#: the test model without its random layers (dropout, Swin's and the fusion layers' drop path, BERT's
#: dropout): two processes draw other random masks than one; the data and the gradient arithmetic are what
#: the DDP comparison checks
NO_DROPOUT = {
    **TEST_MODEL_CONFIG, "dropout": 0.0, "fusion_droppath": 0.0,
    "backbone_config": {**TEST_MODEL_CONFIG["backbone_config"], "drop_path_rate": 0.0},
    "text_config": {**TEST_MODEL_CONFIG["text_config"], "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
}


def train_args(root, save_dir, *extra, model_config=TEST_MODEL_CONFIG):
    return [
        "--data.synthetic_root", str(root), "--data.image_size", "96", "--data.max_size", "128", "--data.num_workers", "0",
        "--model.model_config", json.dumps(model_config), "--trainer.logger.init_args.save_dir", str(save_dir),
        "--trainer.accelerator", "cpu", "--validate_before_fit", "false", "--model.log_images", "false", *extra,
    ]


def run(script, args, cwd, expect=0, in_process=False):
    """``python SCRIPT ARGS`` in ``cwd``; ``in_process``: in this process (a DDP comparison's 1-process reference: no
    subprocess imports)."""
    if in_process:
        return run_in_process(script, args, cwd)
    result = subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == expect, result.stderr[-4000:]
    return result


def summary(result):
    return json.loads(result.stdout.strip().splitlines()[-1])


def weights(checkpoint):
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]


def test_ddp_training_on_two_processes_equals_one_process_with_the_same_global_batch(synthetic_root, tmp_path):
    """Without contrastive denoising: its group count follows the largest box count of each process's batch,
    so 2 processes draw other denoising queries than 1 (as in DINO); CDN under DDP is the next test's."""
    results = {}
    for devices, batch in ((1, 4), (2, 2)):
        result = run("train.py", train_args(
            synthetic_root, tmp_path / f"d{devices}", "--trainer.devices", str(devices),
            "--trainer.strategy", "ddp" if devices > 1 else "auto", "--data.batch_size", str(batch),
            "--trainer.max_epochs", "2", "--trainer.check_val_every_n_epoch", "1", "--trainer.precision", "64-true",
            "--model.denoising.number", "0", model_config=NO_DROPOUT,
        ), cwd=tmp_path, in_process=devices == 1)
        out = summary(result)
        results[devices] = (out, weights(Path(out["run_dir"]) / "checkpoints" / "last.ckpt"))
        # output captured (not a terminal): plain lines at each evaluation, once (rank 0), no progress bar
        assert result.stderr.count("[val] step 6 done in") == 1 and "it/s]" not in result.stderr
    (one, w1), (two, w2) = results[1], results[2]
    assert one["steps"] == two["steps"] == 6  # 12 images, global batch 4, 2 epochs
    assert w1.keys() == w2.keys()
    # float64, so that Adam's normalization cannot blow float32 rounding of near-zero gradients up to a visible
    # step (in float32 the largest difference is ~2e-5, on biases right before a GroupNorm, whose gradient is 0)
    largest = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert largest < 1e-9, largest
    start = initial_weights()
    moved = max((w1[k] - start[k].double()).abs().max().item() for k in w1)
    assert moved > 1e-3  # the weights did move: the agreement is not that of untrained copies
    for name in ("AP", "AP50", "AR100"):  # the validation of 5 images on 2 processes (one repeated copy)
        assert two["trained"][name] == pytest.approx(one["trained"][name], abs=1e-6)


def initial_weights(model_config=NO_DROPOUT, model="tiny", **kwargs):
    """The weights the runs start from: the CLI seeds everything with 0, then builds the model."""
    import lightning as L

    from grounding.lightning.image_module import ImageGroundingModule

    L.seed_everything(0, verbose=False)
    return ImageGroundingModule(model=model, model_config=model_config, **kwargs).state_dict()


def test_ddp_training_with_contrastive_denoising(synthetic_root, tmp_path, model="tiny"):
    """The demo's CDN on 2 processes: DDP finds no unused parameter (it would stop the run) and the denoising label
    table is trained. (MM-Grounding-DINO's parameters all get gradients too: tests/models/test_mm_grounding_dino.py;
    ``model="tiny-mm"`` runs this test on it, about 15 s more.)"""
    from grounding.models.denoising import DenoisingConfig

    out = summary(run("train.py", train_args(
        synthetic_root, tmp_path / "cdn", "--trainer.devices", "2", "--trainer.strategy", "ddp", "--data.batch_size", "2",
        "--trainer.max_epochs", "1", "--trainer.check_val_every_n_epoch", "1", "--model.denoising.number", "30",
        "--model.model", model,
    ), cwd=tmp_path))
    assert out["steps"] == 3  # 12 images, global batch 4
    trained = weights(Path(out["run_dir"]) / "checkpoints" / "last.ckpt")
    start = initial_weights(TEST_MODEL_CONFIG, model=model, denoising=DenoisingConfig(number=30))
    assert trained.keys() == start.keys()
    names = ["denoising.label_embedding.weight"]
    if model == "tiny-mm":
        names += ["detector.class_embed.0.bias", "detector.model.encoder_output_class_embed.bias"]
    for name in names:
        assert (trained[name] - start[name]).abs().max() > 1e-4, name


def start(script, args, cwd):
    return subprocess.Popen([sys.executable, str(REPO / script), *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def wait_for_line(process, marker, timeout=300):
    """Read stderr until a line containing ``marker``; returns the lines read."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        if marker in line:
            return lines
    raise AssertionError(f"no line with {marker!r}:\n" + "".join(lines[-30:]))


SIGNAL_RUN = ["--trainer.max_epochs", "3", "--trainer.check_val_every_n_epoch", "3", "--progress.every_n_steps", "1",
              "--progress.mode", "always"]


@pytest.fixture(scope="module")
def uninterrupted(synthetic_root, tmp_path_factory):
    """The run the interrupted and resumed ones are compared with (one for both signals)."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    reference = run("train.py", train_args(synthetic_root, folder / "ref", *SIGNAL_RUN), cwd=folder)
    assert "[train] step 1/9 epoch 1/3 loss" in reference.stderr  # plain progress lines in a captured log
    return summary(reference)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_writes_last_ckpt_exits_nonzero_and_resuming_equals_the_uninterrupted_run(
    synthetic_root, tmp_path, signum, uninterrupted
):
    process = start("train.py", train_args(synthetic_root, tmp_path / "cut", *SIGNAL_RUN), cwd=tmp_path)
    wait_for_line(process, "[train] step 4/9")  # in the middle of the second epoch
    process.send_signal(signum)
    _, rest = process.communicate(timeout=300)
    assert process.returncode == 128 + signum, rest[-3000:]
    checkpoint = next((tmp_path / "cut").rglob("last.ckpt"))
    interrupted_at = torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"]
    assert 4 <= interrupted_at < 9

    resumed = summary(run("train.py", train_args(synthetic_root, tmp_path / "resumed", *SIGNAL_RUN, "--ckpt_path", str(checkpoint)),
                          cwd=tmp_path))
    assert resumed["steps"] == uninterrupted["steps"] == 9
    final = weights(Path(uninterrupted["run_dir"]) / "checkpoints" / "last.ckpt")
    again = weights(Path(resumed["run_dir"]) / "checkpoints" / "last.ckpt")
    for name in final:
        torch.testing.assert_close(again[name], final[name], rtol=0, atol=1e-6, msg=name)
    assert resumed["trained"] == uninterrupted["trained"]


def test_a_signal_during_evaluation_exits_nonzero_and_writes_no_predictions(synthetic_root, tmp_path):
    args = [
        "--config", str(REPO / "configs" / "maskinversion" / "synthetic.yaml"), "--data.init_args.synthetic_root", str(synthetic_root),
        "--model.init_args.image_size", "64", "--model.init_args.inversion.iterations", "20", "--trainer.accelerator", "cpu",
        "--model.init_args.backbone_config", json.dumps({"vision_config": {"num_hidden_layers": 2, "image_size": 64}}),
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--progress.every_n_steps", "1", "--progress.mode", "always",
    ]
    process = start("eval.py", args, cwd=tmp_path)
    wait_for_line(process, "[test] batch 1/")
    process.send_signal(signal.SIGUSR1)
    _, rest = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGUSR1, rest[-3000:]
    assert not list((tmp_path / "runs").rglob("maskinversion_*.pt"))
