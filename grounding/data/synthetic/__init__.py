"""Synthetic "coloured shapes" grounding dataset: generator and command-line tool.

The dataset is the embedded default for every method of the project (detection, referring
expressions, semantic segmentation, mask-region retrieval). It is small, deterministic and
learnable by a tiny randomly initialised detector on CPU.

Each image (RGB, ``image_size`` square) shows a muted, textured background (smooth noise,
gradient, stripes or checker) and 1..N saturated shapes. A category is a (colour, shape) pair,
named ``"<colour> <shape>"`` (e.g. ``"red circle"``); category ids are 1..C in colour-major order.
Objects may overlap; every object keeps at least ``min_visible_frac`` of its area visible and the
VISIBLE masks are what gets annotated.

On-disk layout written by :func:`generate`::

    DIR/
      images/{train,val,test}/{image_id:06d}.jpg           (or .png, see image_format)
      annotations/instances_{train,val,test}.json          COCO instances; file_name = "000001.jpg"
      semantic/{train,val,test}/{image_id:06d}.png         mode "P", VOC palette: 0 background,
                                                           c = category id, 255 = ignore band
      semantic/classes.txt                                 "background" then category names
      refcoco/instances.json                               COCO instances of all splits together;
                                                           file_name = "<split>/000001.jpg"
                                                           (relative to DIR/images)
      refcoco/refs(synthetic).p                            RefCOCO-style refs, list of dicts
      refs_{train,val,test}.json                           the refs of one split as JSON
      phrasecut/refer_{train,val,test}.json                PhraseCut-style tasks (see
                                                           :func:`phrasecut_tasks`); images are
                                                           images/<split>/{image_id:06d}.jpg
      phrasecut/image_data_{train,val,test}.json           [{"image_id", "width", "height"}, ...]
      meta.json                                            settings, version, counts (written last)

Image ids run 1..N over train, then val, then test; annotation, ref and sentence ids are unique
across all splits too. Each image is drawn from its own random generator seeded by
(seed, split name, index in split), so changing the size of one split changes no other split and
a smaller split is a prefix of a larger one (up to the ids).

Segmentations are COCO polygons (derived from the shape geometry) for objects that nothing
covers, and uncompressed COCO RLE (``{"size": [h, w], "counts": [...]}``, column-major) for
objects that are partly occluded. Instance masks are defined as the pycocotools rasterisation of
the (rounded) polygon, so a polygon decodes exactly to the annotated mask.

Referring expressions use the category words plus the fixed vocabulary :data:`REFERRING_WORDS`;
the rules that make each word true are documented in :func:`describe_object`.

Other formats are derived from it on first use, by the DataModules that read them:
``openimages_points/<split>/`` (OpenImages V7 point labels, :func:`write_synthetic_points`) and
``mimic_references/<split>/<category>/`` (MIMIC's reference crops, :func:`write_synthetic_references`).

Package layout (one concern per module; every public name is re-exported here):

    config.py      SyntheticConfig and its validation, colour/shape/word tables, categories, paths
    geometry.py    shape outlines, rotation, rasterisation, mask boxes and RLE
    scene.py       backgrounds, object colours, placement (sample_scene) and painting (render_image)
    semantic.py    ignore band and semantic label maps (drawn in grounding.data.label_maps' VOC palette)
    referring.py   referring-expression rules (describe_object) and PhraseCut tasks
    writer.py      writing splits / the dataset / meta.json; generate, ensure_synthetic, ...
    points.py      the label maps as OpenImages V7 point labels (write_synthetic_points)
    references.py  MIMIC's reference crops of each category (write_synthetic_references)
    cli.py         the command line (``python -m grounding.data.synthetic``, via __main__.py)
"""

from .cli import build_arg_parser, main
from .config import (
    COLOUR_RGB,
    GENERATOR_VERSION,
    REFERRING_WORDS,
    SHAPE_NAMES,
    SPLITS,
    SyntheticConfig,
    category_names,
    coco_categories,
    image_file_name,
    images_dir,
    instances_path,
    phrasecut_dir,
    refcoco_dir,
    referring_vocabulary,
    refs_json_path,
    semantic_dir,
    validate_config,
    vocabulary_words,
)
from .geometry import (
    SUPERSAMPLE,
    mask_bbox,
    mask_to_uncompressed_rle,
    polygon_coverage,
    rasterize_polygon,
    rotate_points,
    shape_outline,
)
from .referring import (
    LARGE_SIDE_FRAC,
    ORDINAL_WORDS,
    POSITION_MARGIN_FRAC,
    SIZE_RATIO,
    SMALL_SIDE_FRAC,
    absolute_phrase,
    box_centre,
    choose_sentences,
    clear_rank,
    describe_object,
    phrasecut_tasks,
)
from .points import PointFiles, points_dir, sample_label_points, synthetic_label_name, write_synthetic_points
from .references import category_folder, references_dir, write_synthetic_references
from .scene import SceneObject, jitter_colour, render_background, render_image, sample_scene
from .semantic import label_boundary_band, semantic_label_map
from .writer import check_meta, ensure_synthetic, generate, image_rng, load_meta, prepare_synthetic

__all__ = [
    # config
    "COLOUR_RGB", "GENERATOR_VERSION", "REFERRING_WORDS", "SHAPE_NAMES", "SPLITS", "SyntheticConfig",
    "category_names", "coco_categories", "image_file_name", "images_dir", "instances_path",
    "phrasecut_dir", "refcoco_dir", "referring_vocabulary", "refs_json_path", "semantic_dir",
    "validate_config", "vocabulary_words",
    # geometry
    "SUPERSAMPLE", "mask_bbox", "mask_to_uncompressed_rle", "polygon_coverage", "rasterize_polygon",
    "rotate_points", "shape_outline",
    # scene
    "SceneObject", "jitter_colour", "render_background", "render_image", "sample_scene",
    # semantic
    "label_boundary_band", "semantic_label_map",
    # referring
    "LARGE_SIDE_FRAC", "ORDINAL_WORDS", "POSITION_MARGIN_FRAC", "SIZE_RATIO", "SMALL_SIDE_FRAC",
    "absolute_phrase", "box_centre", "choose_sentences", "clear_rank", "describe_object",
    "phrasecut_tasks",
    # writer
    "check_meta", "ensure_synthetic", "generate", "image_rng", "load_meta", "prepare_synthetic",
    # derived formats
    "PointFiles", "points_dir", "sample_label_points", "synthetic_label_name", "write_synthetic_points",
    "category_folder", "references_dir", "write_synthetic_references",
    # command line
    "build_arg_parser", "main",
]
