"""python -m flashsloth.train flags: every user error is one line `error: ...` and exit code 2
before any work; a used output folder is refused without --resume / --overwrite; a resume
refuses what changes the model and warns about, records and uses what changes the data or
the schedule."""

import json
import os
import shutil

import pytest
import torch

from flashsloth.synthetic import GroundingSpec, generate
from flashsloth.train import main, read_metrics


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("flags_data")
    generate(str(out), GroundingSpec(train=8, test=0, turns=1, seed=6))
    return str(out)


def _args(data_dir, out, *extra):
    return ["--stage", "2", "--preset", "tiny", "--data", os.path.join(data_dir, "train.jsonl"),
            "--output-dir", str(out), "--system", "", "--batch-size", "2", "--lr", "1e-3",
            "--no-progress", "--threads", "1", "--max-steps", "2", "--save-every", "1", *extra]


def _run(argv):
    try:
        return main(argv)
    except SystemExit as exc:             # argparse's errors
        return exc.code


def _one_line_error(capsys, *words):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err, (w, err)
    return err


@pytest.mark.parametrize("flag,value", [
    ("--max-grad-norm", "-1"), ("--max-grad-norm", "nan"), ("--epochs", "-1"),
    ("--epochs", "nan"), ("--epochs", "inf"), ("--epochs", "0"), ("--save-every", "-1"),
    ("--threads", "-1"), ("--threads", "0"), ("--lr", "-0.001"), ("--lr", "nan"),
    ("--weight-decay", "-0.1"), ("--warmup-ratio", "1"), ("--batch-size", "0"),
    ("--grad-accum", "0"), ("--max-steps", "0"), ("--max-length", "0"),
    ("--eval-every", "-2"), ("--log-every", "0"), ("--num-workers", "-1"),
])
def test_out_of_range_flags_are_one_line_errors(flag, value, data_dir, tmp_path, capsys):
    argv = _args(data_dir, tmp_path / "run")
    argv += [flag, value]
    assert _run(argv) == 2
    _one_line_error(capsys, flag, value)
    assert not (tmp_path / "run").exists()            # before any work


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "bogus", "meta"])
def test_unavailable_device_is_refused(device, data_dir, tmp_path, capsys):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert _run(_args(data_dir, tmp_path / "run", "--device", device)) == 2
    _one_line_error(capsys, "--device", device)


def test_output_dir_that_is_a_file_or_cannot_be_written(data_dir, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert _run(_args(data_dir, f)) == 2
    _one_line_error(capsys, "--output-dir", "not a directory")
    assert _run(_args(data_dir, f / "below")) == 2
    _one_line_error(capsys, "--output-dir")
    # a location nobody can create a folder in (root included)
    assert _run(_args(data_dir, "/proc/self/flashsloth-run")) == 2
    _one_line_error(capsys, "--output-dir", "cannot write")
    if os.geteuid() != 0:                             # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            assert _run(_args(data_dir, ro)) == 2
            _one_line_error(capsys, "--output-dir", "cannot write")
        finally:
            ro.chmod(0o755)


def test_max_length_longer_than_the_context_is_refused_at_start(data_dir, tmp_path, capsys):
    assert _run(_args(data_dir, tmp_path / "run", "--max-length", "100000")) == 2
    _one_line_error(capsys, "--max-length", "100000", "512")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.fixture(scope="module")
def finished(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(_args(data_dir, out)) == 0
    return out


def _copy(run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def test_a_used_output_dir_needs_resume_or_overwrite(finished, data_dir, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    before = (out / "metrics.jsonl").read_text()
    assert _run(_args(data_dir, out)) == 2
    _one_line_error(capsys, "already holds a run", "--resume latest", "--overwrite")
    assert (out / "metrics.jsonl").read_text() == before        # untouched
    assert _run(_args(data_dir, out, "--overwrite", "--resume", "latest")) == 2
    capsys.readouterr()
    (out / "keep.txt").write_text("mine")
    assert _run(_args(data_dir, out, "--overwrite", "--max-steps", "1", "--save-every", "0")) == 0
    assert [r["step"] for r in read_metrics(str(out / "metrics.jsonl"))] == [1]
    assert sorted(os.listdir(out)) == ["checkpoint-0000001", "final", "keep.txt", "loss.png",
                                       "metrics.jsonl", "run.json", "skipped_lines.txt",
                                       "summary.json"]


def test_resume_refuses_a_compression_that_changes_the_model(finished, data_dir, tmp_path,
                                                            capsys):
    out = _copy(finished, tmp_path)
    argv = _args(data_dir, out, "--resume", str(out / "checkpoint-0000001"))
    assert _run([*argv, "--compression", "sap"]) == 2
    _one_line_error(capsys, "--compression sap", "'flashsloth'")
    assert _run([*argv, "--compression", "flashsloth"]) == 0      # the same mode is fine


def test_resume_warns_records_and_uses_a_new_lr_and_data(finished, data_dir, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    other = tmp_path / "other.jsonl"
    lines = open(os.path.join(data_dir, "train.jsonl")).read().splitlines()
    other.write_text("\n".join(reversed(lines)) + "\n")
    shutil.copytree(os.path.join(data_dir, "images"), tmp_path / "images")
    argv = _args(data_dir, out, "--resume", str(out / "checkpoint-0000001"), "--lr", "4e-3",
                 "--tokenizer", data_dir)
    argv[argv.index("--data") + 1] = str(other)
    assert _run(argv) == 0
    err = capsys.readouterr().err
    assert "warning: --resume: lr changed from 0.001 to 0.004" in err
    assert "warning: --resume: data changed" in err
    run = json.loads((out / "run.json").read_text())
    changes = {c["setting"]: c for c in run["changes"]}
    assert changes["lr"] == {"step": 1, "setting": "lr", "from": 1e-3, "to": 4e-3}
    assert changes["data"]["to"] == str(other)
    state = json.loads((out / "checkpoint-0000002" / "trainer_state.json").read_text())
    assert state["run"]["changes"] == run["changes"]
    # the new peak lr is used from the resumed step on (same schedule position)
    old = {r["step"]: r["lr"] for r in read_metrics(str(finished / "metrics.jsonl"))
           if r["split"] == "train"}
    new = {r["step"]: r["lr"] for r in read_metrics(str(out / "metrics.jsonl"))
           if r["split"] == "train"}
    assert new[1] == old[1] and new[2] == pytest.approx(4 * old[2], rel=1e-12)


def test_an_image_that_fails_to_decode_is_skipped_and_reported_or_stops(data_dir, tmp_path,
                                                                        capsys):
    """It passes PIL's verify() at start and fails when its batch is loaded: the run skips it
    (reported with file:line, like other bad lines) and continues; --on-bad error stops."""
    import io

    from PIL import Image

    shutil.copytree(os.path.join(data_dir, "images"), tmp_path / "images")
    import numpy as np

    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 255, (84, 84, 3), np.uint8)
    Image.fromarray(noise).save(buf, "JPEG")
    jpg = buf.getvalue()
    (tmp_path / "images" / "trunc.jpg").write_bytes(jpg[:len(jpg) // 2])
    rows = open(os.path.join(data_dir, "train.jsonl")).read().splitlines()
    rec = json.loads(rows[2])
    rec["image"] = "images/trunc.jpg"
    rows[2] = json.dumps(rec)
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(rows) + "\n")
    base = _args(data_dir, tmp_path / "skip", "--tokenizer", data_dir, "--max-steps", "4",
                 "--save-every", "0")
    base[base.index("--data") + 1] = str(data)
    assert _run(base) == 0
    err = capsys.readouterr().err
    assert f"skipped {data}:3: undecodable image:" in err and err.count("data.jsonl:3:") == 1
    assert f"{data}:3: undecodable image" in (tmp_path / "skip" / "skipped_lines.txt").read_text()
    rows_ = [r for r in read_metrics(str(tmp_path / "skip" / "metrics.jsonl"))]
    assert sum(r["samples"] for r in rows_) == 4 * 2 - 1          # the bad sample is not counted
    base[base.index("--output-dir") + 1] = str(tmp_path / "stop")
    assert _run([*base, "--on-bad", "error"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 1 bad line(s)") and f"{data}:3: undecodable image" in err
    # --check-images decode finds it at start instead
    base[base.index("--output-dir") + 1] = str(tmp_path / "decode")
    assert _run([*base, "--check-images", "decode"]) == 0
    assert f"skipped {data}:3: unreadable image" in capsys.readouterr().err
