"""Evaluate a method: IMAGE (COCO box AP of a Grounding DINO checkpoint) or MaskInversion (region retrieval).

    python eval.py --config RUN/config.yaml --ckpt_path RUN/checkpoints/last.ckpt [--split test]
    python eval.py --config configs/image/coco.yaml \
        --data.val_annotations ODINW/valid/_annotations.coco.json --data.val_images ODINW/valid   # zero-shot
    python -m grounding.protocols.odinw --root data/odinw -- --config configs/image/coco.yaml   # ODinW-13
    python eval.py --config configs/maskinversion/synthetic.yaml      # MaskInversion, synthetic class masks
    python eval.py --config configs/maskinversion/refcoco.yaml        # RefCOCO referring-expression retrieval

Prints one JSON line with the metrics. MaskInversion runs ``Trainer.test`` over the region DataModule's
split (``--data.split``) and writes the region embeddings to ``RUN/predictions/maskinversion_<split>.pt``.
"""

from grounding.cli import finish_distributed, grounding_cli, metrics_line, print_json
from grounding.lightning.maskinversion_module import MaskInversionModule


def main(args: list[str] | None = None) -> dict:
    cli = grounding_cli(args)
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    split = cli.config.split
    if isinstance(model, MaskInversionModule):
        split = data.hparams.split
        metrics = metrics_line("test/", trainer.test(model, datamodule=data, ckpt_path=cli.config.ckpt_path, verbose=False))
    elif split == "val":
        metrics = metrics_line("val/", trainer.validate(model, datamodule=data, ckpt_path=cli.config.ckpt_path, verbose=False))
    elif split == "test":
        metrics = metrics_line("test/", trainer.test(model, datamodule=data, ckpt_path=cli.config.ckpt_path, verbose=False))
    else:
        raise ValueError(f"--split must be 'val' or 'test', got {split!r}")
    run_dir = trainer.log_dir  # a collective call under DDP: every rank must make it
    if trainer.is_global_zero:
        print_json({"split": split, **metrics, "run_dir": run_dir})
    finish_distributed()
    return metrics


if __name__ == "__main__":
    main()
