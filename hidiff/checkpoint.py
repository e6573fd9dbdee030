"""``checkpoint.pt``: networks, optimizers, every RNG state and the training arguments.

Layout (a dict, loadable with ``torch.load(..., weights_only=True)``)::

    format_version   1
    step             completed iterations (the data position follows, hidiff/training/batches.py)
    refiner_steps    refiner-phase iterations so far (alternating and refiner-alone): the data
                     position of the refiner's own batches under --refiner-holdout (absent in
                     older files: 0)
    segmentor / refiner / refiner_fp (None without the twin)        state dicts
    optimizers       {"segmentor", "refiner", "refiner_fp" (or None)} optimizer state dicts
    rng              [{"torch", "cuda", "numpy", "python", "diffusion"} one dict per rank]
    train_args       the arguments that define the run (seed, batch size, lr, ...)
    elapsed_s        training seconds so far (all sessions)
    world_size       processes that wrote it (the diffusion RNG has one state per rank)

The file is written atomically (temporary file + ``os.replace``).
"""

from __future__ import annotations

import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hidiff.model_files import ModelDirError, atomic_write

__all__ = [
    "CHECKPOINT_VERSION", "capture_global_rng", "load_checkpoint", "restore_global_rng",
    "save_checkpoint",
]

CHECKPOINT_VERSION = 1
REQUIRED_KEYS = ("step", "segmentor", "refiner")


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """``torch.save(payload)`` to ``path`` atomically."""
    payload = {"format_version": CHECKPOINT_VERSION, **payload}
    return atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | Path, *, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint; ``ModelDirError`` naming the file when missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise ModelDirError(path, "is missing: train first or pass the right folder")
    if path.stat().st_size == 0:
        raise ModelDirError(path, "is empty (0 bytes): a run was killed while creating it, or "
                                  "the file was truncated; train again or restore the file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "unsupported global" in str(err).lower():  # weights_only refused an object
            raise ModelDirError(path, "holds Python objects other than tensors and plain data, "
                                      "so it is not a hidiff checkpoint and is not loaded (an "
                                      "untrusted file could run code when unpickled)") from err
        raise ModelDirError(path, f"is corrupt or not a hidiff checkpoint ({err})") from err
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelDirError(path, f"is corrupt or not a hidiff checkpoint ({reason})") from err
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        raise ModelDirError(path, f"is not a hidiff checkpoint (needs keys {REQUIRED_KEYS})")
    version = ckpt.get("format_version", CHECKPOINT_VERSION)
    if version != CHECKPOINT_VERSION:
        raise ModelDirError(path, f"has checkpoint format_version {version!r}; this hidiff "
                                  f"reads version {CHECKPOINT_VERSION}")
    return ckpt


def capture_global_rng() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and python global RNG states, in weights_only-safe types."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos),
                  int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }


def restore_global_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_global_rng`."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
