"""Train IMAGE (Grounding DINO + adaptive masking).

    python train.py                                   # synthetic dataset, tiny model (configs/image/synthetic.yaml)
    python train.py --config configs/image/coco.yaml  # COCO 2017 from IDEA-Research/grounding-dino-tiny
    python train.py --help                            # every setting

Evaluates the untrained model, trains, evaluates again, and prints one JSON line with both results.
Checkpoints, TensorBoard logs, the resolved config and COCO results JSON go to the run folder.
"""

from grounding.cli import finish_distributed, image_cli, metrics_line, print_json


def main(args: list[str] | None = None) -> dict:
    cli = image_cli(args)
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    before = {}
    if cli.config.validate_before_fit and cli.config.ckpt_path is None:
        before = metrics_line("val/", trainer.validate(model, datamodule=data, verbose=False))
    trainer.fit(model, datamodule=data, ckpt_path=cli.config.ckpt_path)
    after = metrics_line("val/", trainer.validate(model, datamodule=data, verbose=False))
    run_dir = trainer.log_dir  # a collective call under DDP: every rank must make it
    summary = {"untrained": before, "trained": after, "run_dir": run_dir, "steps": trainer.global_step}
    if trainer.is_global_zero:
        print_json(summary)
    finish_distributed()
    return summary


if __name__ == "__main__":
    main()
