"""``train_log.jsonl``: one JSON object per logged step, rewritten atomically on every append.

Records hold ``step`` (completed iterations), ``phase`` (``"pretrain"``, ``"alternate"`` or
``"refine"``: the refiner alone),
``epoch``, the losses of that step (``loss_refiner`` = L_diff of the binary refiner with its
``_kl``/``_focal`` parts, ``loss_refiner_fp``, ``loss_seg`` = L_seg, ``loss_seg_diff`` = L_diff
through the frozen refiner, ``loss_segmentor`` = L_seg + lambda_diff * L_diff), gradient norms,
``lr``, ``elapsed_s`` (training seconds over all sessions) and, when measured, ``val_dice``.
A record at step 0 may hold only the untrained model's ``val_dice``. Multi-process runs add
``param_sha256_by_rank`` (one digest of all parameters per rank) at checkpoints.

Keeping the records in memory and replacing the whole file keeps it valid whatever kills the
process; on resume, records after the checkpoint's step are dropped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from hidiff.model_dir import ModelDirError, atomic_write_text

__all__ = ["TrainLog", "read_log"]


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf
    return value


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """All records of a log file (``ModelDirError`` naming it if a line is not JSON)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            problem = f"has a line ({number}) that is not valid JSON: {err}"
            raise ModelDirError(path, problem) from err
    return records


class TrainLog:
    """In-memory records mirrored to ``path`` (``path`` None: memory only, e.g. ranks > 0)."""

    def __init__(self, path: str | Path | None, records: list[dict[str, Any]] | None = None):
        self.path = None if path is None else Path(path)
        self.records: list[dict[str, Any]] = list(records or [])

    @classmethod
    def resume(cls, path: str | Path | None, step: int) -> TrainLog:
        """The records of ``path`` up to ``step`` (later ones belong to a lost run segment)."""
        records = [] if path is None else read_log(path)
        log = cls(path, [r for r in records if int(r.get("step", 0)) <= step])
        log.flush()
        return log

    def append(self, record: dict[str, Any]) -> None:
        self.records.append({k: _clean(v) for k, v in record.items()})
        self.flush()

    def update_last(self, **values: Any) -> None:
        """Add keys to the latest record (e.g. a checkpoint digest for that step)."""
        if self.records:
            self.records[-1].update({k: _clean(v) for k, v in values.items()})
            self.flush()

    def flush(self) -> None:
        if self.path is not None:
            text = "".join(json.dumps(r, sort_keys=False) + "\n" for r in self.records)
            atomic_write_text(self.path, text)

    def last(self, key: str) -> Any:
        """The latest value logged for ``key`` (None if never)."""
        for record in reversed(self.records):
            if record.get(key) is not None:
                return record[key]
        return None
