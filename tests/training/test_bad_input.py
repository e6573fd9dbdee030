"""Bad input fails early with a clear message and writes nothing; broken model folders are
named in the error."""

from __future__ import annotations

import json
import re

import pytest
import torch

import hidiff.training.loop as loop
from hidiff.config import preset
from hidiff.data import DataError, DatasetInfo, load_split
from hidiff.model_dir import read_dataset_info, read_split, write_model_files
from hidiff.training import FORMAT_VERSION, ModelDirError, load_model_dir, train

pytestmark = pytest.mark.data


def _train(root, out, **kw):
    args = dict(dataset="kvasir-seg", data=root, preset="tiny", out=out, max_steps=1,
                limit_cases=4, batch_size=2, progress=False)
    return train(**{**args, **kw})


def test_unknown_preset_lists_the_presets(kvasir_root, tmp_path):
    with pytest.raises(ValueError, match=r"unknown preset 'huge'.*'cpu-small'.*'tiny'"):
        _train(kvasir_root, tmp_path / "m", preset="huge")
    assert not (tmp_path / "m").exists()


def test_unknown_dataset_lists_the_datasets(kvasir_root, tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset 'kvasir'.*chase-db1.*kvasir-seg"):
        _train(kvasir_root, tmp_path / "m", dataset="kvasir")
    assert not (tmp_path / "m").exists()


def test_out_is_a_file(kvasir_root, tmp_path):
    out = tmp_path / "model"
    out.write_text("keep me")
    with pytest.raises(ModelDirError, match="exists and is a file"):
        _train(kvasir_root, out)
    assert out.read_text() == "keep me" and sorted(tmp_path.iterdir()) == [out]


def test_empty_data_folder_is_named(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=str(empty)):
        _train(empty, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_argument_errors(kvasir_root, tmp_path):
    with pytest.raises(ValueError, match="max_steps or max_minutes"):
        _train(kvasir_root, tmp_path / "m", max_steps=None)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        _train(kvasir_root, tmp_path / "m", batch_size=0)
    with pytest.raises(ValueError, match=r"refiner_holdout must be in \[0, 1\)"):
        _train(kvasir_root, tmp_path / "m", refiner_holdout=1.0)
    with pytest.raises(ValueError, match="lambda_y0 must be >= 0"):
        _train(kvasir_root, tmp_path / "m", lambda_y0=-1.0)
    with pytest.raises(ValueError, match="y0_term must be one of both, refiner; got 'segmentor'"):
        _train(kvasir_root, tmp_path / "m", y0_term="segmentor")
    with pytest.raises(ValueError, match="segmentor_schedule must be one of constant, cosine; "
                                         "got 'linear'"):
        _train(kvasir_root, tmp_path / "m", segmentor_schedule="linear")
    with pytest.raises(ValueError, match=r"refine_after_steps=1 is before the end of "
                                         r"pre-training \(pretrain_steps=2\)"):
        _train(kvasir_root, tmp_path / "m", pretrain_steps=2, refine_after_steps=1)
    with pytest.raises(ValueError, match=r"refine_after_minutes=1 is before the end of "
                                         r"pre-training \(pretrain_minutes=2"):
        _train(kvasir_root, tmp_path / "m", pretrain_minutes=2, refine_after_minutes=1)
    with pytest.raises(ValueError, match="refine_after_steps=0 on a new run would never "
                                         "train its segmentor"):
        _train(kvasir_root, tmp_path / "m", refine_after_steps=0)
    with pytest.raises(ValueError, match="refine_after_minutes=0 on a new run"):
        _train(kvasir_root, tmp_path / "m", refine_after_minutes=0.0)
    with pytest.raises(ValueError, match="refine_after_minutes must be >= 0"):
        _train(kvasir_root, tmp_path / "m", refine_after_minutes=-0.5)
    with pytest.raises(ValueError, match="refine_after_steps must be an integer >= 0"):
        _train(kvasir_root, tmp_path / "m", refine_after_steps=1.5)
    with pytest.raises(ValueError, match="leaves 0 for the refiner"):
        _train(kvasir_root, tmp_path / "m", limit_cases=2, refiner_holdout=0.1)
    with pytest.raises(ValueError, match="device 'bogus' is not a device name; allowed: cpu, "
                                         "cuda, cuda:N"):
        _train(kvasir_root, tmp_path / "m", device="bogus")
    with pytest.raises(ValueError, match="device 'cuda:99': this machine has"):
        _train(kvasir_root, tmp_path / "m", device="cuda:99")
    with pytest.raises(ValueError, match="device 'cuda:999': index out of range"):
        _train(kvasir_root, tmp_path / "m", device="cuda:999")  # torch.device keeps 8 bits
    assert not (tmp_path / "m").exists()


def test_non_empty_out_needs_resume_and_resume_needs_a_checkpoint(kvasir_root, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "notes.txt").write_text("x")
    with pytest.raises(ModelDirError, match="not empty: pass --resume"):
        _train(kvasir_root, out)
    with pytest.raises(ModelDirError, match=r"checkpoint.pt is missing and the folder holds other "
                                            r"files \(notes.txt\): nothing to resume"):
        _train(kvasir_root, out, resume=True)
    with pytest.raises(ModelDirError, match="does not exist: nothing to resume"):
        _train(kvasir_root, tmp_path / "never", resume=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_failure_before_the_first_checkpoint_removes_the_folder(kvasir_root, tmp_path,
                                                                monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(loop, "train_step", broken)
    with pytest.raises(RuntimeError, match="boom"):
        _train(kvasir_root, tmp_path / "m")
    assert not (tmp_path / "m").exists()
    existing = tmp_path / "given"  # a folder the user made is kept, emptied of our files
    existing.mkdir()
    with pytest.raises(RuntimeError, match="boom"):
        _train(kvasir_root, existing)
    assert existing.is_dir() and not list(existing.iterdir())


def test_max_minutes_stop_still_checkpoints(kvasir_root, tmp_path):
    result = _train(kvasir_root, tmp_path / "m", max_steps=None, max_minutes=1e-4)
    assert result.stopped_by == "max_minutes"
    assert load_model_dir(tmp_path / "m").step == result.step


def test_cli_reports_bad_input_with_exit_status_2(kvasir_root, tmp_path, cli):
    proc = cli.run(cli.args(kvasir_root, tmp_path / "m", "--max-steps", "1") + ["--preset",
                                                                                "nope"])
    assert proc.returncode == 2 and "unknown preset 'nope'" in proc.stderr
    assert not (tmp_path / "m").exists()


def test_cli_reports_a_diverged_run_with_exit_status_1(kvasir_root, tmp_path, cli):
    """At lr 1e30 the first step's update overflows the segmentor's weights: the non-finite
    loss is reported (step, losses, the lr, what was kept) with exit 1 and no traceback, and the
    fresh run's folder, which had no checkpoint yet, is removed."""
    proc = cli.run(cli.args(kvasir_root, tmp_path / "m", "--max-steps", "4", "--lr", "1e30",
                            "--limit-cases", "8", "--batch-size", "2"))
    assert proc.returncode == 1, proc.stderr
    assert re.search(r"error: training diverged: non-finite loss at step \d+ \(.*nan", proc.stderr)
    assert "lower --lr (it was 1e+30)" in proc.stderr and "nothing was kept" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "m").exists()


class _Payload:
    """Unpickling this would create ``path`` (stands in for arbitrary code)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def header_only(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    write_model_files(folder, config=preset("tiny"), dataset_info=DatasetInfo(name="x"),
                      split=load_split("kvasir-seg"))
    return folder


def test_load_model_dir_errors_name_the_file(tmp_path, header_only):
    with pytest.raises(ModelDirError, match="does not exist"):
        load_model_dir(tmp_path / "nowhere")
    with pytest.raises(ModelDirError, match=r"model[/\\]checkpoint.pt is missing: train first"):
        load_model_dir(header_only)
    (header_only / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelDirError, match=r"checkpoint.pt is corrupt"):
        load_model_dir(header_only)
    torch.save({"step": 1}, header_only / "checkpoint.pt")
    with pytest.raises(ModelDirError, match="not a hidiff checkpoint"):
        load_model_dir(header_only)
    (header_only / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(ModelDirError, match=r"checkpoint.pt is empty \(0 bytes\)"):
        load_model_dir(header_only)
    # a pickled object (it would run code if unpickled): refused, never executed
    marker = header_only / "executed"
    torch.save({"step": 1, "segmentor": _Payload(marker), "refiner": {}},
               header_only / "checkpoint.pt")
    with pytest.raises(ModelDirError, match="is not loaded .*untrusted") as err:
        load_model_dir(header_only)
    assert "weights_only" not in str(err.value) and not marker.exists()
    (header_only / "config.json").write_text("{broken")
    with pytest.raises(ModelDirError, match=r"config.json is corrupt"):
        load_model_dir(header_only)


def test_invalid_model_files_say_what_is_wrong(header_only):
    info = json.loads((header_only / "dataset.json").read_text())
    info["preprocessing"]["size"] = "big"
    (header_only / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(ModelDirError, match=r"dataset.json is corrupt or invalid: preprocessing "
                                            r"size must be an integer; got 'big'"):
        read_dataset_info(header_only)
    (header_only / "split.json").write_text("[]")
    with pytest.raises(ModelDirError, match=r"split.json is corrupt or invalid: a split must be a "
                                            r"JSON object .*; got list"):
        read_split(header_only)


def test_unknown_format_version_is_refused(header_only):
    path = header_only / "hidiff_model.json"
    header = json.loads(path.read_text())
    assert header["format_version"] == FORMAT_VERSION == 1
    path.write_text(json.dumps({**header, "format_version": 2}))
    with pytest.raises(ModelDirError, match="format_version 2"):
        load_model_dir(header_only)


def test_refiner_holdout_smaller_than_the_process_count_is_named(kvasir_root, tmp_path):
    """Under DDP each process needs a refiner case: 2 held-out cases cannot feed 4 processes
    (checked before any network is built or wrapped, so no process group is needed here)."""
    from hidiff.training.distributed import DistContext
    from hidiff.training.run_state import build_state
    from hidiff.training.setup import TrainArgs, prepare_run

    args = TrainArgs(dataset="kvasir-seg", data=str(kvasir_root), preset="tiny",
                     out=str(tmp_path / "m"), max_steps=1, batch_size=2, limit_cases=8,
                     refiner_holdout=0.25)
    spec = prepare_run(args)
    with pytest.raises(ValueError, match=r"refiner_holdout=0\.25 leaves 2 case\(s\) for the "
                                         r"refiner, fewer than the 4 processes"):
        build_state(spec, DistContext(world_size=4))
