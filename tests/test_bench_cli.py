"""The benchmark CLI end to end (a --quick run into a temporary folder), and the pieces it is
built from on synthetic data: the interleaved timer, peak memory, bars, --compare."""

import csv
import json

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


def test_bad_arguments_exit_with_a_message():
    with pytest.raises(SystemExit):
        main(["--only", "everything"])
    with pytest.raises(SystemExit):
        main(["--dtype", "int8", "--only", "ops"])
    with pytest.raises(SystemExit):
        main(["--preset", "huge", "--only", "model"])
    with pytest.raises(SystemExit):
        parse_args(["--compare", "a", "b", "c"])
    with pytest.raises(FileNotFoundError):
        main(["--compare", "/nonexistent/old.json", "/nonexistent/new.json"])


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
