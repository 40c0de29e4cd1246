"""``--model.freeze``: the parts and their module paths in both detector classes, the settings' checks and the
deprecated ``freeze_text_encoder``, no optimizer state for frozen weights, no autograd graph in a frozen backbone
(with IMAGE masking on), and DDP on 2 processes with frozen parts and gradient checkpointing."""

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from grounding.data.coco import collate_detection
from grounding.data.detection import CocoDetectionDataModule
from grounding.lightning.image_module import ImageGroundingModule
from grounding.models.adaptive_masking import MaskingConfig
from grounding.models.denoising import DenoisingConfig
from grounding.models.freezing import FREEZE_PARTS, freeze_parts, part_parameters, resolve_freeze
from grounding.models.grounding_dino import build_grounding_dino

from ..conftest import TEST_MODEL_CONFIG

REPO = Path(__file__).resolve().parents[2]
SWIN = "model.backbone.conv_encoder.model."


def make_module(name="tiny", **kwargs):
    torch.manual_seed(0)
    settings = dict(model=name, model_config=TEST_MODEL_CONFIG, masking=MaskingConfig(variant="rf_gam"), log_images=False)
    return ImageGroundingModule(**{**settings, **kwargs})


@pytest.fixture(scope="module")
def batch(synthetic_root):
    data = CocoDetectionDataModule(synthetic_root=str(synthetic_root), image_size=96, max_size=128, batch_size=2, num_workers=0)
    data.setup("fit")
    return data.categories, collate_detection([data.datasets["train"][i] for i in range(2)])


def starts(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


# ------------------------------------------------------------------------------------------- the parts
@pytest.mark.parametrize("name", ["tiny", "tiny-mm"])
def test_each_part_holds_its_documented_modules_in_both_classes(name):
    model, _ = build_grounding_dino(name, TEST_MODEL_CONFIG)
    names = {n for n, _ in model.named_parameters()}
    found = {part: set(part_parameters(model, part)) for part in FREEZE_PARTS}
    assert found["backbone"] == {n for n in names if n.startswith("model.backbone.")}
    assert found["text_encoder"] == {n for n in names if n.startswith("model.text_backbone.")}
    assert found["input_projection"] == {n for n in names if starts(n, "model.input_proj_vision", "model.text_projection")}
    assert found["encoder"] == found["feature_enhancer"] == {n for n in names if starts(n, "model.encoder", "model.level_embed")}
    decoder = {n for n in names if starts(n, "model.decoder.layers", "model.decoder.layer_norm",
                                            "model.decoder.reference_points_head", "model.query_position_embeddings")}
    assert found["decoder"] == decoder and all(".bbox_embed." not in n and ".class_embed." not in n for n in decoder)
    # Swin's stage k is encoder.layers[k-1]; the stages feeding a level (2, 3, 4 here) bring their output norm
    stages2 = {n for n in names if starts(n, SWIN + "swin.embeddings", SWIN + "swin.encoder.layers.0",
                                          SWIN + "swin.encoder.layers.1", SWIN + "hidden_states_norms.stage2")}
    assert found["backbone_stages:2"] == stages2
    assert found["backbone_stages:1"] < stages2 < found["backbone_stages:3"] < found["backbone_stages:4"] < found["backbone"]
    assert found["backbone"] - found["backbone_stages:4"] == {SWIN + "swin.layernorm.weight", SWIN + "swin.layernorm.bias"}
    # the parts do not overlap, and what no part holds is the heads: they always train
    own = ["backbone", "text_encoder", "input_projection", "encoder", "decoder"]
    assert sum(len(found[p]) for p in own) == len(set().union(*(found[p] for p in own)))
    rest = names - set().union(*(found[p] for p in own))
    assert rest and all(starts(n, "bbox_embed", "class_embed", "model.enc_output", "model.enc_output_norm",
                                   "model.encoder_output_bbox_embed", "model.encoder_output_class_embed",
                                   "model.decoder.class_embed", "model.decoder.bbox_embed") for n in rest), rest


def test_settings_resolve_to_parts_with_aliases_and_the_deprecated_flag():
    assert resolve_freeze(None) == ["text_encoder"]  # the default: the paper's
    assert resolve_freeze([]) == []
    assert resolve_freeze(["feature_enhancer", "encoder", "decoder"]) == ["encoder", "decoder"]
    assert resolve_freeze(["backbone_stages:1", "backbone_stages:3"]) == ["backbone_stages:3"]
    assert resolve_freeze(["backbone_stages:2", "backbone", "text_encoder"]) == ["backbone", "text_encoder"]
    with pytest.warns(FutureWarning, match=r"freeze_text_encoder is deprecated; use model.freeze: \[text_encoder\]"):
        assert resolve_freeze(None, True) == ["text_encoder"]
    with pytest.warns(FutureWarning, match=r"use model.freeze: \[\]"):
        assert resolve_freeze(None, False) == []
    with pytest.warns(FutureWarning):
        assert resolve_freeze(["backbone"], True) == ["backbone", "text_encoder"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_freeze(["backbone"])  # no warning without the old flag
    with pytest.raises(ValueError, match=r"freeze_text_encoder=false contradicts model.freeze=\['text_encoder'\]"):
        resolve_freeze(["text_encoder"], False)
    with pytest.raises(ValueError, match=r"model.freeze: unknown part 'swin'; the parts are backbone, backbone_stages:1"):
        resolve_freeze(["swin"])
    with pytest.raises(ValueError, match=r"must be a list of parts \(e.g. \['backbone'\]\)"):
        resolve_freeze("backbone")
    model, _ = build_grounding_dino("tiny", {**TEST_MODEL_CONFIG, "backbone_config": {
        **TEST_MODEL_CONFIG["backbone_config"], "depths": [1, 1, 1], "num_heads": [1, 1, 2], "out_features": ["stage2", "stage3"]}})
    with pytest.raises(ValueError, match="backbone_stages:4 asks for 4 stages, the model's Swin has 3"):
        part_parameters(model, "backbone_stages:4")


def test_the_deprecated_flag_still_builds_old_checkpoints_settings():
    """Checkpoints written before ``freeze`` hold ``freeze_text_encoder`` (true by default) in their hyper-parameters."""
    with pytest.warns(FutureWarning, match="freeze_text_encoder is deprecated"):
        old = make_module(freeze_text_encoder=True)
    assert old.frozen_parts == ["text_encoder"]
    assert not any(p.requires_grad for p in old.detector.model.text_backbone.parameters())
    with pytest.warns(FutureWarning):
        trained = make_module(freeze_text_encoder=False)
    assert trained.frozen_parts == [] and all(p.requires_grad for p in trained.detector.model.text_backbone.parameters())
    assert make_module().frozen_parts == ["text_encoder"]


def test_the_command_line_checks_the_parts_and_the_shipped_configs_use_the_setting(synthetic_root, tmp_path, capsys):
    import yaml

    from grounding.cli import build_cli

    base = ["--model.model_config", json.dumps(TEST_MODEL_CONFIG), "--trainer.accelerator", "cpu", "--trainer.logger", "false",
            "--data.synthetic_root", str(synthetic_root)]
    cli = build_cli([*base, "--model.freeze", "[backbone_stages:2, feature_enhancer]", "--model.gradient_checkpointing", "true"])
    assert cli.model.frozen_parts == ["backbone_stages:2", "encoder"] and cli.model.hparams.gradient_checkpointing is True
    with pytest.raises(SystemExit) as error:
        build_cli([*base, "--model.freeze", "[backbone, text_encodr]"])
    assert error.value.code == 2
    message = capsys.readouterr().err
    assert "--model.freeze" in message and "'text_encodr'" in message and "'text_encoder'" in message
    expected = {"coco.yaml": ["text_encoder"], "synthetic.yaml": [], "synthetic_grounding.yaml": []}
    for name, parts in expected.items():
        settings = yaml.safe_load((REPO / "configs" / "image" / name).read_text())["model"]["init_args"]
        assert settings["freeze"] == parts and "freeze_text_encoder" not in settings, name


# ------------------------------------------------------------------------------------------- optimizer
def test_frozen_parts_get_no_optimizer_state_and_stay_bit_identical(batch):
    categories, data = batch
    module = make_module(freeze=["backbone", "text_encoder", "decoder"], denoising=DenoisingConfig(number=10), lr=1e-3)
    module.set_categories(categories)
    optimizer = module.configure_optimizers()
    in_groups = [p for group in optimizer.param_groups for p in group["params"]]
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert len(in_groups) == len({id(p) for p in in_groups})  # each parameter in one group, once
    assert {id(p) for p in in_groups} == {id(p) for p in trainable}
    assert {g["name"] for g in optimizer.param_groups} == {"rest", "denoising"}  # no backbone / text encoder group left
    frozen = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    assert any(n.startswith("detector.model.decoder.layers.") for n in frozen)
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    module.training_step(data, 0).backward()
    optimizer.step()
    for name, parameter in module.named_parameters():
        if name in frozen:
            assert torch.equal(parameter, frozen[name]) and parameter.grad is None, name
            assert parameter not in optimizer.state, name
    assert len(optimizer.state) == len(trainable)
    moved = [n for n, p in module.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert len(moved) > 0.9 * len(before)


@pytest.mark.parametrize("name", ["tiny", "tiny-mm"])
def test_every_trainable_parameter_still_gets_a_gradient_whatever_is_frozen(batch, name):
    """What DDP needs without find_unused_parameters, part by part, with masking and denoising on."""
    categories, data = batch
    module = make_module(name, freeze=[], denoising=DenoisingConfig(number=10))
    module.set_categories(categories)
    trainable = [p for p in module.parameters() if p.requires_grad]
    # the backbone's parts: test_a_frozen_backbone_builds_no_graph...; tiny-mm: its own class heads sit by the decoder
    for part in ["text_encoder", "input_projection", "encoder", "decoder"] if name == "tiny" else ["decoder"]:
        for parameter in trainable:
            parameter.requires_grad_(True)
        frozen = {"detector." + n for n in freeze_parts(module.detector, [part])}
        assert frozen
        module.zero_grad(set_to_none=True)
        module.training_step(data, 0).backward()
        missing = {n for n, p in module.named_parameters() if p.requires_grad and p.grad is None}
        assert missing == set(), (part, missing)
        assert all(p.grad is None for n, p in module.named_parameters() if n in frozen)


# ------------------------------------------------------------------------------------------- no graph
def saved_bytes_by_region(module, data, regions):
    """Bytes autograd saves for the backward pass while each of ``regions`` (name -> submodule) runs, and in all."""
    inside, saved = [], {name: 0 for name in regions}
    saved["all"] = 0
    hooks = []
    for name, sub in regions.items():
        hooks.append(sub.register_forward_pre_hook(lambda m, a: inside.append(m.region)))
        hooks.append(sub.register_forward_hook(lambda m, a, o: inside.remove(m.region)))
        sub.region = name

    def pack(tensor):
        size = tensor.numel() * tensor.element_size()
        saved["all"] += size
        for name in set(inside):
            saved[name] += size
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = module.training_step(data, 0)
    for hook in hooks:
        hook.remove()
    return loss, saved


def test_a_frozen_backbone_builds_no_graph_while_masking_and_the_other_gradients_are_unchanged(batch):
    """IMAGE masks the projections of the backbone's maps (after it, from detached importances): a frozen backbone
    stores nothing for backward, the masks are still made, and every other parameter gets the gradient it gets
    when the backbone trains. With the first 2 stages frozen, only stages 3 and 4 store activations. (In float64:
    in float32 a layer's kernels differ with and without autograd by rounding, which the conv biases before a
    GroupNorm, whose exact gradient is 0, blow up.)"""
    categories, data = batch
    data = dict(data, pixel_values=data["pixel_values"].double(),
                targets=[dict(t, boxes=t["boxes"].double()) for t in data["targets"]])
    grads, saved = {}, {}
    for freeze in ([], ["backbone"], ["backbone_stages:2"]):
        module = make_module(freeze=freeze).double()
        module.set_categories(categories)
        swin = module.detector.model.backbone.conv_encoder.model.swin
        regions = {"backbone": module.detector.model.backbone, "stage1": swin.encoder.layers[0], "stage2": swin.encoder.layers[1], "stage3": swin.encoder.layers[2]}
        module.masking.last_masks.clear()
        torch.manual_seed(1)
        loss, saved[tuple(freeze)] = saved_bytes_by_region(module, data, regions)
        assert len(module.masking.last_masks) == 4  # every level masked
        loss.backward()
        grads[tuple(freeze)] = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
        assert grads[tuple(freeze)].keys() == {n for n, p in module.named_parameters() if p.requires_grad}
    full, frozen, stages = saved[()], saved[("backbone",)], saved[("backbone_stages:2",)]
    assert full["backbone"] > 0 and frozen["backbone"] == 0 and frozen["all"] < full["all"]
    assert stages["stage1"] == stages["stage2"] == 0 and stages["stage3"] > 0 and stages["backbone"] > 0
    assert full["stage1"] > 0 and full["stage2"] > 0
    scale = max(g.abs().max().item() for g in grads[()].values())
    for freeze in (("backbone",), ("backbone_stages:2",)):
        assert grads[freeze].keys() < grads[()].keys()
        for name, grad in grads[freeze].items():
            torch.testing.assert_close(grad, grads[()][name], rtol=1e-9, atol=1e-12 * scale, msg=name)


# ------------------------------------------------------------------------------------------- DDP
def _ddp_worker(rank, init_file, out_file, root):
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        data = CocoDetectionDataModule(synthetic_root=root, image_size=96, max_size=128, batch_size=2, num_workers=0)
        data.setup("fit")
        module = make_module(freeze=["backbone_stages:2", "decoder"], gradient_checkpointing=True,
                             denoising=DenoisingConfig(number=10), lr=1e-3)
        module.set_categories(data.categories)

        class Step(torch.nn.Module):  # DDP runs forward(); the module's training step is the forward here
            def __init__(self):
                super().__init__()
                self.module = module

            def forward(self, batch):
                return self.module.training_step(batch, 0)

        model = DistributedDataParallel(Step())  # find_unused_parameters=False: a parameter without gradient fails
        optimizer = module.configure_optimizers()
        for step in range(2):
            batch = collate_detection([data.datasets["train"][i] for i in (2 * rank + 4 * step, 2 * rank + 4 * step + 1)])
            model(batch).backward()
            optimizer.step()
            optimizer.zero_grad()
        if rank == 0:
            torch.save({n: p.detach() for n, p in module.named_parameters()}, out_file)
        dist.barrier()
        if rank == 1:
            mine = {n: p.detach() for n, p in module.named_parameters()}
            theirs = torch.load(out_file)
            assert all(torch.equal(mine[n], theirs[n]) for n in mine), "the processes' weights differ"
            torch.save({"ok": True, "weights": theirs}, out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_with_frozen_parts_and_checkpointing_on_two_processes(synthetic_root, tmp_path):
    """2 gloo processes, 2 steps each: DDP without find_unused_parameters finds every trainable parameter's gradient
    (it raises at the second step otherwise), the processes end with equal weights, the frozen ones unchanged."""
    out = tmp_path / "out.pt"
    mp.start_processes(_ddp_worker, args=(str(tmp_path / "init"), str(out), str(synthetic_root)), nprocs=2, join=True,
                       start_method="spawn")
    result = torch.load(out)
    assert result["ok"]
    start = make_module(freeze=["backbone_stages:2", "decoder"], denoising=DenoisingConfig(number=10))
    frozen = {n for n, p in start.named_parameters() if not p.requires_grad}
    assert any(".decoder.layers." in n for n in frozen) and any(".swin.encoder.layers.1." in n for n in frozen)
    changed = {n for n, p in start.named_parameters() if not torch.equal(p.detach(), result["weights"][n])}
    assert not changed & frozen
    assert len(changed) > 0.9 * (len(result["weights"]) - len(frozen))
