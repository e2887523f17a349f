import sys, gc, torch
torch.set_num_threads(2)
from benchmarks.common import RunConfig
from benchmarks import ops_attention as oa
cfg = RunConfig(device=torch.device("cpu"), dtype=torch.float32)
if len(sys.argv) > 1 and sys.argv[1] == "nogc": gc.disable()
for rep in range(3):
    rows = oa._run(cfg, 1, 729, "fwd")
    d = {r["provider"]: r.get("median_ms") for r in rows if r.get("status") == "ok"}
    print({k: round(v, 4) for k, v in d.items()}, "ratio %.2f" % (d["eager"] / d["fused"]))
