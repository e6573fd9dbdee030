"""Readers on small files written in the official CVC-ClinicDB, DRIVE and nnU-Net layouts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from hidiff.data import DatasetInfo, available_readers, get_reader, load_case, read_image
from hidiff.data.info import num_classes_for


def test_registry_names_and_unknown_name():
    assert available_readers() == ("chase-db1", "cvc-clinicdb", "drive", "generic", "kvasir-seg")
    assert get_reader("Kvasir_SEG").name == "kvasir-seg"
    with pytest.raises(ValueError, match="allowed: chase-db1, cvc-clinicdb, drive, generic"):
        get_reader("isic")


def test_cvc_tiff_layout(cvc_root, synth):
    reader = get_reader("cvc-clinicdb")
    info, cases = reader.open(cvc_root)
    assert [c.case_id for c in cases] == ["1", "2", "10"]  # numeric order
    expected_fg = (synth.blob() > 0).astype(np.uint8)
    for case in cases:
        image, mask = reader.load(case, info)
        assert image.shape == (synth.H, synth.W, 3) and image.dtype == np.float32
        np.testing.assert_array_equal(image, synth.rgb(int(case.case_id)) / np.float32(255))
        if case.case_id == "2":  # grey levels: threshold at 127
            assert mask[0].sum() == 0 and mask[1].all()
            np.testing.assert_array_equal(mask[2:], expected_fg[2:])
        else:  # two-level 0/255 and 1-bit
            np.testing.assert_array_equal(mask, expected_fg)


def test_cvc_uint16_and_planar_tiff(tmp_path, synth):
    deep = (synth.rgb(5).astype(np.uint16) * 257)
    tifffile.imwrite(tmp_path / "deep.tif", deep, photometric="rgb")
    np.testing.assert_allclose(read_image(tmp_path / "deep.tif"), synth.rgb(5) / 255.0,
                               atol=1e-6)
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(synth.rgb(6), -1, 0),
                     photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(read_image(tmp_path / "planar.tif"),
                                  synth.rgb(6) / np.float32(255))


def test_drive_layout(drive_root, synth):
    reader = get_reader("drive")
    info, cases = reader.open(drive_root)
    assert [(c.case_id, c.subset) for c in cases] == [
        ("21", "training"), ("22", "training"), ("01", "test"), ("02", "test")]
    assert all("fov" in c.extras for c in cases)
    assert "manual2" in cases[2].extras and "manual2" not in cases[3].extras
    assert info.policy == "tile" and info.labels == {"background": 0, "vessel": 1}
    for case in cases:
        with Image.open(case.mask) as img:
            assert img.format == "GIF"
        image, mask = reader.load(case, info)
        assert image.shape == (synth.H, synth.W, 3)
        # case 22's palette is inverted (index 0 = white): colours, not indices, decide
        np.testing.assert_array_equal(mask, (synth.blob(top=int(case.case_id) % 5) > 0))
    _, fov = load_case(cases[0], info, mask_key="fov")
    assert fov[:2].sum() == 0 and fov[2:].all()
    _, second = load_case(cases[2], info, mask_key="manual2")
    np.testing.assert_array_equal(second, synth.blob(top=3) > 0)


def test_generic_multiclass(generic_root, synth):
    labels = {"background": 0, "polyp": 1, "instrument": 2}
    masks = []
    for i in range(3):
        mask = (synth.blob(top=i) > 0).astype(np.uint8)
        mask[-3:, -5:] = 2
        masks.append(mask)
    root = generic_root(labels, masks)
    reader = get_reader("generic")
    info, cases = reader.open(root)
    assert info.num_classes == 3 and info.labels == labels and info.channels == 3
    assert info.name == "Dataset001_Test" and info.mask_encoding == "labels"
    assert [c.case_id for c in cases] == ["case_000", "case_001", "case_002"]
    for case, expected in zip(cases, masks, strict=True):
        image, mask = reader.load(case, info)
        assert image.shape == (synth.H, synth.W, 3)
        np.testing.assert_array_equal(mask, expected)


def test_generic_binary_with_0_255_masks_and_plain_names(generic_root, synth):
    root = generic_root({"background": 0, "polyp": 1}, [synth.blob(), synth.blob(top=1)],
                        suffix="")
    reader = get_reader("generic")
    info, cases = reader.open(root)
    assert info.num_classes == 1
    _, mask = reader.load(cases[1], info)
    np.testing.assert_array_equal(mask, synth.blob(top=1) > 0)


def test_generic_single_channel(generic_root, synth):
    root = generic_root({"background": 0, "lesion": 1}, [(synth.blob() > 0).astype(np.uint8)],
                        channels=1)
    reader = get_reader("generic")
    info, cases = reader.open(root)
    assert info.channels == 1 and info.mean == (0.5,)
    image, mask = reader.load(cases[0], info)
    assert image.shape == (synth.H, synth.W, 1)
    np.testing.assert_array_equal(image[..., 0], synth.rgb(0)[..., 0] / np.float32(255))


def test_generic_nnunet_v1_labels(generic_root, synth):
    root = generic_root({"0": "background", "1": "polyp", "2": "instrument"},
                        [np.zeros((synth.H, synth.W), np.uint8)])
    assert get_reader("generic").info(root).labels == {"background": 0, "polyp": 1,
                                                       "instrument": 2}


def test_palette_label_map_uses_indices(tmp_path, synth):
    """A VOC-style palette PNG label map: the index is the label whatever the colours."""
    index = np.zeros((synth.H, synth.W), np.uint8)
    index[5:9, 5:9] = 2
    index[12:, :4] = 1
    img = Image.frombytes("P", (synth.W, synth.H), index.tobytes())
    img.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * 759)
    img.save(tmp_path / "label.png")
    info = DatasetInfo(name="x", labels={"bg": 0, "a": 1, "b": 2}, mask_encoding="labels")
    from hidiff.data import read_mask

    np.testing.assert_array_equal(read_mask(tmp_path / "label.png", info), index)


def test_class_count_rule_and_round_trip():
    assert num_classes_for({"background": 0, "polyp": 1}) == 1
    assert num_classes_for({"background": 0, "a": 1, "b": 2}) == 3
    with pytest.raises(ValueError):
        num_classes_for({"background": 0})
    info = get_reader("chase-db1").info()
    data = info.to_dict()
    assert data["num_classes"] == 1 and data["channel_names"] == {"0": "R", "1": "G", "2": "B"}
    assert data["preprocessing"] == {"policy": "tile", "size": 256, "tile": 256, "overlap": 64}
    assert DatasetInfo.from_dict(data) == info
    with pytest.raises(ValueError, match="contradicts"):
        DatasetInfo.from_dict({**data, "num_classes": 2})
    with pytest.raises(ValueError, match="consecutive"):
        DatasetInfo(name="x", labels={"background": 0, "polyp": 2})
    with pytest.raises(ValueError, match="overlap"):
        info.replace(overlap=256)
    grey = DatasetInfo.from_dict({"name": "g", "channels": 1})
    assert grey.channel_names == ("c0",) and grey.mean == (0.5,) and grey.num_classes == 1
    with pytest.raises(ValueError, match="channels 1 contradicts"):
        DatasetInfo.from_dict({**data, "channels": 1})


def test_dataset_info_save_load(tmp_path):
    info = get_reader("kvasir-seg").info().replace(size=352)
    info.save(tmp_path / "dataset.json")
    assert DatasetInfo.load(tmp_path / "dataset.json") == info


def test_chase_flat_official_folder(tmp_path, synth):
    """The official CHASE_DB1 zip keeps images and annotations side by side."""
    for subject in (1, 2):
        for eye in "LR":
            stem = f"Image_{subject:02d}{eye}"
            Image.fromarray(synth.rgb(subject)).save(tmp_path / f"{stem}.jpg")
            for observer, top in (("1stHO", 2), ("2ndHO", 3)):
                Image.fromarray(synth.blob(top=top) > 0).save(tmp_path / f"{stem}_{observer}.png")
    reader = get_reader("chase-db1")
    info, cases = reader.open(tmp_path)
    assert [c.case_id for c in cases] == ["Image_01L", "Image_01R", "Image_02L", "Image_02R"]
    _, mask = reader.load(cases[0], info)
    np.testing.assert_array_equal(mask, synth.blob(top=2) > 0)
    _, second = load_case(cases[0], info, mask_key="2ndHO")
    np.testing.assert_array_equal(second, synth.blob(top=3) > 0)


def test_core_package_imports_without_torch():
    """hidiff.data (all but torch_dataset) must work where torch is not installed."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import hidiff.data, hidiff.data.transforms, hidiff.data.splits\n"
        "assert 'torch' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr
