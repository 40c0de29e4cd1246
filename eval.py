"""Evaluate a Grounding DINO checkpoint (COCO box AP, COCO results JSON in the run folder).

    python eval.py --config RUN/config.yaml --ckpt_path RUN/checkpoints/last.ckpt [--split test]
    python eval.py --model.model IDEA-Research/grounding-dino-tiny \
        --data.val_annotations ODINW/valid/_annotations.coco.json --data.val_images ODINW/valid   # zero-shot

Prints one JSON line with the metrics.
"""

from grounding.cli import image_cli, metrics_line, print_json


def main(args: list[str] | None = None) -> dict:
    cli = image_cli(args)
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    split = cli.config.split
    if split == "val":
        metrics = metrics_line("val/", trainer.validate(model, datamodule=data, ckpt_path=cli.config.ckpt_path, verbose=False))
    elif split == "test":
        metrics = metrics_line("test/", trainer.test(model, datamodule=data, ckpt_path=cli.config.ckpt_path, verbose=False))
    else:
        raise ValueError(f"--split must be 'val' or 'test', got {split!r}")
    run_dir = trainer.log_dir  # a collective call under DDP: every rank must make it
    if trainer.is_global_zero:
        print_json({"split": split, **metrics, "run_dir": run_dir})
    return metrics


if __name__ == "__main__":
    main()
