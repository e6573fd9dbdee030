"""Readers for the official dataset layouts, and the registry ``get_reader(name)``.

A reader is stateless: ``info(root)`` describes the dataset, ``list_cases(root)`` pairs images
with masks by case id (file names only; nothing is decoded), ``load(case, info)`` decodes one
case. Layouts (``root`` is the folder the user downloaded and unpacked):

- ``kvasir-seg``: ``images/<id>.jpg`` + ``masks/<id>.jpg`` (RGB JPEG masks, threshold > 127).
- ``cvc-clinicdb``: ``Original/<n>.tif`` + ``Ground Truth/<n>.tif`` (read with tifffile).
- ``drive``: ``training/images/NN_training.tif`` + ``training/1st_manual/NN_manual1.gif`` and
  ``test/images/NN_test.tif`` + ``test/1st_manual/NN_manual1.gif`` (palette GIFs; nonzero =
  vessel). ``mask/`` field-of-view files are exposed as ``extras["fov"]``, ``2nd_manual/`` as
  ``extras["manual2"]``; ``Case.subset`` is ``"training"`` or ``"test"``.
- ``chase-db1``: ``images/Image_NNX.jpg`` + ``manual/Image_NNX_1stHO.png`` (``_2ndHO`` as
  ``extras["2ndHO"]``); the official flat folder (all files side by side) works too.
- ``generic``: nnU-Net style ``dataset.json`` + ``imagesTr/<case>.png|jpg|tif`` (or
  ``<case>_0000.<ext>``) + ``labelsTr/<case>.png``; labels and channels come from dataset.json.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from hidiff.data.errors import DataError, preview
from hidiff.data.info import Case, DatasetInfo
from hidiff.data.io import load_case
from reference.files import IMAGE_SUFFIXES, natural_key

KeyFn = Callable[[str], "str | None"]


def _stem(stem: str) -> str:
    return stem


def _regex_key(pattern: str) -> KeyFn:
    compiled = re.compile(pattern)

    def key(stem: str) -> str | None:
        match = compiled.fullmatch(stem)
        return match.group(1) if match else None

    return key


def list_files(folder: Path, suffixes: tuple[str, ...], key: KeyFn, role: str,
               *, required: bool = True) -> dict[str, Path]:
    """Files of ``folder`` by case id (``key(stem)``; None = not this role's file)."""
    if not folder.is_dir():
        if not required:
            return {}
        raise DataError(folder, f"{role} folder not found")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in suffixes or not path.is_file():
            continue
        case_id = key(path.stem)
        if case_id is None:
            continue
        if case_id in found:
            raise DataError(path, f"two {role} files for case {case_id!r}: {found[case_id].name} "
                                  f"and {path.name}")
        found[case_id] = path
    if not found and required:
        wanted = ", ".join("*" + s for s in suffixes)
        raise DataError(folder, f"no {role} files ({wanted}) in this folder")
    return found


def pair_cases(image_dir: Path, mask_dir: Path, *, image_key: KeyFn = _stem,
               mask_key: KeyFn = _stem, image_suffixes: tuple[str, ...] = IMAGE_SUFFIXES,
               mask_suffixes: tuple[str, ...] = IMAGE_SUFFIXES,
               extras: dict[str, tuple[Path, KeyFn]] | None = None,
               subset: str | None = None) -> list[Case]:
    """Match image and mask files by case id; unmatched files are a ``DataError`` listing them.

    ``extras`` maps a role to ``(folder, key)`` for optional further files of a case.
    """
    images = list_files(image_dir, image_suffixes, image_key, "image")
    masks = list_files(mask_dir, mask_suffixes, mask_key, "mask")
    no_mask = sorted(set(images) - set(masks), key=natural_key)
    no_image = sorted(set(masks) - set(images), key=natural_key)
    if no_mask or no_image:
        parts = [f"{len(images)} images in {image_dir} but {len(masks)} masks in {mask_dir}"]
        if no_mask:
            parts.append("images without a mask: " + preview([images[i].name for i in no_mask]))
        if no_image:
            parts.append("masks without an image: " + preview([masks[i].name for i in no_image]))
        raise DataError(image_dir.parent, "; ".join(parts))
    extra_files = {
        role: list_files(folder, IMAGE_SUFFIXES, key, role, required=False)
        for role, (folder, key) in (extras or {}).items()
    }
    return [
        Case(case_id, images[case_id], masks[case_id],
             extras={role: files[case_id] for role, files in extra_files.items()
                     if case_id in files},
             subset=subset)
        for case_id in sorted(images, key=natural_key)
    ]


class DatasetReader:
    """Base reader: subclasses set ``name``, ``layout``, ``default_info``, ``_cases``."""

    name = ""
    layout = ""
    default_info: DatasetInfo

    def info(self, root: str | Path | None = None) -> DatasetInfo:
        """The dataset description (``root`` is needed only where it lives on disk)."""
        return self.default_info

    def list_cases(self, root: str | Path) -> list[Case]:
        """All labelled cases under ``root``, sorted by case id (natural order)."""
        root = Path(root)
        if not root.is_dir():
            raise DataError(root, f"dataset folder not found (expected the {self.name} layout: "
                                  f"{self.layout})")
        return self._cases(root)

    def _cases(self, root: Path) -> list[Case]:
        raise NotImplementedError

    def load(self, case: Case, info: DatasetInfo | None = None,
             ) -> tuple[np.ndarray, np.ndarray]:
        """Image float32 HWC in [0, 1] and mask uint8 HW of one case."""
        return load_case(case, info if info is not None else self.default_info)

    def open(self, root: str | Path) -> tuple[DatasetInfo, list[Case]]:
        return self.info(root), self.list_cases(root)


def _binary_info(name: str, target: str, modality: str, **kwargs: object) -> DatasetInfo:
    return DatasetInfo(name=name, labels={"background": 0, target: 1}, modality=modality,
                       mask_encoding="threshold", **kwargs)


class KvasirSegReader(DatasetReader):
    name = "kvasir-seg"
    layout = "images/<id>.jpg + masks/<id>.jpg"
    default_info = _binary_info("kvasir-seg", "polyp", "colonoscopy (RGB endoscopy)",
                                policy="resize", size=256)

    def _cases(self, root: Path) -> list[Case]:
        return pair_cases(root / "images", root / "masks")


class CvcClinicDbReader(DatasetReader):
    name = "cvc-clinicdb"
    layout = "Original/<n>.tif + Ground Truth/<n>.tif"
    default_info = _binary_info("cvc-clinicdb", "polyp", "colonoscopy (RGB endoscopy)",
                                policy="resize", size=256)

    def _cases(self, root: Path) -> list[Case]:
        return pair_cases(root / "Original", root / "Ground Truth")


class DriveReader(DatasetReader):
    name = "drive"
    layout = ("training/images/NN_training.tif + training/1st_manual/NN_manual1.gif, "
              "test/images/NN_test.tif + test/1st_manual/NN_manual1.gif")
    default_info = _binary_info("drive", "vessel", "retinal fundus photograph",
                                policy="tile", tile=256, overlap=64)

    def _cases(self, root: Path) -> list[Case]:
        cases: list[Case] = []
        for subset in ("training", "test"):
            folder = root / subset
            if not folder.is_dir():
                continue
            cases += pair_cases(
                folder / "images", folder / "1st_manual",
                image_key=_regex_key(rf"(\d+)_{subset}"), mask_key=_regex_key(r"(\d+)_manual1"),
                extras={"fov": (folder / "mask", _regex_key(rf"(\d+)_{subset}_mask")),
                        "manual2": (folder / "2nd_manual", _regex_key(r"(\d+)_manual2"))},
                subset=subset,
            )
        if not cases:
            raise DataError(root, f"neither training/ nor test/ found (DRIVE layout: "
                                  f"{self.layout})")
        ids = [c.case_id for c in cases]
        dupes = sorted({i for i in ids if ids.count(i) > 1}, key=natural_key)
        if dupes:
            raise DataError(root, f"case numbers in both training/ and test/: {preview(dupes)}")
        return cases


def chase_subject(case_id: str) -> str:
    """CHASE_DB1 subject (child) of a case: ``Image_07L`` -> ``07``; L and R are its two eyes."""
    match = re.search(r"(\d+)[LR]$", case_id)
    if match is None:
        raise ValueError(f"not a CHASE_DB1 case id (Image_NNL / Image_NNR): {case_id!r}")
    return match.group(1)


class ChaseDb1Reader(DatasetReader):
    name = "chase-db1"
    layout = "images/Image_NNX.jpg + manual/Image_NNX_1stHO.png (or all files in one folder)"
    default_info = _binary_info("chase-db1", "vessel", "retinal fundus photograph (child)",
                                policy="tile", tile=256, overlap=64)

    def _cases(self, root: Path) -> list[Case]:
        image_dir = root / "images" if (root / "images").is_dir() else root
        mask_dir = root / "manual" if (root / "images").is_dir() else root

        def image_key(stem: str) -> str | None:
            return None if re.search(r"_(1st|2nd)HO$", stem) else stem

        return pair_cases(image_dir, mask_dir, image_key=image_key,
                          mask_key=_regex_key(r"(.+)_1stHO"),
                          extras={"2ndHO": (mask_dir, _regex_key(r"(.+)_2ndHO"))})


class GenericReader(DatasetReader):
    name = "generic"
    layout = "dataset.json + imagesTr/<case>.png|jpg|tif + labelsTr/<case>.png"
    default_info = DatasetInfo(name="generic", mask_encoding="labels")

    def info(self, root: str | Path | None = None) -> DatasetInfo:
        if root is None:
            raise ValueError("the generic reader needs the dataset root (it reads dataset.json)")
        return DatasetInfo.load(Path(root) / "dataset.json", defaults=self.default_info)

    def _cases(self, root: Path) -> list[Case]:
        def image_key(stem: str) -> str | None:
            match = re.fullmatch(r"(.+)_(\d{4})", stem)
            if match is None:
                return stem
            if match.group(2) != "0000":
                raise DataError(root / "imagesTr", f"{stem}: one file per channel "
                                "(_0001, ...) is not supported; store the channels in one file")
            return match.group(1)

        self.info(root)  # fail early, naming dataset.json, if it is missing or invalid
        cases = pair_cases(root / "imagesTr", root / "labelsTr", image_key=image_key)
        described = json.loads((root / "dataset.json").read_text()).get("numTraining")
        if isinstance(described, int) and described != len(cases):
            raise DataError(root / "dataset.json", f"numTraining is {described} but imagesTr/ "
                                                   f"and labelsTr/ hold {len(cases)} cases")
        return cases

    def load(self, case: Case, info: DatasetInfo | None = None,
             ) -> tuple[np.ndarray, np.ndarray]:
        if info is None:
            raise ValueError("the generic reader's load needs the DatasetInfo from info(root)")
        return load_case(case, info)


_READERS: dict[str, DatasetReader] = {
    r.name: r for r in (KvasirSegReader(), CvcClinicDbReader(), DriveReader(),
                        ChaseDb1Reader(), GenericReader())
}


def available_readers() -> tuple[str, ...]:
    return tuple(sorted(_READERS))


def get_reader(name: str) -> DatasetReader:
    """The reader for a layout name (case and ``_``/``-`` insensitive)."""
    key = str(name).strip().lower().replace("_", "-")
    if key not in _READERS:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(available_readers())}")
    return _READERS[key]


def open_dataset(name: str, root: str | Path) -> tuple[DatasetInfo, list[Case]]:
    """``(info, cases)`` of the dataset ``name`` stored under ``root``."""
    return get_reader(name).open(root)
