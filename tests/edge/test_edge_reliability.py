"""``hidiff-edge predict`` never loses a file and sees images as the user does: inputs (images
and ground truth) are never overwritten, earlier outputs only with ``--overwrite``; EXIF
orientation is applied; ``--threads`` above the CPU count is capped with a warning. Real
exported model, real images, the real command line."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_runtime import HiDiffSession
from edge_runtime.cli import main
from edge_runtime.session import usable_cpus

pytestmark = pytest.mark.data


def _run(capsys, argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def one_image(kvasir_root, tmp_path) -> tuple[Path, Path]:
    """An image folder and a labels folder holding its ground truth as ``<stem>.png``."""
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    src = sorted((kvasir_root / "images").glob("*.jpg"))[0]
    shutil.copy(src, images / src.name)
    with Image.open(kvasir_root / "masks" / src.name) as m:
        m.convert("L").point(lambda v: 255 if v > 127 else 0).save(labels / f"{src.stem}.png")
    return images, labels


def test_ground_truth_folder_as_output_is_refused(tiny_export, one_image, capsys):
    images, labels = one_image
    gt = next(labels.iterdir())
    before = gt.read_bytes()
    code, _, stderr = _run(capsys, ["predict", "--model", tiny_export[1], images, "-o", labels,
                                    "--labels", labels, "--no-progress", "--overwrite"])
    assert code == 2 and "an input would be overwritten" in stderr and str(gt) in stderr
    assert gt.read_bytes() == before and sorted(labels.iterdir()) == [gt]


def test_existing_outputs_need_overwrite(tiny_export, one_image, tmp_path, capsys):
    images, _ = one_image
    out = tmp_path / "out"
    argv = ["predict", "--model", tiny_export[1], images, "-o", out, "--no-progress",
            "--steps", "1", "--samples", "1"]
    assert _run(capsys, argv)[0] == 0
    mask = next(out.iterdir())
    mask.write_bytes(b"an earlier result")
    code, _, stderr = _run(capsys, argv)
    assert code == 2 and f"{mask}: already exists; pass --overwrite" in stderr
    assert mask.read_bytes() == b"an earlier result"
    assert _run(capsys, [*argv, "--overwrite"])[0] == 0
    assert mask.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_exif_rotated_photo_is_read_upright(tiny_export, kvasir_root, tmp_path, capsys):
    """A JPEG stored rotated with EXIF orientation 6 gives the upright image's mask, in the
    upright frame (the upright reference is the same decoded pixels, transposed, as PNG)."""
    src = sorted((kvasir_root / "images").glob("*.jpg"))[1]
    with Image.open(src) as im:
        upright = im.convert("RGB")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what orientation 6 undoes
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = tmp_path / "in_rot" / "photo.jpg"
    rotated.parent.mkdir()
    stored.save(rotated, exif=exif, quality=95)
    with Image.open(rotated) as im:  # the decoded stored pixels, turned upright by hand
        raw = np.asarray(im.convert("RGB"))
    reference_png = tmp_path / "in_up" / "photo.png"
    reference_png.parent.mkdir()
    Image.fromarray(np.ascontiguousarray(np.rot90(raw, k=-1))).save(reference_png)
    masks = {}
    for name, folder in (("rot", rotated.parent), ("up", reference_png.parent)):
        out = tmp_path / f"out_{name}"
        assert _run(capsys, ["predict", "--model", tiny_export[1], folder, "-o", out,
                             "--no-progress", "--steps", "2", "--samples", "2"])[0] == 0
        with Image.open(out / "photo.png") as m:
            masks[name] = np.asarray(m)
    assert masks["rot"].shape == (upright.height, upright.width)
    assert np.array_equal(masks["rot"], masks["up"])


def test_threads_above_the_cpu_count_are_capped_with_a_warning(tiny_export, one_image,
                                                                tmp_path, capsys):
    cpus = usable_cpus()
    with pytest.warns(RuntimeWarning, match=f"using {cpus}"):
        session = HiDiffSession(tiny_export[1], threads=cpus + 62)
    assert session.threads == cpus
    images, _ = one_image
    code, _, stderr = _run(capsys, ["predict", "--model", tiny_export[1], images, "-o",
                                    tmp_path / "o", "--threads", str(cpus + 62), "--no-progress",
                                    "--steps", "1", "--samples", "1"])
    assert code == 0
    assert f"hidiff-edge predict: warning: threads={cpus + 62} is more than" in stderr


def test_write_errors_name_the_output_file_and_labels_must_be_a_folder(tiny_export, one_image,
                                                                        tmp_path, capsys):
    images, labels = one_image
    out = tmp_path / "out"
    blocker = out / f"{next(images.iterdir()).stem}.png"
    blocker.mkdir(parents=True)  # the mask's name is taken by a folder: the write fails
    code, _, stderr = _run(capsys, ["predict", "--model", tiny_export[1], images, "-o", out,
                                    "--overwrite", "--no-progress", "--steps", "1"])
    assert code == 2 and f"{blocker}: cannot write it" in stderr and ".tmp" not in stderr
    label_file = next(labels.iterdir())
    code, _, stderr = _run(capsys, ["predict", "--model", tiny_export[1], images, "-o",
                                    tmp_path / "o2", "--labels", label_file, "--no-progress"])
    assert code == 2 and f"{label_file}: is a file; --labels takes the folder" in stderr


def test_two_ground_truths_for_one_image_are_refused(tiny_export, one_image, tmp_path, capsys):
    images, labels = one_image
    gt = next(labels.iterdir())
    shutil.copy(gt, labels / f"{gt.stem}.jpg")  # same stem, another suffix
    code, _, stderr = _run(capsys, ["predict", "--model", tiny_export[1], images, "-o",
                                    tmp_path / "o", "--labels", labels, "--no-progress"])
    assert code == 2 and "are both ground truth for" in stderr
    assert not (tmp_path / "o").exists()
