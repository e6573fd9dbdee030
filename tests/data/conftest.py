"""Small synthetic datasets in the official layouts, written into tmp_path."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
from PIL import Image

H, W = 24, 32


def rgb(seed: int, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def blob(h: int = H, w: int = W, *, top: int = 4, left: int = 6, value: int = 255) -> np.ndarray:
    """A 0/``value`` mask with an asymmetric L-shaped foreground."""
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[top:top + 10, left:left + 4] = value
    mask[top + 7:top + 10, left:left + 12] = value
    return mask


def save_palette_gif(path: Path, vessel: np.ndarray, *, inverted_palette: bool = False) -> None:
    """A palette-mode GIF: black background, white vessels (DRIVE style).

    ``inverted_palette``: index 0 is white and index 1 black (indices swapped accordingly), so
    only the palette colours, not the indices, tell vessel from background.
    """
    index = (vessel > 0).astype(np.uint8)
    palette = [0, 0, 0, 255, 255, 255]
    if inverted_palette:
        index = 1 - index
        palette = [255, 255, 255, 0, 0, 0]
    img = Image.frombytes("P", (vessel.shape[1], vessel.shape[0]), index.tobytes())
    img.putpalette(palette + [0] * (768 - len(palette)))
    img.save(path, format="GIF")


@pytest.fixture
def kvasir_like(tmp_path: Path) -> Callable[..., Path]:
    """``make(n)``: a Kvasir-SEG layout with n RGB JPEG pairs (masks as RGB JPEG too)."""

    def make(n: int = 3, name: str = "kvasir") -> Path:
        root = tmp_path / name
        (root / "images").mkdir(parents=True)
        (root / "masks").mkdir()
        for i in range(n):
            Image.fromarray(rgb(i)).save(root / "images" / f"case{i}.jpg", quality=90)
            mask = np.repeat(blob(top=2 + i)[..., None], 3, axis=-1)
            Image.fromarray(mask).save(root / "masks" / f"case{i}.jpg", quality=75)
        return root

    return make


@pytest.fixture
def cvc_root(tmp_path: Path) -> Path:
    """CVC-ClinicDB layout: Original/N.tif (RGB TIFF) + Ground Truth/N.tif (mask TIFF)."""
    root = tmp_path / "CVC-ClinicDB"
    (root / "Original").mkdir(parents=True)
    (root / "Ground Truth").mkdir()
    for n in (1, 2, 10):
        tifffile.imwrite(root / "Original" / f"{n}.tif", rgb(n), photometric="rgb")
    tifffile.imwrite(root / "Ground Truth" / "1.tif", blob())  # 0/255
    grey = blob()
    grey[grey == 0] = 0
    grey[0, :] = 100  # below the half-range threshold
    grey[1, :] = 200  # above it
    tifffile.imwrite(root / "Ground Truth" / "2.tif", grey)
    tifffile.imwrite(root / "Ground Truth" / "10.tif", blob() > 0)  # 1-bit
    return root


@pytest.fixture
def drive_root(tmp_path: Path) -> Path:
    """DRIVE layout: TIFF images, palette GIF manual annotations and FOV masks."""
    root = tmp_path / "DRIVE"
    for subset, numbers in (("training", (21, 22)), ("test", (1, 2))):
        for folder in ("images", "1st_manual", "mask"):
            (root / subset / folder).mkdir(parents=True)
        for n in numbers:
            tifffile.imwrite(root / subset / "images" / f"{n:02d}_{subset}.tif", rgb(n),
                             photometric="rgb")
            save_palette_gif(root / subset / "1st_manual" / f"{n:02d}_manual1.gif",
                             blob(top=n % 5), inverted_palette=(n == 22))
            fov = np.full((H, W), 255, dtype=np.uint8)
            fov[:2] = 0
            save_palette_gif(root / subset / "mask" / f"{n:02d}_{subset}_mask.gif", fov)
    (root / "test" / "2nd_manual").mkdir()
    save_palette_gif(root / "test" / "2nd_manual" / "01_manual2.gif", blob(top=3))
    return root


@pytest.fixture
def generic_root(tmp_path: Path) -> Callable[..., Path]:
    """``make(labels, masks, channels=3, suffix="_0000")``: an nnU-Net style folder."""

    def make(labels: dict, masks: list[np.ndarray], *, channels: int = 3,
             suffix: str = "_0000", name: str = "Dataset001_Test", **extra: object) -> Path:
        root = tmp_path / name
        (root / "imagesTr").mkdir(parents=True)
        (root / "labelsTr").mkdir()
        names = ["R", "G", "B"] if channels == 3 else ["gray"]
        description = {"channel_names": {str(i): c for i, c in enumerate(names)},
                       "labels": labels, "numTraining": len(masks), "file_ending": ".png",
                       **extra}
        (root / "dataset.json").write_text(json.dumps(description))
        for i, mask in enumerate(masks):
            image = rgb(i) if channels == 3 else rgb(i)[..., 0]
            Image.fromarray(image).save(root / "imagesTr" / f"case_{i:03d}{suffix}.png")
            Image.fromarray(mask).save(root / "labelsTr" / f"case_{i:03d}.png")
        return root

    return make


@pytest.fixture
def synth() -> SimpleNamespace:
    """The helpers above for tests (conftest modules are not importable by name)."""
    return SimpleNamespace(rgb=rgb, blob=blob, save_palette_gif=save_palette_gif, H=H, W=W)
