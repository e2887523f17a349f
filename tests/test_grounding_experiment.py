"""scripts/grounding_experiment.py: a tiny end-to-end run (results written atomically, resumed,
redrawn), the summary over seeds and the verdict, and one-line user errors."""

import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ge():
    spec = importlib.util.spec_from_file_location(
        "grounding_experiment", os.path.join(ROOT, "scripts", "grounding_experiment.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod            # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _run(mode, seed, family, acc):
    return {"mode": mode, "seed": seed, "family": family, "visual_tokens": 13,
            "stages": {"2": {"accuracy": acc}}}


def test_summary_and_verdict(ge):
    runs = {}
    for seed, (a, b) in enumerate([(0.9, 0.3), (0.8, 0.35), (0.85, 0.32)]):
        runs[ge.key("colour", "flashsloth", seed)] = _run("flashsloth", seed, "colour", a)
        runs[ge.key("colour", "sap", seed)] = _run("sap", seed, "colour", b)
    summary = ge.summarise(runs, ["colour"], ["flashsloth", "sap"])
    fs = summary["colour"]["flashsloth"]
    assert fs["seeds"] == [0, 1, 2]
    assert fs["mean"] == pytest.approx(0.85)
    assert fs["std"] == pytest.approx(0.05)            # sample standard deviation
    assert (fs["min"], fs["max"]) == (0.8, 0.9)
    assert ge.verdict(summary)["colour"].startswith("flashsloth beats every mode on every seed by")
    # one seed where sap wins: the verdict says so
    runs[ge.key("colour", "sap", 1)] = _run("sap", 1, "colour", 0.81)
    summary = ge.summarise(runs, ["colour"], ["flashsloth", "sap"])
    assert "does NOT" in ge.verdict(summary)["colour"]
    one = {k: v for k, v in runs.items() if k.endswith("/0")}
    assert "fewer than 2 seeds" in ge.verdict(ge.summarise(one, ["colour"],
                                                          ["flashsloth", "sap"]))["colour"]
    text = ge.table(summary, ["colour"], ["flashsloth", "sap"], {"flashsloth": 13, "sap": 4})
    assert "85.0% +- 5.0 (90.0, 80.0, 85.0)" in text


def test_tiny_run_resume_and_plot_only(ge, tmp_path, capsys):
    out, work = tmp_path / "out", tmp_path / "work"
    args = ["--out", str(out), "--work", str(work), "--train", "16", "--test", "8",
            "--steps1", "1", "--steps2", "2", "--eval-every", "1", "--probe", "4",
            "--batch", "4", "--seeds", "0", "--families", "colour",
            "--modes", "flashsloth,sap", "--jobs", "1"]
    assert ge.main(args) == 0
    saved = json.loads((out / ge.RESULTS).read_text())
    assert sorted(saved["runs"]) == ["colour/flashsloth/0", "colour/sap/0"]
    fs = saved["runs"]["colour/flashsloth/0"]["stages"]["2"]
    assert len(fs["losses"]) == 2 and len(fs["curve"]) == 2
    assert 0.0 <= fs["curve"][0]["i2q_on_cell"] <= 1.0
    assert set(fs["grad_norms"]) == {"total", "embq", "query_tokens"}
    assert saved["timing"]["cpu_seconds_all_runs"] > 0
    assert (out / "training_grounding.png").exists()
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]
    # --resume with the same settings trains nothing more
    capsys.readouterr()
    assert ge.main(args + ["--resume"]) == 0
    assert "0 runs to do (2 kept)" in capsys.readouterr().out
    os.remove(out / "training_grounding.png")
    assert ge.main(["--out", str(out), "--plot-only"]) == 0
    assert (out / "training_grounding.png").exists()


@pytest.mark.parametrize("argv, message", [
    (["--modes", "nope"], "--modes: unknown ['nope']"),
    (["--families", "size"], "--families: unknown ['size']"),
    (["--seeds", "1,x"], "--seeds: expected comma-separated integers"),
    (["--min-fill", "1.5"], "--min-fill: expected a fraction in [0, 1]"),
    (["--warmup2", "1"], "--warmup2: expected a share in [0, 1)"),
    (["--steps2", "-1"], "--steps2: expected an integer >= 0"),
])
def test_user_errors_are_one_line(ge, argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        ge.main(argv + ["--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
