"""Train a method: ``python train.py [--config FILE] [--section.key value ...]`` (same as ``grounding-train``).

    python train.py                                   # IMAGE on the embedded synthetic dataset (tiny model)
    python train.py --config configs/image/coco.yaml  # COCO 2017 from IDEA-Research/grounding-dino-tiny
    python train.py --help                            # every setting

Evaluates the untrained model, trains, evaluates again, and prints one JSON line with both results. See
``grounding.cli`` and docs/training.md (multi-GPU, SLURM, resuming).
"""

from grounding.cli import train_main

if __name__ == "__main__":
    train_main()
