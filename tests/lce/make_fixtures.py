"""Build the LCE tests' model fixtures; run with the MAIN environment's python (torch, onnx).

    python tests/lce/make_fixtures.py OUT_DIR

Writes ``OUT_DIR/model`` (the "tiny" preset with random weights, as the export tests make it:
zero-initialised layers and batch-norm statistics re-drawn so nothing is trivially constant),
``OUT_DIR/onnx`` (``export_model_dir``) and ``OUT_DIR/onnx/refiner_step.tflite`` with its
``refiner_step.lce.json`` (``export.lce.export_lce``, batch 1). About 25 s on 2 cores.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def build(out: Path) -> Path:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import torch

    from export import export_model_dir
    from export.lce import export_lce

    torch.set_num_threads(1)
    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))
    from model_factory import make_model_dir

    model = make_model_dir(out / "model", "tiny", fp_twin=False)
    export_model_dir(model, out / "onnx")
    return export_lce(out / "onnx", out / "onnx")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    start = time.perf_counter()
    path = build(Path(argv[0]))
    print(f"{path} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
