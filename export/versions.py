"""The ONNX opsets and IR versions the exporter writes (no imports: the command line's help
text reads them without loading torch or onnx)."""

from __future__ import annotations

__all__ = ["MIN_IR", "SUPPORTED_IR_VERSIONS", "SUPPORTED_OPSETS"]

SUPPORTED_OPSETS: tuple[int, ...] = (17, 18, 19, 20)
SUPPORTED_IR_VERSIONS: tuple[int, ...] = (8, 9, 10)
MIN_IR = {17: 8, 18: 8, 19: 9, 20: 9}  # onnx.helper.find_min_ir_version_for
