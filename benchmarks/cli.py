"""``flashsloth-bench`` / ``python -m benchmarks``: run the suite, print it, write it down.

    python -m benchmarks                      # everything, this machine's defaults
    python -m benchmarks --quick              # a fast smoke run (CI)
    python -m benchmarks --only ops           # ops, model, train (comma-separated)
    python -m benchmarks --device cuda --dtype bfloat16 --out results/
    python -m benchmarks --compare OLD.json   # run, then print the change against OLD.json
    python -m benchmarks --compare OLD.json NEW.json   # compare two files, run nothing

Outputs go to benchmarks/results/<device>/ unless --out says otherwise: results.json,
results.csv, report.md, speedup.png, latency.png, model.png.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from . import bars as bars_mod
from . import context as context_mod
from . import report
from .common import Case, Row, RunConfig, dtype_from_name, error_row
from .timing import Budget

SECTIONS = ("ops", "model", "train")


class UsageError(Exception):
    """Bad command-line input: reported as one line "error: ..." with exit status 2."""
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="flashsloth-bench",
        description="Measure what FlashSloth's compression buys: the fused ops against their "
                    "floors and baselines, the model's tokens / FLOPs / memory / latency per "
                    "compression mode, and training-step memory.")
    p.add_argument("--device", default=None,
                   help="cpu or cuda[:N] (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default=None,
                   help="float32, bfloat16 or float16 (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--preset", default=None,
                   help="comma-separated model presets to time (default: tiny,tiny-27 on CPU; "
                        "flashsloth-3.2b,flashsloth-hd-3.2b on GPU). Token, parameter and "
                        "FLOP counts always cover every preset.")
    p.add_argument("--compression", default=None,
                   help="comma-separated compression modes the model section times (default: "
                        "all). Token, FLOP and KV counts always cover every mode.")
    p.add_argument("--quick", action="store_true",
                   help="a fast run: fewer cases and samples, no torch.compile providers")
    p.add_argument("--only", default=None,
                   help=f"comma-separated sections to run: {', '.join(SECTIONS)} (default: all)")
    p.add_argument("--out", default=None,
                   help="output folder (default: benchmarks/results/<device>/)")
    p.add_argument("--compare", nargs="+", metavar="JSON", default=None,
                   help="OLD.json: print the change of this run against it; OLD.json NEW.json: "
                        "compare two result files without running anything")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's, usually one per core)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    args = p.parse_args(argv)
    if args.compare is not None and len(args.compare) > 2:
        p.error("--compare takes OLD.json or OLD.json NEW.json")
    return args


def _sections(only: Optional[str]) -> List[str]:
    if not only:
        return list(SECTIONS)
    chosen = [s.strip().lower() for s in only.split(",") if s.strip()]
    bad = [s for s in chosen if s not in SECTIONS]
    if bad or not chosen:
        raise UsageError(f"--only: expected a comma-separated subset of {', '.join(SECTIONS)}, "
                         f"got {only!r}")
    return chosen


def _device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"--device: expected cpu or cuda[:N], got {name!r} ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (this torch: "
                         f"{torch.__version__}, CUDA {torch.version.cuda})")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device: expected cpu or cuda, got {name!r}")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def check_out_dir(path: Path) -> Path:
    """Create the output folder if needed and prove a file can be written there (a read-only
    file system, a path below a regular file, no permission: UsageError before any work)."""
    import tempfile

    if path.exists() and not path.is_dir():
        raise UsageError(f"--out: {path} exists and is not a folder")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise UsageError(f"--out: {path} lies below {parent}, which is a regular file, "
                             "not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"--out: cannot write results to {path} "
                         f"({exc.strerror or type(exc).__name__})") from None
    return path


def make_config(args: argparse.Namespace) -> RunConfig:
    device = _device(args.device)
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads: expected an int >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        try:
            dtype = dtype_from_name(args.dtype)
        except ValueError as exc:
            raise UsageError(str(exc))
    presets = [s.strip() for s in args.preset.split(",") if s.strip()] if args.preset else None
    if presets is not None:
        from .model import ALL_PRESETS

        bad = [p for p in presets if p not in ALL_PRESETS]
        if bad or not presets:
            raise UsageError(f"--preset: expected a comma-separated subset of "
                             f"{', '.join(ALL_PRESETS)}, got {args.preset!r}")
    compressions = None
    if args.compression is not None:
        from .model import COMPRESSIONS

        compressions = [s.strip() for s in args.compression.split(",") if s.strip()]
        bad = [c for c in compressions if c not in COMPRESSIONS]
        if bad or not compressions:
            raise UsageError(f"--compression: expected a comma-separated subset of "
                             f"{', '.join(COMPRESSIONS)}, got {args.compression!r}")
    if args.quick:
        budget = Budget(min_rounds=3, max_rounds=5, seconds=0.5)
    elif device.type == "cpu":
        budget = Budget(min_rounds=5, max_rounds=15, seconds=3.0)
    else:
        budget = Budget()
    return RunConfig(device=device, dtype=dtype, quick=args.quick, presets=presets, budget=budget,
                     compressions=compressions)


def build_cases(cfg: RunConfig, sections: List[str]) -> List[Case]:
    cases: List[Case] = []
    if "ops" in sections:
        from . import ops_attention, ops_sap

        cases += ops_sap.cases(cfg)
        cases += ops_attention.cases(cfg)
    if "model" in sections:
        from . import model

        cases += model.cases(cfg)
    if "train" in sections:
        from . import train

        cases += train.cases(cfg)
    return cases


def finalize(rows: List[Row], sections: List[str]) -> None:
    """Per-section post-processing that needs every row (reductions against "none")."""
    if "model" in sections:
        from . import model

        model.finalize(rows)
    if "train" in sections:
        from . import train

        train.finalize(rows)


def _print_table(console, t: Dict[str, object]) -> None:
    from rich.table import Table

    table = Table(title=str(t["title"]), caption=t.get("caption"), show_lines=False,
                  title_justify="left")
    for h in t["header"]:
        table.add_column(str(h), overflow="fold")
    for row in t["rows"]:
        table.add_row(*[str(c) for c in row])
    console.print(table)


def _console():
    """A rich console; when writing to a file or a pipe (CI, tee) a wide one, so the tables
    are not folded into 80 columns."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=220)


def run(args: argparse.Namespace, console=None) -> Dict[str, object]:
    """Run the suite for parsed ``args``; returns the payload written to results.json."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn)

    console = console or _console()
    sections = _sections(args.only)
    cfg = make_config(args)
    started = time.perf_counter()
    config = {"device": str(cfg.device), "dtype": cfg.dtype_name, "quick": cfg.quick,
              "sections": sections, "presets": cfg.presets, "compressions": cfg.compressions,
              "argv": sys.argv[1:],
              "budget": vars(cfg.budget)}
    ctx = context_mod.collect(cfg.device, config)
    # the output folder must take files before the suite runs, not after
    out_dir = check_out_dir(Path(args.out) if args.out else RESULTS_DIR / ctx["device"])
    console.print(f"[bold]flashsloth-bench[/bold] on {ctx['device_description']} · "
                  f"{cfg.dtype_name} · torch {ctx['torch']} · triton {ctx['triton']} · "
                  f"commit {str(ctx['git_commit'])[:10]}")
    rows: List[Row] = []
    ceilings = None
    from . import ceilings as ceilings_mod

    with console.status("measuring device ceilings (large copy, large matmul)"):
        try:
            cfg.ceilings = ceilings_mod.measure(cfg.device, cfg.dtype, quick=cfg.quick)
            ceilings = cfg.ceilings.as_dict()
        except Exception as exc:
            rows.append(error_row("ceilings", "copy+matmul", exc))
    if ceilings:
        console.print(f"ceilings: copy {ceilings['copy_gbps']:.1f} GB/s, matmul "
                      f"{ceilings['matmul_gflops']:.0f} GFLOP/s ({ceilings['matmul_dtype']})")
    cases = build_cases(cfg, sections)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, transient=False)
    with progress:
        task = progress.add_task("cases", total=len(cases))
        case_seconds: Dict[str, float] = {}
        for case in cases:
            progress.update(task, description=f"{case.section}: {case.name}")
            t0 = time.perf_counter()
            try:
                rows.extend(case.run())
            except Exception as exc:  # one broken case never stops the suite
                rows.append(error_row(case.section, case.name, exc))
            case_seconds[f"{case.section}: {case.name}"] = round(time.perf_counter() - t0, 2)
            progress.advance(task)
            # what is measured so far survives a kill (a time limit, a lost machine): rows of
            # the finished cases, marked incomplete, replaced by the full results at the end
            ctx["case_seconds"] = case_seconds
            report.write_partial(out_dir / "results.json", report.payload(
                {**ctx, "complete": False}, ceilings, rows, []))
        progress.update(task, description="done")
    finalize(rows, sections)
    verdicts = []
    verdicts = bars_mod.evaluate(rows, cfg.device.type, cfg.dtype_name, sections)
    ctx["wall_s"] = round(time.perf_counter() - started, 1)
    ctx["case_seconds"] = case_seconds
    ctx["complete"] = True
    usage = resource.getrusage(resource.RUSAGE_SELF)
    ctx["cpu_s"] = round(usage.ru_utime + usage.ru_stime, 1)  # wall_s / cpu_s: machine load
    data = report.payload(ctx, ceilings, rows, verdicts)
    for t in report.all_tables(rows, verdicts):
        _print_table(console, t)
    if args.no_plots:
        out_dir.mkdir(parents=True, exist_ok=True)
        written = [report.write_json(out_dir / "results.json", data),
                   report.write_csv(out_dir / "results.csv", rows),
                   report.write_markdown(out_dir / "report.md", data, [])]
    else:
        written = report.write_all(out_dir, data)
    console.print(f"wrote {', '.join(p.name for p in written)} to {out_dir} "
                  f"in {ctx['wall_s']} s")
    return data


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The CLI; a user error (flags, --out, --compare files) prints one line "error: ..." on
    stderr and returns 2, before any measurement."""
    from . import compare

    args = parse_args(argv)
    try:
        return _main(args)
    except (UsageError, compare.CompareError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    from . import compare

    console = _console()
    if args.compare is not None and len(args.compare) == 2:
        old, new = (compare.load(p) for p in args.compare)
        compare.print_diff(console, old, new, args.compare[0])
        return 0
    old = None
    if args.compare is not None:
        old = compare.load(args.compare[0])  # fail before a long run, not after
    if args.out:
        check_out_dir(Path(args.out))
    _sections(args.only)
    make_config(args)
    data = run(args, console)
    if old is not None:
        compare.print_diff(console, old, data, args.compare[0])
    return 0
