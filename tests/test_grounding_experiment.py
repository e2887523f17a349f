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
    text = ge.table(summary, ["colour"], ["flashsloth", "sap"], {"flashsloth": "13", "sap": "4"})
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


def test_peer_modes_share_flashsloths_budget_and_groups_expand(ge):
    """Every mode's model holds the budget its label states: 13 visual tokens (downsample
    12, whose grid must be h x w), fastv's 36 entering the LLM and 13 kept after its layer."""
    kept = {}
    for name, mode in ge.MODES.items():
        cfg = mode.build_config()
        assert cfg.compression == mode.compression
        kept[name] = (cfg.num_visual_tokens(), cfg.num_visual_tokens_kept())
    assert kept == {"flashsloth": (13, 13), "no-embq": (13, 13), "sap": (4, 4),
                    "avgpool": (4, 4), "visionzip": (13, 13), "fastv": (36, 13),
                    "random": (13, 13), "downsample": (12, 12)}
    assert ge.GROUPS["all"] == list(ge.MODES)
    assert ge.tokens_text({"visual_tokens": 36, "visual_tokens_kept": 13}) == "36 -> 13"
    assert ge.tokens_text({"visual_tokens": 13}) == "13"


def test_peer_modes_train_resume_onto_the_core_and_time_their_prefill(ge, tmp_path, capsys):
    """Training boards carry --turns questions, held-out boards one; a --resume run with
    more modes keeps the finished ones and times every mode's prefill; the budget plot."""
    out, work = tmp_path / "out", tmp_path / "work"
    base = ["--out", str(out), "--work", str(work), "--train", "8", "--test", "4",
            "--steps1", "0", "--steps2", "1", "--eval-every", "0", "--batch", "4",
            "--seeds", "0", "--families", "shape", "--turns", "3", "--jobs", "1"]
    assert ge.main(base + ["--modes", "flashsloth"]) == 0
    lines = (work / "shape-seed0" / "train.jsonl").read_text().splitlines()
    assert all(len(json.loads(x)["cell"]) == 3 for x in lines)
    lines = (work / "shape-seed0" / "test.jsonl").read_text().splitlines()
    assert all(len(json.loads(x)["cell"]) == 1 for x in lines)
    capsys.readouterr()
    assert ge.main(base + ["--modes", "flashsloth,peers", "--resume"]) == 0
    assert "4 runs to do (1 kept)" in capsys.readouterr().out
    saved = json.loads((out / ge.RESULTS).read_text())
    assert sorted(saved["summary"]["shape"]) == sorted(["flashsloth"] + ge.GROUPS["peers"])
    assert saved["runs"]["shape/fastv/0"]["visual_tokens_kept"] == 13
    assert set(saved["latency"]) == {"flashsloth", *ge.GROUPS["peers"]}
    assert all(v["median_ms"] > 0 for v in saved["latency"].values())
    assert [len(i["runs"]) for i in saved["invocations"]] == [1, 4]
    assert (out / "training_grounding_budget.png").exists()
    # other --turns: other data, so --resume starts afresh
    capsys.readouterr()
    assert ge.main(base[:-4] + ["--turns", "2", "--jobs", "1", "--modes", "sap",
                                "--resume"]) == 0
    assert "settings differ" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--modes", "nope"], "--modes: unknown ['nope']"),
    (["--families", "size"], "--families: unknown ['size']"),
    (["--seeds", "1,x"], "--seeds: expected comma-separated integers"),
    (["--min-fill", "1.5"], "--min-fill: expected a fraction in [0, 1]"),
    (["--warmup2", "1"], "--warmup2: expected a share in [0, 1)"),
    (["--steps2", "-1"], "--steps2: expected an integer >= 0"),
    (["--turns", "0"], "--turns: expected an integer >= 1"),
    (["--modes", "core,nope"], "--modes: unknown ['nope']"),
])
def test_user_errors_are_one_line(ge, argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        ge.main(argv + ["--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
