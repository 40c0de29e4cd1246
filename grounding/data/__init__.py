"""The data layer: readers of every supported format, their datasets, and the DataModules the configs name.

Every reader fails on broken input with an error naming the file (and the offending id), and skips what is
recoverable, counted and logged (``skips.py``); docs/data.md lists what each format checks and skips. Each
method reads one family:

- detection (IMAGE): ``detection.CocoDetectionDataModule`` over ``coco.py``;
- regions (MaskInversion): ``regions.RegionDataModule`` over ``region_readers.py``;
- semantic segmentation (InvSeg, GEM): ``segmentation.SegmentationDataModule`` over ``segmentation_readers.py``;
- point labels (GEM): ``openimages_points.OpenImagesPointsDataModule``;
- concept targets (MIMIC): ``concepts.ConceptDataModule``;
- the user's own images (``grounding-predict``): ``image_folder.ImageFolderDataModule``.

Package layout (one concern per module):

    images.py                reading images as 8-bit RGB in the annotations' orientation; header checks
    masks.py                 COCO segmentations (polygons, RLE, boxes) to masks and areas
    label_maps.py            label PNGs, class and image lists, ADE20K's zero label, the VOC palette
    skips.py                 SkipReport (counted, logged skips); unreadable training images and their limit
    coco_file.py             the validated COCO instances reader (cached per process) and COCOeval's ground truth
    prompts.py               category names to one text prompt, and prompt positions back to categories
    coco.py                  COCO detection records, low-data subsets, transforms, CocoDetection, collate_detection
    sampling.py              EpochSampler and ResumableDataLoader: an order that resumes and multi-process runs repeat
    detection.py             CocoDetectionDataModule, the training and evaluation DataModule of detection
    evaluation.py            the base of the test-time DataModules: shared settings, the synthetic data, the loader
    region_readers.py        region records of COCO, RefCOCO, PhraseCut and label PNGs
    regions.py               RegionDataset and RegionDataModule
    region_views.py          the baselines' views of a region: crops, masked crops, a red circle
    segmentation_readers.py  label-map records of VOC, label-PNG folders (Context, ADE20K), COCO-Object, synthetic
    segmentation.py          SegmentationDataset and SegmentationDataModule
    category_lists.py        per-image category lists of a JSON file (captioner / classifier predictions)
    openimages_points.py     OpenImages V7 point labels: the CSV readers, dataset and OpenImagesPointsDataModule
    concepts.py              MIMIC's concept targets: the targets file, the synthetic concepts, ConceptDataModule
    image_folder.py          image files, folders and path lists to predict on: ImageFolderDataModule
    datamodule.py            the detection DataModule's old import path, which saved run configs and checkpoints name
    synthetic/               the embedded synthetic dataset: generator, command line, its derived formats
"""
