"""Protocols that run the entry points many times: zero-shot ODinW-13 / ODinW-35 (``odinw``), the table of the
grounding benchmarks beside their published figures (``benchmarks``: RefCOCO/+/g, Flickr30k Entities, LVIS,
ODinW, COCO), few-shot / low-data sweeps (``sweep``), the ablation table (``ablation``), weight-space ensembling of
a fine-tuned and a zero-shot model (``weight_ensemble``), the training-free segmentation protocol's eight
benchmarks × methods × presets in one table (``segmentation``)."""
