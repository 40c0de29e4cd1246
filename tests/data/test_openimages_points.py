"""OpenImages V7 point labels: parsing of hand-written CSV files (exact errors, counted skips), the samples'
pixel coordinates, the DataModule, and the synthetic writer's points against the label PNGs."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

from grounding.data.label_maps import read_class_names
from grounding.data.openimages_points import OpenImagesPointsDataModule, load_openimages_points, read_class_descriptions
from grounding.data.synthetic import images_dir, semantic_dir, synthetic_label_name, write_synthetic_points

HEADER = "ImageId,Source,LabelName,X,Y,EstimatedYesNo,YesVotes,NoVotes,UnsureVotes,TextLabel\n"
CLASSES = 'LabelName,DisplayName\n/m/cat,Cat\n/m/dog,Dog\n/m/tv,"Television, set"\n'
POINTS = HEADER + (
    "img1,cs,/m/dog,0.5,0.25,yes,3,0,0,\n"       # line 2
    "img1,cs,/m/cat,0.0,1.0,no,0,3,0,\n"         # line 3
    "img2,cs,/m/tv,0.1,0.1,unsure,1,1,1,\n"      # line 4
    "img1,cs,/m/dog,1.0,0.0,no,0,3,0,\n"         # line 5
    "img3,cs,/m/cat,0.2,0.2,yes,3,0,0,\n"        # line 6: no image file
    "img2,cs,/m/tv,0.75,0.5,yes,3,0,0,\n"        # line 7
)


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def files(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 4), (10, 20, 30)).save(images / "img1.jpg")
    Image.new("RGB", (4, 6), (40, 50, 60)).save(images / "img2.jpg")
    return write(tmp_path / "points.csv", POINTS), write(tmp_path / "classes.csv", CLASSES), images


def test_class_descriptions_with_and_without_header(tmp_path):
    assert read_class_descriptions(write(tmp_path / "a.csv", CLASSES)) == (["/m/cat", "/m/dog", "/m/tv"], ["Cat", "Dog", "Television, set"])
    assert read_class_descriptions(write(tmp_path / "b.csv", "/m/x,X\n/m/y,Y\n")) == (["/m/x", "/m/y"], ["X", "Y"])
    twice = write(tmp_path / "c.csv", "LabelName,DisplayName\n/m/x,X\n/m/x,Y\n")
    with pytest.raises(ValueError, match=re.escape(f"class descriptions file {twice}, line 3: LabelName '/m/x' is listed twice (first on line 2)")):
        read_class_descriptions(twice)


def test_records_group_points_by_image_and_count_skips(files):
    records, labels, names, report = load_openimages_points(*files)
    assert [r.image_id for r in records] == ["img1", "img2"]  # order of first appearance; img3 has no file
    assert labels == ["/m/cat", "/m/dog", "/m/tv"] and names == ["Cat", "Dog", "Television, set"]
    assert report.counts == {"unsure point": 1, "missing image": 1}
    img1 = records[0].points
    assert img1.classes.tolist() == [1, 0, 1] and img1.labels.tolist() == [1, 0, 0]
    np.testing.assert_array_equal(img1.xy, [[0.5, 0.25], [0.0, 1.0], [1.0, 0.0]])


def test_samples_have_pixel_coordinates(files):
    module = OpenImagesPointsDataModule(*map(str, files), split="val")
    module.setup()
    assert module.evaluation_split == "val" and module.class_names == ["Cat", "Dog", "Television, set"]
    first, second = next(iter(module.test_dataloader()))[0], module.dataset[1]
    assert first["image"].dtype == torch.uint8 and first["image"].shape == (3, 4, 8)
    assert first["image_id"] == "img1" and first["classes"] == [0, 1]
    # (X * W, Y * H) for the 8 x 4 image
    assert torch.equal(first["points"], torch.tensor([[4.0, 1.0], [0.0, 4.0], [8.0, 0.0]]))
    assert first["point_classes"].tolist() == [1, 0, 1] and first["point_labels"].tolist() == [1, 0, 0]
    assert second["image"].shape == (3, 6, 4) and second["classes"] == [2]
    assert torch.equal(second["points"], torch.tensor([[3.0, 3.0]])) and second["point_labels"].tolist() == [1]


def test_image_list_and_limit(files, tmp_path):
    wanted = write(tmp_path / "list.txt", "img2\nimg4\nimg1\n")
    records, _, _, report = load_openimages_points(*files, image_list=wanted)
    assert [r.image_id for r in records] == ["img2", "img1"] and report.counts["no point"] == 1
    module = OpenImagesPointsDataModule(*map(str, files), limit=1)
    module.setup()
    assert len(module.dataset) == 1 and module.dataset[0]["image_id"] == "img1"


@pytest.mark.parametrize(
    "text, message",
    [
        ("ImageId,Source,LabelName,X,EstimatedYesNo\n", "has no column Y (header: ImageId,Source,LabelName,X,EstimatedYesNo)"),
        (HEADER + "img1,cs,/m/cat,0.5,0.5,yes,,,,\nimg1,cs,/m/bird,0.5,0.5,yes,,,,\n", ", line 3: LabelName '/m/bird' is not in the class descriptions"),
        (HEADER + "img1,cs,/m/cat,1.5,0.5,yes,,,,\n", ", line 2: X '1.5' is outside [0, 1] (coordinates are normalized)"),
        (HEADER + "img1,cs,/m/cat,0.5,-0.1,yes,,,,\n", ", line 2: Y '-0.1' is outside [0, 1] (coordinates are normalized)"),
        (HEADER + "img1,cs,/m/cat,0.5,abc,yes,,,,\n", ", line 2: Y 'abc' is not a number"),
        (HEADER + "img1,cs,/m/cat,0.5,0.5,maybe,,,,\n", ", line 2: EstimatedYesNo 'maybe' is not yes, no or unsure"),
    ],
)
def test_errors_name_the_file_and_line(files, text, message):
    points, classes, images = files
    write(points, text)
    with pytest.raises(ValueError, match=re.escape(f"point labels file {points}" + (" " if message.startswith("has") else "") + message)):
        load_openimages_points(points, classes, images)


def test_datamodule_needs_its_files():
    with pytest.raises(ValueError, match=re.escape("set points_csv, classes_csv and image_dir (or synthetic_root for the synthetic dataset)")):
        OpenImagesPointsDataModule(points_csv="p.csv")


def test_synthetic_points_fall_inside_and_outside_their_class(synthetic_root, tmp_path):
    # many negatives, so that a sampler drawing on the 255 border band would be caught
    files = write_synthetic_points(synthetic_root, tmp_path / "points", "val", positives=4, negatives=60, seed=5)
    names = read_class_names(synthetic_root / "semantic" / "classes.txt")
    labels, display = read_class_descriptions(files.classes_csv)
    assert labels == [f"/m/syn{i:04d}" for i in range(1, len(names))] and display == names[1:]
    rows = [line.split(",") for line in files.points_csv.read_text().splitlines()[1:]]
    pngs = {p.stem: np.asarray(Image.open(p)) for p in semantic_dir(synthetic_root, "val").glob("*.png")}
    assert all((png == 255).any() for png in pngs.values())
    checked = set()
    for image_id, _, label, x, y, answer in rows:
        png = pngs[image_id]
        height, width = png.shape
        value = png[int(float(y) * height), int(float(x) * width)]
        class_value = labels.index(label) + 1  # label value 0 is background
        assert (value == class_value) == (answer == "yes") and value != 255
        checked.add((image_id, class_value))
    # every class of every label PNG got its points
    expected = {(stem, int(v)) for stem, png in pngs.items() for v in np.unique(png) if v not in (0, 255)}
    assert checked == expected
    again = write_synthetic_points(synthetic_root, tmp_path / "again", "val", positives=4, negatives=60, seed=5)
    assert again.points_csv.read_text() == files.points_csv.read_text()
    assert synthetic_label_name(0) == "/m/syn0001" and files.image_dir == images_dir(synthetic_root, "val")


def test_datamodule_on_the_synthetic_dataset(synthetic_root):
    module = OpenImagesPointsDataModule(synthetic_root=str(synthetic_root), split="val")
    module.setup()
    stems = sorted(p.stem for p in semantic_dir(synthetic_root, "val").glob("*.png"))
    assert [r.image_id for r in module.dataset.records] == stems
    sample = module.dataset[0]
    png = np.asarray(Image.open(semantic_dir(synthetic_root, "val") / f"{stems[0]}.png"))
    pixels = sample["points"].floor().long()
    values = torch.from_numpy(png.astype(np.int64))[pixels[:, 1], pixels[:, 0]]
    assert torch.equal(values == sample["point_classes"] + 1, sample["point_labels"] == 1)
