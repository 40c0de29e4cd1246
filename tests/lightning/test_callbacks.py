"""The callbacks every run gets: atomic checkpoint writes, last.ckpt timing, plain progress lines."""

import sys

import lightning as L
import pytest
import torch

from grounding.lightning.callbacks import AtomicCheckpointIO, LastCheckpoint, TextProgress


def test_a_failed_checkpoint_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 3}, path)
    with pytest.raises(Exception):  # an object torch.save cannot pickle: the write fails half-way
        io.save_checkpoint({"state_dict": {"w": torch.zeros(2)}, "bad": lambda: None}, path)
    assert torch.load(path, weights_only=False)["global_step"] == 3
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


class TinyModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader(n=12, batch=4):
    data = torch.utils.data.TensorDataset(torch.randn(n, 2))
    return torch.utils.data.DataLoader(data, batch_size=batch)


class Saves(L.Callback):
    """The global step of every last.ckpt write, read back from the file."""

    def __init__(self, last):
        self.last, self.steps = last, []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self._record()

    def on_train_epoch_end(self, trainer, module):
        self._record()

    def _record(self):
        if self.last.path.exists():
            step = torch.load(self.last.path, weights_only=False)["global_step"]
            if not self.steps or self.steps[-1] != step:
                self.steps.append(step)


def test_last_checkpoint_is_written_at_every_epoch_end_every_n_steps_and_at_the_end_of_fit(tmp_path):
    last = LastCheckpoint(dirpath=str(tmp_path), every_n_train_steps=2)
    saves = Saves(last)
    trainer = L.Trainer(max_steps=7, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[last, saves], accelerator="cpu")
    trainer.fit(TinyModule(), loader())
    # 3 steps per epoch: steps 2, 4 and 6 (every 2), 3 and 6 (epoch ends), 7 (max_steps ends fit mid-epoch:
    # Lightning still closes that epoch, and the end of fit finds the step already written)
    assert saves.steps == [2, 3, 4, 6, 7]
    assert torch.load(last.path, weights_only=False)["global_step"] == 7 == trainer.global_step


def test_progress_lines_are_plain_text_with_step_epoch_loss_speed_and_time_left(capsys):
    progress = TextProgress(every_n_steps=2, mode="always")
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[progress], accelerator="cpu")
    trainer.fit(TinyModule(), loader())
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[train]")]
    assert [line.split()[2] for line in lines] == ["2/6", "4/6", "6/6"]
    assert all("epoch " in line and " loss " in line and " img/s " in line and " left " in line for line in lines)
    assert lines[0].split()[4] == "1/2" and lines[-1].split()[4] == "2/2"  # epochs
    assert TextProgress(mode="auto").enabled == (not sys.stderr.isatty())
    with pytest.raises(ValueError, match=r"progress.mode must be one of \('auto', 'always', 'never'\), got 'loud'"):
        TextProgress(mode="loud")
