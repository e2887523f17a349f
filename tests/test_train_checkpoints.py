"""Training checkpoints that survive a kill at any instant (flashsloth.training.checkpoints):
completeness, the swap of a re-written checkpoint, clean-up of killed writes, a full disk, and
fault injection (a kill at every write step, in-process and with a real SIGKILL) followed by
``--resume latest``, which must match an uninterrupted run exactly."""

import errno
import json
import os
import subprocess
import sys

import pytest
import torch

from flashsloth import FlashSloth
from flashsloth.synthetic import GroundingSpec, generate
from flashsloth.train import main, read_metrics
from flashsloth.training import checkpoints as ckpt


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt_data")
    generate(str(out), GroundingSpec(train=8, test=0, turns=1, seed=5))
    return str(out)


def _args(data_dir, out, *extra):
    return ["--stage", "2", "--preset", "tiny", "--data", os.path.join(data_dir, "train.jsonl"),
            "--output-dir", str(out), "--system", "", "--batch-size", "2", "--lr", "1e-3",
            "--no-progress", "--threads", "1", "--max-steps", "2", "--save-every", "1", *extra]


class _Killed(BaseException):
    """Stands for SIGKILL in-process: nothing of the trainer's code runs after it (the
    checkpoint writer has no try/finally that would tidy up)."""


def _record(monkeypatch):
    labels = []
    monkeypatch.setattr(ckpt, "_fault_point", labels.append)
    return labels


def _kill_at(monkeypatch, n):
    count = [0]

    def point(label):
        count[0] += 1
        if count[0] == n:
            raise _Killed(label)

    monkeypatch.setattr(ckpt, "_fault_point", point)


def _train_rows(out):
    return [(r["step"], r["loss"], r["lr"]) for r in read_metrics(str(out / "metrics.jsonl"))
            if r["split"] == "train"]


def _weights(path):
    return FlashSloth.from_pretrained(str(path)).state_dict()


def _assert_same_run(a, b):
    assert _train_rows(b) == _train_rows(a)                     # every step's loss, exactly
    wa, wb = _weights(a / "final"), _weights(b / "final")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    for n, path in ckpt.list_checkpoints(str(a)):
        assert ckpt.is_complete(os.path.join(str(b), os.path.basename(path))), n
    assert not [e for e in os.listdir(b) if e.startswith(".")]  # no leftovers


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):
    """An uninterrupted run, and the labels of its write steps (in order)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    mp = pytest.MonkeyPatch()
    labels = _record(mp)
    try:
        assert main(_args(data_dir, out)) == 0
    finally:
        mp.undo()
    return out, labels


def test_checkpoint_parts_and_marker(straight):
    out, labels = straight
    c1 = out / "checkpoint-0000001"
    marker = json.loads((c1 / ckpt.MARKER).read_text())
    assert set(marker["files"]) == {"config.json", "model.safetensors", "optimizer.pt",
                                    "trainer_state.pt", "trainer_state.json", "rng_state_0.pt"}
    assert marker["step"] == 1 and marker["world_size"] == 1
    assert ckpt.is_complete(str(out / "final")) and (out / "final" / "tokenizer.json").is_file()
    assert ckpt.latest_checkpoint(str(out)) == str(out / "checkpoint-0000002")
    # every file of the write has a kill point before and after it
    assert labels[:8] == ["checkpoint-0000001: " + s for s in (
        "before", "weights written", "optimizer.pt written", "trainer_state.pt written",
        "trainer_state.json written", "rng_state_0.pt written", "marker written",
        "renamed into place")]
    assert labels[-5:] == ["final: before", "final: weights written",
                           "final: tokenizer.json written", "final: marker written",
                           "final: renamed into place"]


def test_incomplete_checkpoints_are_never_chosen_and_say_what_is_missing(straight, tmp_path,
                                                                         data_dir, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(straight[0], out)
    c1, c2 = out / "checkpoint-0000001", out / "checkpoint-0000002"
    (c2 / "rng_state_0.pt").unlink()
    assert ckpt.checkpoint_problems(str(c2)) == ["rng_state_0.pt (missing)"]
    assert ckpt.latest_checkpoint(str(out)) == str(c1)
    with open(c1 / "optimizer.pt", "r+b") as fh:           # truncated
        fh.truncate(10)
    assert "optimizer.pt (10 bytes" in ckpt.checkpoint_problems(str(c1))[0]
    assert ckpt.latest_checkpoint(str(out)) is None
    (out / "final" / ckpt.MARKER).unlink()
    assert "completion marker" in ckpt.checkpoint_problems(str(out / "final"))[0]
    # an explicit resume names what is missing: one line, exit 2
    assert main(_args(data_dir, out, "--resume", str(c2))) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume:") and "rng_state_0.pt (missing)" in err
    assert err.count("\n") == 1
    # --resume latest passes over both and starts from scratch, saying so
    assert main(_args(data_dir, out, "--resume", "latest")) == 0
    err = capsys.readouterr().err
    assert "passing over the incomplete" in err and "starting from scratch" in err
    _assert_same_run(straight[0], out)


def test_clean_leftovers_restores_a_swapped_aside_checkpoint(tmp_path):
    out = tmp_path
    (out / ".checkpoint-0000003.replaced").mkdir()          # kill between the swap's renames
    (out / ".checkpoint-0000003.replaced" / "x").write_text("old")
    (out / ".checkpoint-0000004.partial").mkdir()            # kill inside a write
    (out / ".checkpoint-0000005.replaced").mkdir()           # kill after the swap
    (out / "checkpoint-0000005").mkdir()
    (out / ".metrics.jsonl.tmp-123").write_text("{")
    done = ckpt.clean_leftovers(str(out))
    assert len(done) == 4
    assert (out / "checkpoint-0000003" / "x").read_text() == "old"
    assert sorted(os.listdir(out)) == ["checkpoint-0000003", "checkpoint-0000005"]


def test_a_finished_run_resumes_with_a_clear_message(straight, tmp_path, data_dir, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(straight[0], out)
    assert main(_args(data_dir, out, "--resume", "latest")) == 0
    assert "already finished: step 2 of 2" in capsys.readouterr().out
    # killed between the last checkpoint and final/: the resume writes final/ only
    shutil.rmtree(out / "final")
    assert main(_args(data_dir, out, "--resume", "latest")) == 0
    _assert_same_run(straight[0], out)


@pytest.mark.parametrize("where", ["up front", "optimizer.pt written", "rng_state_0.pt written",
                                   "final: weights written"])
def test_disk_full_names_the_path_and_space_and_keeps_the_previous_checkpoint(
        where, data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    previous = out / ("checkpoint-0000002" if where.startswith("final") else "checkpoint-0000001")
    if where == "up front":
        calls = [0]
        real = ckpt._free_bytes

        def free(folder):
            calls[0] += 1
            return 1000 if calls[0] >= 2 else real(folder)     # the second write finds 1000 B
        monkeypatch.setattr(ckpt, "_free_bytes", free)
    else:
        def point(label):
            if label.endswith(where) and (where.startswith("final") or "0000002" in label):
                raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(ckpt, "_fault_point", point)
    assert main(_args(data_dir, out)) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no space left on the device to write") and "\n" not in err
    target = "final" if where.startswith("final") else "checkpoint-0000002"
    assert os.path.join(str(out), target) in err and "it needs about" in err
    assert "MB" in err and f"the previous checkpoint {previous} is intact" in err
    assert ckpt.is_complete(str(previous))
    assert not [e for e in os.listdir(out) if e.startswith(".")]


def test_fault_injection_kill_at_every_write_step_then_resume_latest(straight, data_dir,
                                                                     tmp_path, monkeypatch):
    """A kill at each write step of a run (checkpoint-1, checkpoint-2, final/), then
    --resume latest: the same losses, weights and checkpoints as the uninterrupted run."""
    ref, labels = straight
    for n in range(1, len(labels) + 1):
        out = tmp_path / f"kill{n}"
        _kill_at(monkeypatch, n)
        with pytest.raises(_Killed):
            main(_args(data_dir, out))
        monkeypatch.setattr(ckpt, "_fault_point", lambda label: None)
        assert main(_args(data_dir, out, "--resume", "latest")) == 0, labels[n - 1]
        _assert_same_run(ref, out)


def test_fault_injection_during_the_rewrite_of_existing_checkpoints(straight, data_dir,
                                                                    tmp_path, monkeypatch):
    """Resume from checkpoint-1 of a finished run: checkpoint-2 and final/ are re-written
    (swapped); a kill at each step of that, then --resume latest, still matches."""
    import shutil

    ref = straight[0]
    first = tmp_path / "first"
    shutil.copytree(ref, first)
    labels = _record(monkeypatch)
    assert main(_args(data_dir, first, "--resume", str(first / "checkpoint-0000001"))) == 0
    _assert_same_run(ref, first)
    assert "checkpoint-0000002: previous copy set aside" in labels
    assert "final: previous copy removed" in labels
    for n in range(1, len(labels) + 1):
        out = tmp_path / f"rekill{n}"
        shutil.copytree(ref, out)
        _kill_at(monkeypatch, n)
        with pytest.raises(_Killed):
            main(_args(data_dir, out, "--resume", str(out / "checkpoint-0000001")))
        monkeypatch.setattr(ckpt, "_fault_point", lambda label: None)
        assert main(_args(data_dir, out, "--resume", "latest")) == 0, labels[n - 1]
        _assert_same_run(ref, out)


@pytest.mark.parametrize("label", ["checkpoint-0000002: optimizer.pt written",
                                   "final: marker written"])
def test_sigkill_during_a_checkpoint_write_then_resume_latest(label, straight, data_dir,
                                                              tmp_path):
    """The real thing: FLASHSLOTH_TEST_KILL_AT_WRITE makes the trainer SIGKILL itself."""
    ref, labels = straight
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "FLASHSLOTH_TEST_KILL_AT_WRITE": str(labels.index(label) + 1)}
    cmd = [sys.executable, "-m", "flashsloth.train", *_args(data_dir, out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [e for e in os.listdir(out) if e.startswith(".")]      # it died mid-write
    env.pop("FLASHSLOTH_TEST_KILL_AT_WRITE")
    proc = subprocess.run([*cmd, "--resume", "latest"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "cleaned up:" in proc.stderr
    _assert_same_run(ref, out)


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MB tmpfs (room for one tiny-preset checkpoint, not two); skipped where mounting is
    not allowed (it needs root or CAP_SYS_ADMIN)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


@pytest.mark.parametrize("precheck", [True, False])
def test_a_really_full_disk(precheck, small_disk, data_dir, monkeypatch, capsys):
    """A real ENOSPC: with the free-space check before the write, and without it (the write
    itself fails inside safetensors / torch.save)."""
    if not precheck:
        monkeypatch.setattr(ckpt, "_check_space", lambda *a: None)
    out = small_disk / "run"
    assert main(_args(data_dir, out)) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: no space left on the device to write the checkpoint "
                          f"{out / 'checkpoint-0000002'}: it needs about ") and "\n" not in err
    assert f"the previous checkpoint {out / 'checkpoint-0000001'} is intact" in err
    assert ckpt.is_complete(str(out / "checkpoint-0000001"))
    assert not [e for e in os.listdir(out) if e.startswith(".")]
