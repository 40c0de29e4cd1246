"""Weight-space ensembling: θ(α) = (1 − α) θ_zero-shot + α θ_fine-tuned, its checkpoints, its table, its errors."""

import csv
import json
import re
from pathlib import Path

import pytest
import torch

from .conftest import TEST_MODEL_CONFIG

from grounding.protocols import weight_ensemble as we


def _pair():
    """Two state dicts of the same layout: float32 / float16 weights differing, integer / bool buffers equal."""
    generator = torch.Generator().manual_seed(1)
    zero_shot = {
        "w": torch.randn(4, 3, generator=generator), "h": torch.randn(5, generator=generator).half(),
        "steps": torch.tensor([3, 7]), "mask": torch.tensor([True, False]),
    }
    finetuned = {
        "w": torch.randn(4, 3, generator=generator), "h": torch.randn(5, generator=generator).half(),
        "steps": torch.tensor([3, 7]), "mask": torch.tensor([True, False]),
    }
    return zero_shot, finetuned


def test_the_ends_are_the_two_models_and_the_middle_is_the_mean():
    zero_shot, finetuned = _pair()
    for alpha, expected in ((0, zero_shot), (0.0, zero_shot), (1, finetuned), (1.0, finetuned)):
        merged = we.interpolate_state_dicts(zero_shot, finetuned, alpha)
        assert merged.keys() == expected.keys()
        for key in expected:
            assert merged[key].dtype == expected[key].dtype and torch.equal(merged[key], expected[key]), (alpha, key)
    mean = we.interpolate_state_dicts(zero_shot, finetuned, 0.5)
    assert torch.equal(mean["w"], (zero_shot["w"] + finetuned["w"]) / 2)
    assert mean["h"].dtype == torch.float16
    assert torch.equal(mean["h"], ((zero_shot["h"].double() + finetuned["h"].double()) / 2).half())
    quarter = we.interpolate_state_dicts(zero_shot, finetuned, 0.25)
    reference = 0.75 * zero_shot["w"].double() + 0.25 * finetuned["w"].double()
    torch.testing.assert_close(quarter["w"], reference.float(), rtol=0, atol=1e-6)
    assert not torch.equal(quarter["w"], mean["w"])
    # integer / bool buffers are copied, not shared with the inputs
    for key in ("steps", "mask"):
        assert torch.equal(quarter[key], zero_shot[key]) and quarter[key].dtype == zero_shot[key].dtype
        assert quarter[key].data_ptr() != zero_shot[key].data_ptr()


def test_mismatched_state_dicts_are_errors_naming_the_key():
    zero_shot, finetuned = _pair()
    extra = dict(finetuned, extra=torch.zeros(1))
    del extra["w"]
    expected = ("the zero-shot and fine-tuned state dicts have different keys: only in the zero-shot model ['w'],"
                " only in the fine-tuned model ['extra']")
    with pytest.raises(ValueError, match=re.escape(expected)):
        we.interpolate_state_dicts(zero_shot, extra, 0.5)
    with pytest.raises(ValueError, match=re.escape("state dict entry 'w': shape (4, 3) in the zero-shot model, (3, 4) in the fine-tuned model")):
        we.interpolate_state_dicts(zero_shot, dict(finetuned, w=finetuned["w"].T.contiguous()), 0.5)
    with pytest.raises(ValueError, match=re.escape("state dict entry 'w': dtype torch.float32 in the zero-shot model, torch.float64 in the fine-tuned model")):
        we.interpolate_state_dicts(zero_shot, dict(finetuned, w=finetuned["w"].double()), 0.5)
    message = ("state dict entry 'steps': a torch.int64 tensor that differs between the zero-shot and fine-tuned models"
               " (only floating-point tensors are interpolated)")
    with pytest.raises(ValueError, match=re.escape(message)):
        we.interpolate_state_dicts(zero_shot, dict(finetuned, steps=torch.tensor([3, 8])), 0.0)
    with pytest.raises(ValueError, match=re.escape("state dict entry 'mask': a torch.bool tensor that differs")):
        we.interpolate_state_dicts(zero_shot, dict(finetuned, mask=torch.tensor([True, True])), 1.0)


@pytest.mark.parametrize("alpha", [-0.25, 1.5, float("nan"), True, "0.5"])
def test_a_ratio_outside_zero_one_is_an_error(alpha):
    zero_shot, finetuned = _pair()
    with pytest.raises(ValueError, match=re.escape(f"ratio alpha must be a number in [0, 1], got {alpha!r}")):
        we.interpolate_state_dicts(zero_shot, finetuned, alpha)


def test_ratios_and_benchmarks_are_checked_before_anything_is_written(tmp_path):
    benchmark = [we.Benchmark("val", [])]
    with pytest.raises(ValueError, match=re.escape("ratio alpha must be a number in [0, 1], got 1.1")):
        we.run(tmp_path / "missing.ckpt", "init", [0.0, 1.1], tmp_path / "out", benchmark)
    with pytest.raises(ValueError, match=re.escape("--ratios: 0.5 and 0.5 are the same ratio (alpha_0.5)")):
        we.run(tmp_path / "missing.ckpt", "init", [0.5, 0.5], tmp_path / "out", benchmark)
    with pytest.raises(ValueError, match=re.escape("--eval val: do not set --ckpt_path, the driver sets it")):
        we.run(tmp_path / "missing.ckpt", "init", [0.5], tmp_path / "out", [we.Benchmark("val", ["--ckpt_path", "x"])])
    with pytest.raises(ValueError, match=re.escape("--eval: benchmark names must differ, repeated: ['val']")):
        we.run(tmp_path / "missing.ckpt", "init", [0.5], tmp_path / "out", benchmark * 2)
    with pytest.raises(FileNotFoundError, match=re.escape(f"--finetuned: checkpoint not found: {tmp_path / 'missing.ckpt'}")):
        we.run(tmp_path / "missing.ckpt", "init", [0.5], tmp_path / "out", benchmark)
    assert not (tmp_path / "out").exists()


def test_the_command_line_gives_one_argument_list_per_benchmark():
    argv = ["--finetuned", "f.ckpt", "--zero-shot", "init", "--ratios", "0", "1", "--out", "o",
            "--eval", "coco", "--", "--config", "a.yaml", "--data.split", "val",
            "--eval", "aquarium", "--", "--data.val_images", "x", "--eval", "empty", "--"]
    ours, benchmarks = we.split_command_line(argv)
    assert ours == ["--finetuned", "f.ckpt", "--zero-shot", "init", "--ratios", "0", "1", "--out", "o"]
    assert [(b.name, b.args) for b in benchmarks] == [
        ("coco", ["--config", "a.yaml", "--data.split", "val"]), ("aquarium", ["--data.val_images", "x"]), ("empty", []),
    ]
    args = we.build_parser().parse_args(ours)
    assert args.ratios == [0.0, 1.0] and args.zero_shot == "init"
    with pytest.raises(ValueError, match=re.escape("expected --eval NAME -- <grounding-eval arguments>, got '--eval coco --config a.yaml'")):
        we.split_command_line(["--eval", "coco", "--config", "a.yaml"])
    with pytest.raises(SystemExit):
        we.main(["--finetuned", "f.ckpt", "--zero-shot", "init", "--out", "o"])  # no benchmark


def _fake_evaluate(calls):
    """grounding.cli.evaluate stand-in: AP = the mean of the checkpoint's "w", AP50 = AP + offset of the split."""

    def evaluate(args):
        calls.append(args)
        weights = torch.load(args[args.index("--ckpt_path") + 1], weights_only=False)["state_dict"]["w"]
        offset = 0.5 if "test" in args else 0.0
        return {"AP": float(weights.double().mean()), "AP50": None if "undefined" in args else float(weights.double().mean()) + offset}

    return evaluate


def test_checkpoints_and_table_from_fake_metrics(tmp_path):
    zero_shot, finetuned = _pair()
    hyper = {"model": "tiny", "lr": 1e-4}
    we.save_weights(tmp_path / "zs.ckpt", zero_shot, {})
    we.save_weights(tmp_path / "ft.ckpt", finetuned, {"hyper_parameters": hyper, "pytorch-lightning_version": "2.0.0"})
    calls = []
    benchmarks = [we.Benchmark("a", ["--data.split", "test"]), we.Benchmark("b", ["undefined"])]
    summary = we.run(tmp_path / "ft.ckpt", str(tmp_path / "zs.ckpt"), [0, 0.25, 1], tmp_path / "out", benchmarks,
                     evaluate=_fake_evaluate(calls))
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.ckpt")) == ["alpha_0.25.ckpt", "alpha_0.ckpt", "alpha_1.ckpt"]
    written = torch.load(out / "alpha_0.25.ckpt", weights_only=False)
    assert written["hyper_parameters"] == hyper and written["pytorch-lightning_version"] == "2.0.0"
    assert written["weight_ensemble"]["alpha"] == 0.25 and "optimizer_states" not in written
    assert torch.equal(torch.load(out / "alpha_1.ckpt", weights_only=False)["state_dict"]["w"], finetuned["w"])
    assert calls[0] == ["--data.split", "test", "--ckpt_path", str(out / "alpha_0.ckpt"),
                        "--trainer.logger.init_args.save_dir", str(out / "runs"), "--trainer.logger.init_args.name", "a",
                        "--trainer.logger.init_args.version", "alpha_0"]
    assert len(calls) == 6
    means = {alpha: float((1 - alpha) * zero_shot["w"].double().mean() + alpha * finetuned["w"].double().mean())
             for alpha in (0, 0.25, 1)}
    for row, alpha in zip(summary["rows"], (0, 0.25, 1)):
        assert row["alpha"] == alpha
        assert row["a"]["AP"] == pytest.approx(means[alpha], abs=1e-6)
        assert row["a"]["AP50"] == pytest.approx(means[alpha] + 0.5, abs=1e-6)
        assert row["b"]["AP"] == pytest.approx(means[alpha], abs=1e-6) and row["b"]["AP50"] is None
    markdown = (out / "table.md").read_text().splitlines()
    assert markdown[0] == "| alpha | a AP | a AP50 | b AP | b AP50 |"
    assert markdown[3] == f"| 0.25 | {means[0.25]:.4f} | {means[0.25] + 0.5:.4f} | {means[0.25]:.4f} | n/a |"
    assert len(markdown) == 5
    table = list(csv.DictReader((out / "table.csv").open()))
    assert [r["alpha"] for r in table] == ["0", "0.25", "1"]
    assert float(table[2]["a/AP50"]) == pytest.approx(means[1] + 0.5, abs=1e-6) and table[2]["b/AP50"] == ""


def test_a_failing_evaluation_names_the_benchmark(tmp_path):
    zero_shot, finetuned = _pair()
    we.save_weights(tmp_path / "ft.ckpt", finetuned, {})
    we.save_weights(tmp_path / "zs.ckpt", zero_shot, {})

    def exits(args):
        raise SystemExit(2)  # what the CLI does on a bad argument

    with pytest.raises(RuntimeError, match=re.escape("grounding-eval of benchmark 'coco' on ") + r".*alpha_0\.5\.ckpt failed \(exit status 2\)"):
        we.run(tmp_path / "ft.ckpt", str(tmp_path / "zs.ckpt"), [0.5], tmp_path / "out", [we.Benchmark("coco", [])], evaluate=exits)
    with pytest.raises(ValueError, match=re.escape(f"--zero-shot: {tmp_path / 'ft.ckpt.pt'} is not a Lightning checkpoint (no 'state_dict')")):
        torch.save({"weights": 1}, tmp_path / "ft.ckpt.pt")
        we.run(tmp_path / "ft.ckpt", str(tmp_path / "ft.ckpt.pt"), [0.5], tmp_path / "out", [we.Benchmark("coco", [])], evaluate=exits)


# ------------------------------------------------------------------------------------------------ end to end
def _args(root, save_dir, split="val"):
    return [
        "--data.synthetic_root", str(root), "--data.image_size", "96", "--data.max_size", "128", "--data.num_workers", "0",
        "--model.model_config", json.dumps(TEST_MODEL_CONFIG), "--trainer.logger.init_args.save_dir", str(save_dir),
        "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu", "--data.split", split,
    ]


@pytest.fixture(scope="module")
def models(synthetic_root, tmp_path_factory):
    """A fine-tuned checkpoint (2 training steps) and the untrained module of another seed saved as the zero-shot one."""
    from grounding.cli import train

    folder = tmp_path_factory.mktemp("ensemble")
    summary = train([*_args(synthetic_root, folder / "runs"), "--trainer.max_steps", "2", "--validate_before_fit", "false"])
    finetuned = Path(summary["run_dir"]) / "checkpoints" / "last.ckpt"
    template = torch.load(finetuned, map_location="cpu", weights_only=False)
    zero_shot = folder / "zero_shot.ckpt"
    we.save_weights(zero_shot, we.init_state_dict([*_args(synthetic_root, folder / "init"), "--seed_everything", "1"]), template)
    return folder, finetuned, zero_shot


@pytest.mark.slow
def test_ensembles_of_a_trained_model_match_direct_evaluation(models, synthetic_root, capsys):
    from grounding.cli import evaluate

    folder, finetuned, zero_shot = models
    out = folder / "wise"
    argv = ["--finetuned", str(finetuned), "--zero-shot", str(zero_shot), "--ratios", "0", "0.5", "1", "--out", str(out),
            "--eval", "val", "--", *_args(synthetic_root, folder / "x"), "--eval", "test", "--", *_args(synthetic_root, folder / "x", "test")]
    summary = we.main(argv)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
    states = {name: torch.load(path, weights_only=False)["state_dict"] for name, path in
              (("zs", zero_shot), ("ft", finetuned), (0, out / "alpha_0.ckpt"), (0.5, out / "alpha_0.5.ckpt"), (1, out / "alpha_1.ckpt"))}
    assert states["zs"].keys() == states["ft"].keys() == states[0.5].keys()
    assert any(not torch.equal(states["zs"][k], states["ft"][k]) for k in states["zs"])  # else the test tells nothing
    for key in states["ft"]:
        assert torch.equal(states[0][key], states["zs"][key]) and torch.equal(states[1][key], states["ft"][key]), key
        assert torch.equal(states[0.5][key], (states["zs"][key] + states["ft"][key]) / 2), key
    # the ends of the table are the two models evaluated directly: the same metrics and the same detections
    # (the tiny models' APs are near 0, so the detections are what tells the models apart)
    rows = {row["alpha"]: row for row in summary["rows"]}
    detections = {}
    for alpha, checkpoint in ((0.0, zero_shot), (1.0, finetuned)):
        for split in ("val", "test"):
            direct = evaluate([*_args(synthetic_root, folder / "direct", split), "--ckpt_path", str(checkpoint)])
            assert rows[alpha][split] == {"AP": direct["AP"], "AP50": direct["AP50"]}, (alpha, split)
            ensembled = json.loads((out / "runs" / split / we.ratio_name(alpha) / "predictions" / f"{split}.json").read_text())
            assert ensembled == json.loads((Path(direct["run_dir"]) / "predictions" / f"{split}.json").read_text()), (alpha, split)
            detections[alpha, split] = ensembled
    assert detections[0.0, "val"] != detections[1.0, "val"]
    assert (out / "runs" / "test" / "alpha_0.5").is_dir()
    from grounding.lightning.image_module import ImageGroundingModule  # the checkpoint is also a module's own

    loaded = ImageGroundingModule.load_from_checkpoint(out / "alpha_0.5.ckpt", map_location="cpu", weights_only=False)
    assert all(torch.equal(loaded.state_dict()[k], states[0.5][k]) for k in states[0.5])
    assert len((out / "table.csv").read_text().splitlines()) == 4


@pytest.mark.slow
def test_init_is_the_module_built_from_the_evaluation_arguments(models, synthetic_root, tmp_path):
    """``--zero-shot init`` with ``--seed_everything 1`` is the untrained module of seed 1 built directly, with
    the evaluation arguments' settings (here its denoising label table)."""
    from grounding.lightning.image_module import ImageGroundingModule
    from grounding.models.denoising import DenoisingConfig

    folder, finetuned, zero_shot = models
    torch.manual_seed(1)
    direct = ImageGroundingModule(model="tiny", model_config=TEST_MODEL_CONFIG, denoising=DenoisingConfig(number=7)).state_dict()
    calls = []
    args = [*_args(synthetic_root, tmp_path / "x"), "--seed_everything", "1", "--model.denoising.number", "7"]
    we.run(finetuned, "init", [0.0], tmp_path / "out", [we.Benchmark("val", args)], evaluate=lambda a: calls.append(a) or {})
    written = torch.load(tmp_path / "out" / "alpha_0.ckpt", weights_only=False)["state_dict"]
    assert written.keys() == direct.keys() and all(torch.equal(written[k], direct[k]) for k in direct)
    assert len(calls) == 1


def test_a_lora_checkpoint_is_ensembled_as_its_merged_weights(synthetic_root, tmp_path):
    """θ(1) of a LoRA run is its adapters merged: a plain module built as the evaluation builds it (its ARGS, the
    run's LoRA settings among them, then ``--model.lora null``) loads it strictly and each adapted layer's output
    is peft's; θ(0) is that plain module's own weights."""
    from grounding.cli import build_cli
    from grounding.models.lora import lora_layers

    args = _args(synthetic_root, tmp_path / "x")
    lora = ["--model.lora.r", "4", "--model.lora.alpha", "8"]
    adapted = build_cli([*args, *lora]).model.eval()  # no adapter dropout
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # trained adapters: B is zero at the start
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    we.save_weights(tmp_path / "lora.ckpt", adapted.state_dict(), {"hyper_parameters": dict(adapted.hparams)})
    calls = []
    we.run(tmp_path / "lora.ckpt", "init", [0.0, 1.0], tmp_path / "out", [we.Benchmark("val", [*args, *lora])],
           evaluate=lambda a: calls.append(a) or {})
    assert len(calls) == 2 and all(a[a.index("--ckpt_path") - 2:a.index("--ckpt_path")] == ["--model.lora", "null"] for a in calls)
    plain = build_cli([*args, *lora, "--model.lora", "null"]).model
    ends = {alpha: torch.load(tmp_path / "out" / f"alpha_{alpha}.ckpt", weights_only=False) for alpha in (0, 1)}
    assert ends[1]["hyper_parameters"]["lora"] is None
    assert all(torch.equal(ends[0]["state_dict"][k], v) for k, v in plain.state_dict().items())
    plain.load_state_dict(ends[1]["state_dict"], strict=True)
    layers = lora_layers(adapted)
    assert len(layers) > 10
    plain_modules = dict(plain.named_modules())
    for name, layer in layers.items():
        x = torch.randn(3, layer.base_layer.in_features, generator=generator)
        torch.testing.assert_close(plain_modules[name](x), layer(x), rtol=1e-5, atol=1e-5)
