"""benchmarks/serving.py: vLLM-named serving metrics from a seeded request set.

The statistics against numpy on synthetic latencies; a real (tiny) run's requests and
timings for consistency; the vLLM-layout files. Nothing asserts a time.
"""

import json

import numpy as np
import pytest
import torch

from benchmarks import serving
from benchmarks.common import RunConfig


def _results():
    return [serving.Result(10, 4, 0.20, [0.05, 0.07, 0.06], 0.38),
            serving.Result(12, 1, 0.30, [], 0.30),
            serving.Result(9, 3, 0.10, [0.02, 0.04], 0.16),
            serving.Result(15, 6, 0.45, [0.03] * 5, 0.60)]


def test_metrics_are_vllms_with_numpys_statistics():
    res = _results()
    m = serving.metrics(res)
    ttft = np.array([r.ttft for r in res]) * 1e3
    # TPOT as vLLM: (latency - ttft) / (output - 1), requests with one token left out
    tpot = np.array([(r.latency - r.ttft) / (r.output_len - 1) for r in res
                     if r.output_len > 1]) * 1e3
    itl = np.array([x for r in res for x in r.itl]) * 1e3
    e2el = np.array([r.latency for r in res]) * 1e3
    for name, xs in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2el", e2el)):
        assert m[f"mean_{name}_ms"] == pytest.approx(xs.mean())
        assert m[f"median_{name}_ms"] == pytest.approx(np.median(xs))
        assert m[f"std_{name}_ms"] == pytest.approx(xs.std())
        for p in (50, 90, 99):
            assert m[f"p{p}_{name}_ms"] == pytest.approx(np.percentile(xs, p))
    duration = e2el.sum() / 1e3
    assert m["duration"] == pytest.approx(duration)
    assert m["completed"] == 4 and m["total_input_tokens"] == 46
    assert m["total_output_tokens"] == 14
    assert m["request_throughput"] == pytest.approx(4 / duration)
    assert m["output_throughput"] == pytest.approx(14 / duration)
    assert m["total_token_throughput"] == pytest.approx(60 / duration)


def test_request_set_is_seeded_and_varied():
    w = serving.Workload(12, (4, 48), (4, 32), seed=3)
    a, b = serving.make_requests(w), serving.make_requests(w)
    assert a == b and len(a) == 12
    assert len({r.question_tokens for r in a}) > 3 and len({r.output_tokens for r in a}) > 3
    assert all(4 <= r.question_tokens <= 48 and 4 <= r.output_tokens <= 32 for r in a)
    assert serving.make_requests(serving.Workload(12, (4, 48), (4, 32), seed=4)) != a
    assert serving.extra_positions(a, 16) == max(r.question_tokens - 16 + r.output_tokens
                                                 for r in a)


def test_a_tiny_run_and_its_vllm_files(tmp_path):
    from flashsloth import FlashSloth, FlashSlothConfig

    cfg_run = RunConfig(device=torch.device("cpu"), dtype=torch.float32, quick=True)
    requests = serving.make_requests(serving.Workload(3, (2, 6), (1, 4)))
    servers = {}
    for mode in ("flashsloth", "fastv"):
        torch.manual_seed(0)
        model = FlashSloth(FlashSlothConfig.preset("tiny", compression=mode)).eval()
        servers[mode] = serving.Server(model, cfg_run.device)
    serving.run(servers, requests)
    for server in servers.values():
        assert len(server.results) == 3
        for req, res in zip(requests, server.results, strict=True):
            assert res.output_len == req.output_tokens == len(res.itl) + 1
            assert res.input_len == 32 + 1 + 1 + req.question_tokens + 1 + 4
            assert 0 < res.ttft <= res.latency
            assert res.latency == pytest.approx(res.ttft + sum(res.itl))
        assert server.peak is None or server.peak > 0
    rows = serving.rows_for("tiny", servers, cfg_run, {"flashsloth": 13, "fastv": 4})
    assert [r["compression"] for r in rows] == ["flashsloth", "fastv"]
    written = serving.write_vllm_files(tmp_path, rows)
    assert sorted(p.name for p in written) == ["tiny__fastv.json", "tiny__flashsloth.json"]
    data = json.loads((tmp_path / "serving" / "tiny__fastv.json").read_text())
    for key in ("duration", "completed", "total_input_tokens", "total_output_tokens",
                "request_throughput", "output_throughput", "total_token_throughput",
                "mean_ttft_ms", "median_ttft_ms", "std_ttft_ms", "p99_ttft_ms",
                "mean_tpot_ms", "median_tpot_ms", "p90_tpot_ms", "mean_itl_ms",
                "p50_e2el_ms", "input_lens", "output_lens", "ttfts", "itls", "errors",
                "max_concurrency"):
        assert key in data, key
    assert data["output_lens"] == [r.output_tokens for r in requests]
    assert data["flashsloth_visual_tokens"] == 4
    assert not list((tmp_path / "serving").glob("*.tmp"))


def test_modes_share_their_common_weights():
    """The model section's modes share the vision tower / projector / LLM tensors (so the
    3.2B models fit together and take turns): shared tensors are the same storage, the
    compression's own weights stay the mode's own, and the shared model computes what a
    model holding copies of those weights computes."""
    from benchmarks.model import model_config, pixel_shape, prompt_ids, share_weights
    from flashsloth.model import FlashSloth

    def build(comp):
        cfg, _ = model_config("tiny", comp)
        torch.manual_seed(0)
        return FlashSloth(cfg).eval(), cfg

    first, _ = build("flashsloth")
    other, cfg = build("none")
    copy, _ = build("none")
    saved = share_weights(other, first)
    mine, theirs = dict(other.named_parameters()), dict(first.named_parameters())
    common = [k for k in mine if k in theirs and mine[k].shape == theirs[k].shape]
    assert saved > 0 and common
    assert all(mine[k].data_ptr() == theirs[k].data_ptr() for k in common)
    assert any(k not in mine for k in theirs)  # flashsloth's own modules stay its own
    copy.load_state_dict({k: v.detach().clone() for k, v in first.state_dict().items()
                          if k in copy.state_dict() and copy.state_dict()[k].shape == v.shape},
                         strict=False)
    ids = prompt_ids(cfg)
    px = torch.rand(pixel_shape(cfg))
    with torch.no_grad():
        torch.testing.assert_close(other.prefill(px, ids, max_new_tokens=1)[0],
                                   copy.prefill(px, ids, max_new_tokens=1)[0], rtol=0, atol=0)
