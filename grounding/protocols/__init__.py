"""Protocols that run the entry points many times: zero-shot ODinW-13 (``odinw``), few-shot / low-data sweeps
(``sweep``), the ablation table (``ablation``), weight-space ensembling of a fine-tuned and a zero-shot model
(``weight_ensemble``)."""
