"""Bad input on disk: every problem is a DataError whose message names the file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from PIL import Image

from hidiff.data import DataError, DatasetInfo, get_reader, read_image, read_mask


def test_data_error_is_a_value_error(tmp_path):
    err = DataError(tmp_path / "x.png", "broken")
    assert isinstance(err, ValueError) and str(err).endswith("x.png: broken")


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match="nowhere.*dataset folder not found.*images/"):
        get_reader("kvasir-seg").list_cases(tmp_path / "nowhere")


def test_empty_folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(DataError, match=r"images: no image files \(\*\.png"):
        get_reader("kvasir-seg").list_cases(tmp_path)


def test_missing_mask_folder(tmp_path, kvasir_like):
    root = kvasir_like(2)
    for path in (root / "masks").iterdir():
        path.unlink()
    (root / "masks").rmdir()
    with pytest.raises(DataError, match="masks: mask folder not found"):
        get_reader("kvasir-seg").list_cases(root)


def test_count_mismatch_lists_unmatched_files(kvasir_like):
    root = kvasir_like(4)
    (root / "masks" / "case1.jpg").unlink()
    (root / "masks" / "case3.jpg").rename(root / "masks" / "stray.jpg")
    with pytest.raises(DataError) as info:
        get_reader("kvasir-seg").list_cases(root)
    message = str(info.value)
    assert "4 images" in message and "3 masks" in message
    assert "images without a mask: case1.jpg, case3.jpg" in message
    assert "masks without an image: stray.jpg" in message


@pytest.mark.parametrize("content", [b"this is not a jpeg at all" * 10, "truncated"])
def test_corrupt_jpeg(kvasir_like, content):
    root = kvasir_like(2)
    bad = root / "images" / "case1.jpg"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 3] if content == "truncated" else content)
    reader = get_reader("kvasir-seg")
    cases = reader.list_cases(root)  # listing only looks at names
    reader.load(cases[0])
    with pytest.raises(DataError, match="case1.jpg: unreadable or corrupt"):
        reader.load(cases[1])


def test_corrupt_tiff(cvc_root):
    (cvc_root / "Original" / "2.tif").write_bytes(b"II*\x00garbage")
    reader = get_reader("cvc-clinicdb")
    with pytest.raises(DataError, match="2.tif: unreadable or corrupt"):
        reader.load(reader.list_cases(cvc_root)[1])


def test_grayscale_where_rgb_expected(kvasir_like, synth):
    root = kvasir_like(2)
    Image.fromarray(synth.rgb(0)[..., 0]).save(root / "images" / "case0.jpg")
    reader = get_reader("kvasir-seg")
    with pytest.raises(DataError, match="case0.jpg: grayscale .* expects 3 channels"):
        reader.load(reader.list_cases(root)[0])


def test_wrong_channel_count(tmp_path, synth):
    tifffile.imwrite(tmp_path / "two.tif", synth.rgb(0)[..., :2], photometric="minisblack",
                     planarconfig="contig")
    with pytest.raises(DataError, match="two.tif: image has 2 channels but the dataset expects 3"):
        read_image(tmp_path / "two.tif")
    Image.fromarray(synth.rgb(1)).save(tmp_path / "colour.png")
    with pytest.raises(DataError, match="colour.png: image has 3 channels .* expects 1"):
        read_image(tmp_path / "colour.png", channels=1)


def test_size_mismatch(kvasir_like, synth):
    root = kvasir_like(2)
    Image.fromarray(synth.blob(30, 30)).save(root / "masks" / "case1.jpg")
    reader = get_reader("kvasir-seg")
    message = r"case1.jpg: mask size 30x30 .* image case1.jpg size 32x24"
    with pytest.raises(DataError, match=message):
        reader.load(reader.list_cases(root)[1])


def test_unexpected_label_values(generic_root, synth):
    mask = (synth.blob() > 0).astype(np.uint8)
    mask[0, 0] = 7
    root = generic_root({"background": 0, "a": 1, "b": 2}, [mask])
    reader = get_reader("generic")
    info, cases = reader.open(root)
    with pytest.raises(DataError, match=r"case_000.png: mask has unexpected label values \[7\]"):
        reader.load(cases[0], info)
    binary = DatasetInfo(name="b", labels={"background": 0, "fg": 1}, mask_encoding="labels")
    Image.fromarray(np.array([[0, 1, 2]], np.uint8)).save(root / "three.png")
    with pytest.raises(DataError, match=r"three.png: mask has unexpected label values \[2\]"):
        read_mask(root / "three.png", binary)


def test_bad_dataset_json(generic_root, synth):
    root = generic_root({"background": 0, "fg": 1}, [synth.blob()])
    reader = get_reader("generic")
    (root / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match="dataset.json: cannot read"):
        reader.list_cases(root)
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "fg": 3}}))
    with pytest.raises(DataError, match="dataset.json: invalid dataset description.*consecutive"):
        reader.info(root)
    (root / "dataset.json").unlink()
    with pytest.raises(DataError, match="dataset.json: dataset description file not found"):
        reader.open(root)


def test_generic_count_and_channel_files(generic_root, synth):
    root = generic_root({"background": 0, "fg": 1}, [synth.blob(), synth.blob()])
    description = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**description, "numTraining": 5}))
    with pytest.raises(DataError, match="numTraining is 5 but"):
        get_reader("generic").list_cases(root)
    (root / "dataset.json").write_text(json.dumps(description))
    Image.fromarray(synth.rgb(9)).save(root / "imagesTr" / "case_000_0001.png")
    with pytest.raises(DataError, match="case_000_0001: one file per channel"):
        get_reader("generic").list_cases(root)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="ghost.png: file not found"):
        read_image(tmp_path / "ghost.png")
