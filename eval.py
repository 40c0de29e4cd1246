"""Evaluate a method: ``python eval.py --config FILE [--ckpt_path CKPT] [...]`` (same as ``grounding-eval``).

    python eval.py --config RUN/config.yaml --ckpt_path RUN/checkpoints/last.ckpt --data.split test
    python eval.py --config configs/maskinversion/synthetic.yaml      # MaskInversion, synthetic class masks

Runs ``Trainer.test`` on the DataModule's evaluation split and prints one JSON line with the metrics.
See ``grounding.cli``.
"""

from grounding.cli import eval_main

if __name__ == "__main__":
    eval_main()
