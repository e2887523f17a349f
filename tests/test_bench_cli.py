"""The benchmark CLI end to end (a --quick run into a temporary folder), and the pieces it is
built from on synthetic data: the interleaved timer, peak memory, bars, --compare."""

import csv
import json
import os

import pytest
import torch

from benchmarks import bars, compare, report, timing
from benchmarks.cli import main, parse_args


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert main(["--quick", "--device", "cpu", "--out", str(out), "--preset", "tiny"]) == 0
    return out


def test_quick_run_writes_every_output(quick_run):
    for name in ("results.json", "results.csv", "report.md", *report.PLOTS):
        path = quick_run / name
        assert path.is_file() and path.stat().st_size > 0, name
    assert (quick_run / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_run_json_holds_numbers_and_context(quick_run):
    data = json.loads((quick_run / "results.json").read_text())
    ctx = data["context"]
    for key in ("device", "torch", "triton", "git_commit", "date", "config"):
        assert key in ctx
    assert ctx["device"].startswith("cpu")      # CPU results land in the git-ignored folder
    assert ctx["config"]["quick"] is True
    assert ctx["complete"] is True
    assert data["ceilings"]["copy_gbps"] > 0 and data["ceilings"]["matmul_gflops"] > 0
    rows = data["rows"]
    sections = {r["section"] for r in rows}
    assert {"ops/sap", "ops/attention", "model", "train"} <= sections
    for r in rows:
        assert r["status"] in ("ok", "error", "not available", "skipped"), r
        if r["status"] != "ok":
            assert r["note"], r                 # a row that is not ok says why
    sap = {r["provider"]: r for r in rows if r["section"] == "ops/sap" and r["mode"] == "fwd"
           and r["status"] == "ok"}
    assert {"fused", "gemm", "reference"} <= set(sap)
    assert sap["fused"]["median_ms"] > 0 and sap["fused"]["gflops"] > 0
    assert sap["gemm"]["ratio_to_floor"] == pytest.approx(1.0)
    attn = [r for r in rows if r["section"] == "ops/attention" and r["status"] == "ok"]
    assert any(r["provider"] == "fused" and r.get("gbps") for r in attn)
    model = {(r["preset"], r["compression"]): r for r in rows if r["section"] == "model"}
    assert model[("flashsloth-3.2b", "flashsloth")]["visual_tokens"] == 90
    assert model[("flashsloth-3.2b", "none")]["visual_tokens"] == 729
    tiny = model[("tiny", "sap")]
    assert tiny["prefill_ms"] > 0 and tiny["decode_tok_s"] > 0
    assert tiny["visual_tokens_reduction_pct"] == pytest.approx(100 * (1 - 4 / 36))
    train = [r for r in rows if r["section"] == "train" and r["status"] == "ok"]
    assert {r["stage"] for r in train} == {"stage1", "stage2"}
    assert all(r["step_impl"] for r in train)
    assert all(r["peak_mem_bytes"] > 0 for r in train)
    assert data["bars"], "CPU fp32 bars are judged in every CPU run"


def test_quick_run_csv_and_markdown(quick_run):
    with (quick_run / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows and {"section", "provider", "median_ms", "status"} <= set(rows[0])
    md = (quick_run / "report.md").read_text()
    for heading in ("## ops/sap", "## ops/attention", "## model", "## train", "## bars"):
        assert heading in md
    assert "![speedup.png](speedup.png)" in md


def test_compare_two_files(quick_run, capsys):
    path = str(quick_run / "results.json")
    assert main(["--compare", path, path]) == 0
    assert "change against" in capsys.readouterr().out


def _fail_if_run(monkeypatch):
    from benchmarks import cli

    def ran(*args, **kwargs):
        raise AssertionError("the suite ran although the arguments were bad")
    monkeypatch.setattr(cli, "run", ran)


@pytest.mark.parametrize("argv,message", [
    (["--only", "everything"], "--only: expected"),
    (["--dtype", "int8", "--only", "ops"], "int8"),
    (["--preset", "huge", "--only", "model"], "--preset: expected"),
    (["--device", "bogus"], "--device: expected cpu or cuda"),
    (["--device", "meta"], "--device: expected cpu or cuda"),
    (["--threads", "0"], "--threads"),
    (["--compression", "zip", "--only", "model"], "--compression: expected"),
    (["--compare", "/nonexistent/old.json", "/nonexistent/new.json"],
     "/nonexistent/old.json: no such file"),
])
def test_bad_arguments_exit_2_with_one_line(monkeypatch, capsys, argv, message):
    _fail_if_run(monkeypatch)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err, err
    with pytest.raises(SystemExit):
        parse_args(["--compare", "a", "b", "c"])


# ---------------------------------------------------------------- --out checked before running
def test_out_below_a_regular_file_is_refused_before_running(monkeypatch, capsys, tmp_path):
    _fail_if_run(monkeypatch)
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "sub" / "dir"):
        assert main(["--only", "ops", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --out:") and str(tmp_path / "file") in err, err
        assert "regular file" in err or "not a folder" in err


def test_out_on_a_read_only_place_is_refused_before_running(monkeypatch, capsys, tmp_path):
    import errno
    import tempfile

    _fail_if_run(monkeypatch)
    real = tempfile.mkstemp

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    assert main(["--only", "ops", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --out: cannot write results to {tmp_path / 'out'} (Read-only file " \
                  "system)", err
    monkeypatch.setattr(tempfile, "mkstemp", real)
    if os.path.isdir("/sys/kernel"):      # sysfs takes no files, even from root
        assert main(["--only", "ops", "--out", "/sys/kernel"]) == 2
        assert "cannot write results to /sys/kernel" in capsys.readouterr().err
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            assert main(["--only", "ops", "--out", str(ro)]) == 2
        finally:
            ro.chmod(0o755)


# ---------------------------------------------------------------- --compare files
@pytest.mark.parametrize("content,message", [
    (None, "no such file"),
    ("dir", "is not a file"),
    (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "is a binary file"),
    (b'{"rows": [1, 2', "is not valid JSON (line 1"),
    (b"[1, 2]", "not a flashsloth-bench results.json (a JSON list"),
    (b'{"context": {}}', "no list of 'rows'"),
    (b'{"rows": {"a": 1}}', "no list of 'rows'"),
    (b'{"rows": [{"section": "ops"}, 3]}', "rows[1] is a int"),
    (b'{"rows": [], "context": [1]}', "'context' is a list"),
])
def test_bad_compare_files_get_one_line_naming_the_file(monkeypatch, capsys, tmp_path, content,
                                                        message):
    _fail_if_run(monkeypatch)
    bad = tmp_path / "old.json"
    if content == "dir":
        bad.mkdir()
    elif content is not None:
        bad.write_bytes(content)
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"rows": [], "context": {}}))
    for argv in (["--compare", str(bad)], ["--compare", str(bad), str(good)],
                 ["--compare", str(good), str(bad)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: --compare: {bad}") and message in err, err
        assert "\n" not in err


def test_flashsloth_bench_runs_from_the_checkout_and_benchmarks_is_not_installed(tmp_path):
    """The console script finds the checkout's benchmarks/; no top-level "benchmarks" package
    is importable from outside the checkout (it is not in the wheel)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import importlib.util, sys; "
            "print(importlib.util.find_spec('benchmarks') is None)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), capture_output=True,
                          text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ""})
    assert proc.stdout.strip() == "True", proc.stdout + proc.stderr
    from flashsloth import _bench

    assert _bench.find_checkout() == root
    (tmp_path / "x.json").write_text("[]")
    proc = subprocess.run([sys.executable, "-m", "flashsloth._bench", "--compare",
                           str(tmp_path / "x.json")], cwd=str(tmp_path), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "error: --compare:" in proc.stderr, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--compare",
                           str(tmp_path / "x.json")], cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "error: --compare:" in proc.stderr, proc.stderr


# ---------------------------------------------------------------- pieces, on synthetic data
def test_timer_interleaves_and_reports_broken_providers():
    calls = []
    budget = timing.Budget(min_rounds=3, max_rounds=3, seconds=0.0, min_sample_s=0.0)

    def broken():
        raise RuntimeError("no kernel for this")

    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b"), "broken": broken}
    timings, errors = timing.time_providers(fns, torch.device("cpu"), budget)
    assert set(timings) == {"a", "b"} and "no kernel" in errors["broken"]
    assert timings["a"].samples == 3 and timings["a"].median_ms >= 0
    assert calls[2:] in (["a", "b", "b", "a", "a", "b"],)   # warm-up, then rotated rounds


def test_slow_provider_is_sampled_less():
    import time

    budget = timing.Budget(min_rounds=4, max_rounds=4, seconds=0.02, slow_samples=2,
                           min_sample_s=0.0)
    timings, _ = timing.time_providers({"fast": lambda: None, "slow": lambda: time.sleep(0.02)},
                                       torch.device("cpu"), budget)
    assert timings["fast"].samples == 4 and timings["slow"].samples == 2


def test_sample_size_comes_from_warm_calls_not_the_first():
    """A first call with one-off costs (here 30 ms, then ~1 ms) must not shrink a sample to
    one call: the calls per sample are sized from the warm calls that follow it."""
    import time

    state = {"n": 0}

    def cold_first():
        state["n"] += 1
        time.sleep(0.03 if state["n"] == 1 else 0.001)

    budget = timing.Budget(min_rounds=2, max_rounds=2, seconds=10.0, min_sample_s=0.01)
    timings, _ = timing.time_providers({"p": cold_first}, torch.device("cpu"), budget)
    assert timings["p"].inner >= 5, timings["p"]
    assert timings["p"].median_ms < 10, timings["p"]   # the cold call is not a sample


def test_cpu_peak_memory_sees_temporaries():
    n = 1 << 20

    def f():
        a = torch.ones(n)          # 4 MiB, freed before returning
        return (a * 2).sum()

    peak = timing.peak_memory_bytes(f, torch.device("cpu"))
    assert peak is not None and peak >= 2 * 4 * n


def _row(section, provider, ms, mode="fwd", **params):
    return {"section": section, "provider": provider, "mode": mode, "status": "ok",
            "median_ms": ms, **params}


def test_bars_pass_fail_and_missing():
    rows = [_row("ops/sap", "fused", 1.0, B=1), _row("ops/sap", "gemm", 1.0, B=1),
            _row("ops/sap", "loop", 3.0, B=1), _row("ops/sap", "reference", 0.5, B=1)]
    verdicts = {v["bar"]: v for v in bars.evaluate(rows, "cpu", "float32")}
    assert verdicts["SAP fwd B=1: fused <= 1.10x bare GEMM"]["status"] == "pass"
    assert verdicts["SAP fwd B=1: fused no slower than loop"]["status"] == "pass"
    assert verdicts["SAP fwd B=1: fused no slower than reference"]["status"] == "FAIL"
    missing = verdicts["SAP fwd B=4: fused <= 1.10x bare GEMM"]
    assert missing["status"] == "n/a" and "not measured" in missing["note"]
    assert bars.evaluate(rows, "cuda", "float32") == []


def test_read_reference_in_the_case_rounds(monkeypatch):
    """A case's read provider (OpCase.read_provider) is timed with the others; its row reports
    its own bytes' GB/s and no FLOP rate, and every row gets its GB/s against that one."""
    import time

    from benchmarks.common import RunConfig
    from benchmarks.opbench import OpCase, Provider, run_case

    case = OpCase(section="ops/attention", case="c", mode="fwd", params={"B": 16},
                  providers=[Provider("fused", lambda: time.sleep(0.004)),
                             Provider("read", lambda: time.sleep(0.002), nbytes=4_000_000)],
                  flops=10 ** 9, bytes=1_000_000, floor_ms=1.0, read_provider="read")
    cfg = RunConfig(device=torch.device("cpu"), dtype=torch.float32,
                    budget=timing.Budget(min_rounds=3, max_rounds=3, seconds=0.0,
                                         min_sample_s=0.0))
    rows = {r["provider"]: r for r in run_case(case, cfg)}
    fused, read = rows["fused"], rows["read"]
    assert read["bytes"] == 4_000_000 and "gflops" not in read and fused["bytes"] == 1_000_000
    assert read["gbps"] == pytest.approx(4e6 / (read["median_ms"] * 1e-3) / 1e9)
    assert fused["read_interleaved_gbps"] == pytest.approx(read["gbps"])
    assert fused["pct_read_interleaved"] == pytest.approx(100 * fused["gbps"] / read["gbps"])
    assert read["pct_read_interleaved"] == pytest.approx(100.0)
    # its time is not the op's: no floor ratio and no "fused faster by"
    assert "fused_speedup" not in read and "ratio_to_floor" not in read
    assert fused["fused_speedup"] == pytest.approx(1.0)


def test_bandwidth_bar_prefers_the_read_timed_in_the_case():
    p = dict(B=16, Lk=729, Lq=9)
    row = _row("ops/attention", "fused", 4.0, **p, pct_read_ceiling=45.0)
    bar = "attention fwd B=16 Lk=729: moves >= 60% of read bandwidth"
    v = {b["bar"]: b for b in bars.evaluate([row], "cpu", "float32")}[bar]
    assert v["status"] == "FAIL" and v["measured"] == "45%" and v["note"] == ""
    row.update(pct_read_interleaved=72.0, read_interleaved_gbps=20.0)
    v = {b["bar"]: b for b in bars.evaluate([row], "cpu", "float32")}[bar]
    assert v["status"] == "pass" and v["measured"] == "72%"
    assert "20.0 GB/s" in v["note"] and "45% of the run-start ceiling" in v["note"]
    assert "compute floor" not in v["note"]  # the row has none


def test_bandwidth_bar_says_what_it_asks_of_the_compute():
    """The note gives the time the bar allows and its ratio to the case's compute floor: a
    4 ms forward at 45% of the read may take 4 * 45 / 60 = 3 ms, 1.5x a 2 ms compute floor."""
    row = _row("ops/attention", "fused", 4.0, B=16, Lk=729, Lq=9, pct_read_interleaved=45.0,
               read_interleaved_gbps=50.0, compute_floor_ms=2.0)
    bar = "attention fwd B=16 Lk=729: moves >= 60% of read bandwidth"
    v = {b["bar"]: b for b in bars.evaluate([row], "cpu", "float32")}[bar]
    assert v["status"] == "FAIL"
    assert "allows 3 ms = 1.50x the compute floor (2 ms at the run's matmul rate)" in v["note"]


def test_gpu_bars_per_backend_launch_and_model():
    """Issue 13's bars: each fused backend against the GEMM whichever one auto picked, the
    B = 1 times of the launch-bound rows, and the 3.2B prefill speed-up from the model rows."""
    sap = dict(B=64)
    rows = [_row("ops/sap", "fused", 1.2, backend="triton", **sap),
            _row("ops/sap", "fused-cuda", 1.2, backend="cuda", **sap),
            _row("ops/sap", "gemm", 1.0, **sap), _row("ops/sap", "loop", 20.0, **sap),
            _row("ops/attention", "fused-host", 0.008, B=1, Lk=729, Lq=9),
            _row("ops/attention", "fused-graph", 0.004, B=1, Lk=729, Lq=9),
            {"section": "model", "preset": "flashsloth-3.2b", "compression": "none",
             "status": "ok", "prefill_ms": 30.0},
            {"section": "model", "preset": "flashsloth-3.2b", "compression": "flashsloth",
             "status": "ok", "prefill_ms": 10.0}]
    v = {b["bar"]: b for b in bars.evaluate(rows, "cuda", "bfloat16")}
    assert v["SAP fwd B=64: triton <= 1.25x bare cuBLAS GEMM"]["status"] == "pass"
    assert v["SAP fwd B=64: cuda <= 1.15x bare cuBLAS GEMM"]["status"] == "FAIL"
    assert v["SAP fwd B=64: >= 10x faster than the window loop"]["measured"] == pytest.approx(
        20 / 1.2, abs=1e-3)
    assert v["attention fwd B=1 Lk=729: <= 10 us per call, launch included"]["status"] == "pass"
    assert v["attention fwd B=64 Lk=729: faster than flex"]["status"] == "n/a"
    assert v["flashsloth-3.2b prefill: flashsloth >= 2.5x faster than none"]["measured"] == 3.0
    only_model = bars.evaluate(rows, "cuda", "bfloat16", sections=["model"])
    assert [b["bar"] for b in only_model] == [
        "flashsloth-3.2b prefill: flashsloth >= 2.5x faster than none"]
    assert bars.evaluate(rows, "cpu", "float32", sections=["model"]) == []


def test_partial_results_survive_a_kill(monkeypatch, tmp_path):
    """results.json is rewritten after every case: a run killed in its second case leaves
    the first case's rows, marked incomplete."""
    from benchmarks import cli as cli_mod
    from benchmarks.common import Case

    def fake_cases(cfg, sections):
        def boom():
            raise KeyboardInterrupt  # stands for the kill: nothing after this point runs
        return [Case("ops/sap", "first", lambda: [_row("ops/sap", "fused", 1.0, case="c")]),
                Case("ops/sap", "second", boom)]

    monkeypatch.setattr(cli_mod, "build_cases", fake_cases)
    from benchmarks import ceilings

    def no_ceilings(*args, **kwargs):
        raise RuntimeError("not measured in this test")

    monkeypatch.setattr(ceilings, "measure", no_ceilings)
    with pytest.raises(KeyboardInterrupt):
        main(["--device", "cpu", "--only", "ops", "--out", str(tmp_path), "--no-plots"])
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["context"]["complete"] is False
    assert [r["case"] for r in data["rows"] if r["section"] == "ops/sap"] == ["c"]


def test_compare_matches_rows_and_signs_changes():
    old = {"context": {"device_description": "x"},
           "rows": [_row("ops/sap", "fused", 2.0, B=1, case="c", gflops=10.0)]}
    new = {"context": {"device_description": "x"},
           "rows": [_row("ops/sap", "fused", 1.0, B=1, case="c", gflops=20.0),
                    _row("ops/sap", "gemm", 1.0, B=1, case="c")]}
    changes = {c["metric"]: c for c in compare.diff(old, new)}
    assert changes["median_ms"]["change_pct"] == pytest.approx(-50.0)
    assert changes["median_ms"]["better"] is True
    assert changes["gflops"]["better"] is True
    assert compare.device_note(old, new) is None
