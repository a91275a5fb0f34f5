"""Preparing OpenImages: boxes from the segmentation table, and the folder checker flagging what is broken."""
import csv

from test_data import make_openimages_mask_folder

from elite_tutorial.cli import main as elite_train
from elite_tutorial.data import OpenImagesSource
from elite_tutorial.openimages import boxes_from_segmentation, check_folder, main


def test_boxes_from_segmentation_give_stage_one_its_table(tmp_path):
    root = make_openimages_mask_folder(tmp_path / "oi")
    table = boxes_from_segmentation(root)
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    with open(root / "annotations" / "test-annotations-object-segmentation.csv", newline="") as f:
        masks = list(csv.DictReader(f))
    assert [r["ImageID"] for r in rows] == [m["ImageID"] for m in masks]
    assert all(float(r["XMin"]) == float(m["BoxXMin"]) and float(r["YMax"]) == float(m["BoxYMax"]) for r, m in zip(rows, masks))
    assert not list(table.parent.glob("*.partial"))
    assert len(OpenImagesSource(root).boxes) == 6  # stage 1 reads it (all six pass its area filter)
    elite_train(["global", "--preset", "tiny-random", "--profile", "smoke", "--steps", "1", "--data", str(root),
                 "--out", str(tmp_path / "run")])
    assert (tmp_path / "run" / "mapper" / "model.safetensors").is_file()


def test_a_complete_folder_passes_except_for_its_unreadable_mask(tmp_path, capsys):
    root = make_openimages_mask_folder(tmp_path / "oi")  # holds one unreadable mask on purpose
    boxes_from_segmentation(root)
    report = check_folder(root, progress=False)
    assert report.segmentation_rows == 6 and report.box_rows == 6 and report.kept_objects == 6
    assert report.unreadable == ["broken.png"] and not report.images_missing and not report.masks_missing
    assert len(report.problems) == 1 and "broken.png" in report.problems[0]
    (root / "masks" / "test" / "broken.png").unlink()
    (root / "masks" / "test" / "img1_m.png").rename(root / "masks" / "test" / "broken.png")
    (root / "masks" / "test" / "img2_m.png").write_bytes((root / "masks" / "test" / "img3_m.png").read_bytes())
    report = check_folder(root, progress=False)
    assert report.masks_missing == ["img1_m.png"] and report.ok is False
    (root / "masks" / "test" / "img1_m.png").write_bytes((root / "masks" / "test" / "img3_m.png").read_bytes())
    assert check_folder(root, progress=False).ok
    try:
        main(["check", str(root)])
    except SystemExit as done:
        assert done.code == 0
    assert "ready for both stages" in capsys.readouterr().out


def test_a_broken_folder_says_what_is_missing(tmp_path):
    root = make_openimages_mask_folder(tmp_path / "oi")
    (root / "images" / "test" / "img2.jpg").unlink()
    (root / "images" / "test" / "img3.jpg").write_bytes(b"truncated")
    report = check_folder(root, progress=False)
    text = "\n".join(report.problems)
    assert report.images_missing == ["img2"] and "img3.jpg" in report.unreadable
    assert "no box table" in text and "openimages boxes" in text  # and how to make it
    assert "missing images: 1 (img2)" in text
    (root / "annotations" / "test-annotations-object-segmentation.csv").unlink()
    assert "no segmentation table" in check_folder(root, progress=False).problems[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    problems = check_folder(empty, progress=False).problems
    assert any("no folder" in p for p in problems) and any("segmentation table" in p for p in problems)
