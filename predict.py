"""Run a method on your own images: ``python predict.py --config FILE --inputs IMAGES... --classes "a, b"`` (same
as ``grounding-predict``).

    python predict.py --config configs/gem/synthetic.yaml --inputs photos/ --classes "red circle, blue square" --out preds
    python predict.py --config RUN/config.yaml --ckpt_path RUN/checkpoints/last.ckpt --inputs photos/ --text "a red circle"

Writes per image a drawn PNG and ``records/<id>.json``, then ``predictions.json``, and prints one JSON line.
See ``grounding.cli``.
"""

from grounding.cli import predict_main

if __name__ == "__main__":
    predict_main()
