"""MIMIC: synthesizing an image whose vision-language-model answer to a prompt is a target text (docs/mimic.md).

Test-time optimization of pixels. The image v̂ lives in the VLM's normalized pixel space and minimizes

    γ1 · L_SCE + γ2 · L_base + β1 · R_V + β2 · R_patch + R_prior

- ``L_SCE`` (``answer_loss``): causal-LM cross-entropy of the target answer tokens given (image, prompt). The
  labels are built on the sequence AFTER the single image placeholder is expanded into the vision-token run
  (``expand_image_tokens`` / ``build_sequence``), so every label sits on the position the model predicts it at;
- ``L_base`` (``feature_statistics_loss``): per hooked layer of the vision tower (the patch embedding and every
  encoder block's MLP; ``FeatureStatistics``, a context manager whose hooks are removed on exit), the ℓ2
  distance between the per-channel mean / variance of the token features and those of reference images of the
  concept (``reference_statistics``, cached on disk);
- ``R_V`` (``BatchNormPrior``): DeepInversion's prior, the distance of a frozen BatchNorm CNN's batch statistics
  to its running statistics, the first BatchNorm layer weighted ×10;
- ``R_patch`` (``patch_border_loss``): the squared jump across the borders of the vision tower's patches;
- ``R_prior``: total variation (``tv_losses``: L1 and L2 over horizontal, vertical and both diagonal
  neighbours) and the ℓ2 norm of the image (``l2_loss``).

``synthesize`` runs the optimization (Adam with betas (0.5, 0.9), cosine learning rate, random roll jitter and
horizontal flips, clamp to the valid pixel range after every step); it is a plain function, usable without
Lightning::

    from grounding.models.mimic import MimicObjective, MimicWeights, SynthesisSettings, build_vlm, synthesize

    vlm = build_vlm("tiny")
    objective = MimicObjective(vlm, MimicWeights())
    result = synthesize(objective, "What is in the image?", "a red circle", SynthesisSettings(iterations=10))
    result.images  # (1, 3, 64, 64) in [0, 1]

``build_vlm`` loads an image-text-to-text model from the hub or a folder (LLaVA-1.5 class by default) or builds
``"tiny"``, a random LLaVA with an offline tokenizer, for tests and the CPU demo. The metrics (answers:
``grounding.metrics.answers``; CLIPScore and LPIPS diversity: ``grounding.metrics.image_scores``) and the
Trainer glue are in ``grounding.lightning.mimic_module``.

Package layout (one concern per module; every public name is re-exported here):

    sequence.py    the prompt template, the image-token expansion, the labels and L_SCE (answer_loss)
    priors.py      TV / ℓ2 / patch-border losses, jitter and flip, the normalized pixel space (clamp, to/from
                   [0, 1]), R_V's BatchNormPrior, the CNN builder and PriorSettings
    vlm.py         the VLM wrapper, the tiny random LLaVA, build_vlm, logits and greedy answers, gradient
                   checkpointing, VLMSettings
    statistics.py  L_base: the feature-statistics hooks, the reference images and their on-disk cache
    objective.py   MimicWeights, MimicObjective, SynthesisSettings / SynthesisResult and synthesize
"""

from grounding.constants import IMAGENET_MEAN, IMAGENET_STD

from .objective import TERMS, AdamBeta, MimicObjective, MimicWeights, SynthesisResult, SynthesisSettings, synthesize
from .priors import (
    BatchNormPrior,
    PriorSettings,
    TinyBNCNN,
    bn_layer_loss,
    build_cnn,
    clamp_pixels,
    from_unit,
    jitter_flip,
    l2_loss,
    patch_border_loss,
    pixel_bounds,
    to_unit,
    tv_losses,
)
from .sequence import (
    IGNORE_LABEL,
    LLAVA_PROMPT_TEMPLATE,
    answer_loss,
    build_sequence,
    check_prompt_template,
    expand_image_tokens,
)
from .statistics import (
    IMAGE_SUFFIXES,
    FeatureStatistics,
    compute_reference_statistics,
    feature_statistics_loss,
    list_images,
    load_reference_images,
    reference_statistics,
    statistics_cache_key,
    statistics_modules,
    token_statistics,
)
from .vlm import (
    LLAVA_7B_VLM,
    TINY_VLM,
    TINY_WORDS,
    VLM,
    VLMSettings,
    build_random_llava,
    build_tiny_tokenizer,
    build_vlm,
    enable_checkpointing,
    generate_answers,
    train_mode,
    vision_tower,
    vlm_logits,
)

__all__ = [
    "AdamBeta", "BatchNormPrior", "FeatureStatistics", "IGNORE_LABEL", "IMAGENET_MEAN", "IMAGENET_STD",
    "IMAGE_SUFFIXES", "LLAVA_7B_VLM", "LLAVA_PROMPT_TEMPLATE", "MimicObjective", "MimicWeights", "PriorSettings",
    "SynthesisResult", "SynthesisSettings", "TERMS", "TINY_VLM", "TINY_WORDS", "TinyBNCNN", "VLM", "VLMSettings", "answer_loss", "bn_layer_loss", "build_cnn", "build_random_llava",
    "build_sequence", "build_tiny_tokenizer", "build_vlm", "check_prompt_template", "clamp_pixels",
    "compute_reference_statistics", "enable_checkpointing", "expand_image_tokens", "feature_statistics_loss",
    "from_unit", "generate_answers", "jitter_flip", "l2_loss", "list_images", "load_reference_images",
    "patch_border_loss", "pixel_bounds", "reference_statistics", "statistics_cache_key", "statistics_modules",
    "synthesize", "to_unit", "token_statistics", "train_mode", "tv_losses", "vision_tower", "vlm_logits",
]
