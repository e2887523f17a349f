"""Multi-process training on CPU with the gloo backend: DDP keeps the processes in sync,
DDP and FSDP give the single-process big-batch update, and the CLI runs under torchrun.

A worker of the first test once died with SIGABRT ("terminate called without an active
exception"). The cause, measured on torch 2.13 / Python 3.11 (counting /proc/self/task after
``destroy_process_group`` + ``gc.collect()``): once a DistributedDataParallel has been built
on a gloo group, the ProcessGroupGloo stays alive in C++ (no Python object holds it;
``shutdown()`` and ``abort()`` do not stop it), so its threads (2 x pt_gloo_runloop,
gloo_tcp_loop, pt_tcpstore_uv on rank 0) are never joined; without DDP, destroy joins them
all. A worker thread releases each finished collective after the waiting thread has moved on;
if that release is the last reference to something that owns a Python object and the
interpreter is already finalizing (a worker that returns right after its last collective,
on a loaded machine), the decref takes the GIL, CPython ends the thread inside a noexcept
C++ destructor and libstdc++ calls std::terminate. A 2-process script (DDP built and dropped,
rank 1 joins a last all_reduce 3 s late, rank 0 finalizing by then) aborted this way in 1 of
3 runs with DDP and in none without it. The workers therefore end with
``flashsloth.training.distributed.exit_process`` (no interpreter finalization once the group
is destroyed and the results are written), as ``python -m flashsloth.train`` does under
torchrun."""

import json
import os
import socket
import subprocess
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flashsloth import FlashSloth, FlashSlothConfig
from flashsloth.synthetic import GroundingSpec, generate
from flashsloth.train import (DistInfo, _full_model_state, build_optimizer, configure_stage,
                              random_batch, train_step, wrap_model)
from flashsloth.training.distributed import exit_process

WORLD = 2
STEPS = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(rank: int):
    cfg = FlashSlothConfig.preset("tiny")
    return random_batch(cfg, 2, question_tokens=5, answer_tokens=3,
                        generator=torch.Generator().manual_seed(100 + rank))


def _sgd(model):
    # SGD: the update is linear in the gradient, so rounding differences stay rounding-sized
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)


def _flat(state):
    return torch.cat([v.detach().float().flatten() for _, v in sorted(state.items())])


def _worker(rank: int, port: int, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    info = DistInfo(rank, WORLD, rank, torch.device("cpu"))
    cfg = FlashSlothConfig.preset("tiny")
    result = {}
    try:
        # 1. sync: different initial weights, data and dropout masks on each process
        torch.manual_seed(rank)
        model = FlashSloth(cfg).train()
        configure_stage(model, 2)
        ddp = wrap_model(model, "ddp", info)
        opt = build_optimizer(ddp, 2, lr=1e-3)
        losses = [train_step(ddp, _batch(rank), opt).loss for _ in range(STEPS + 1)]
        flat = _flat(model.state_dict())
        gathered = [torch.empty_like(flat) for _ in range(WORLD)]
        dist.all_gather(gathered, flat)
        result["sync_max_diff"] = float((gathered[0] - gathered[1]).abs().max())
        result["sync_losses"] = losses
        # 2. DDP and FSDP (no dropout, SGD) against the single-process big batch
        filters = list(warnings.filters)
        for strategy in ("ddp", "fsdp"):
            torch.manual_seed(0)
            model = FlashSloth(cfg).eval()
            configure_stage(model, 2)
            wrapped = wrap_model(model, strategy, info)
            opt = _sgd(wrapped)
            result[f"{strategy}_losses"] = [train_step(wrapped, _batch(rank), opt).loss
                                            for _ in range(STEPS)]
            state = _full_model_state(wrapped)     # every process gathers; rank 0 gets it
            if rank == 0:
                result[strategy] = _flat(state)
        # FSDP's "returned a view" warning is silenced inside each forward only
        result["warning_filters_unchanged"] = warnings.filters == filters
    finally:
        dist.destroy_process_group()
    if rank == 0:
        torch.save(result, out)
    exit_process(0)


def test_two_process_gloo_ddp_and_fsdp_stay_in_sync(tmp_path):
    out = str(tmp_path / "result.pt")
    mp.spawn(_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
    res = torch.load(out, weights_only=True)
    # DDP broadcast rank 0's weights and averaged the gradients: identical parameters
    assert res["sync_max_diff"] == 0.0
    assert all(torch.isfinite(torch.tensor(res["sync_losses"])))
    assert res["warning_filters_unchanged"]
    # the reference: one process, both processes' samples in one batch
    torch.manual_seed(0)
    model = FlashSloth(FlashSlothConfig.preset("tiny")).eval()
    configure_stage(model, 2)
    opt = _sgd(model)
    a, b = _batch(0), _batch(1)
    big = {k: torch.cat([a[k], b[k]]) for k in a}
    ref_losses = [train_step(model, big, opt).loss for _ in range(STEPS)]
    ref = _flat(model.state_dict())
    for strategy in ("ddp", "fsdp"):
        assert res[f"{strategy}_losses"] == pytest.approx(ref_losses, rel=1e-5), strategy
        torch.testing.assert_close(res[strategy], ref, rtol=1e-5, atol=1e-6, msg=strategy)


def test_cli_under_torchrun_with_gloo(tmp_path):
    data = tmp_path / "data"
    generate(str(data), GroundingSpec(train=8, test=0, seed=2))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD),
           "--master-port", str(_free_port()), "-m", "flashsloth.train", "--stage", "2",
           "--preset", "tiny", "--data", str(data / "train.jsonl"), "--system", "",
           "--output-dir", str(out), "--batch-size", "2", "--max-steps", "2", "--save-every", "1",
           "--device", "cpu", "--no-progress", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == WORLD and run["strategy"] == "ddp"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # 2 processes x batch 2 = 4 sequences per step, one metrics line per step (rank 0 only)
    assert [r["step"] for r in rows] == [1, 2] and all(r["samples"] == 4 for r in rows)
    for rank in range(WORLD):
        assert (out / "checkpoint-0000001" / f"rng_state_{rank}.pt").is_file()
    FlashSloth.from_pretrained(str(out / "final"))
