"""The values several layers of the package share, defined once: image normalization statistics and the
ignore label of label maps. ``grounding.data``, ``grounding.models`` and ``grounding.lightning`` all import
them from here (``models`` never imports ``data``)."""

from __future__ import annotations

#: per-channel mean / std of ImageNet (RGB, pixels in [0, 1]): Grounding DINO's backbone input, torchvision CNNs
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: per-channel mean / std of OpenAI CLIP's preprocessing (RGB, pixels in [0, 1]); LLaVA's vision tower uses them too
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: the label value of pixels that count in no class (VOC's boundary band, unlabeled pixels)
IGNORE_INDEX = 255
