"""The synthetic grounding experiment: what EmbQ adds at the same visual token budget, over
seeds and question families.

    python scripts/grounding_experiment.py                         # the committed result
    python scripts/grounding_experiment.py --modes all --resume     # + the peers' modes
    python scripts/grounding_experiment.py --seeds 0 --families colour --modes flashsloth,sap
    python scripts/grounding_experiment.py --plot-only              # redraw from the results

Trains the "tiny" preset in both stages on the synthetic grounding task (flashsloth.synthetic:
6 x 6 glyphs, one per vision patch; a question names one cell) in several modes, on several
seeds and question families, and counts the held-out questions each run answers exactly
(greedy decoding reproduces the answer; see flashsloth.train.evaluate):

  flashsloth   SAP (4 tokens) + 9 query tokens updated by EmbQ         13 visual tokens
  no-embq      the same model with EmbQ switched off: the 9 query       13 visual tokens
               tokens are plain learned tokens (the budget-matched
               ablation: what the 9 extra tokens give without EmbQ)
  sap          SAP only                                                 4 visual tokens
  avgpool      3 x 3 average pooling only                               4 visual tokens

and, with ``--modes peers`` (or ``all``), the peers' mechanisms (flashsloth/compression/) at
flashsloth's budget of 13 visual tokens:

  visionzip    13 dominant + contextual tokens                         13 visual tokens
  fastv        all 36 patches enter the LLM, 13 kept after layer 2     36 -> 13
  random       13 patches drawn with a fixed seed                       13 visual tokens
  downsample   the patch grid resized to 3 x 4 (13 is prime)            12 visual tokens

``--modes`` takes mode names and the groups core (the default: the first four), peers, all.

Question families (one data set and one training run each; guessing answers 25% in both):

  colour       "what colour is the shape at c4 ?"  -> red / green / blue / yellow
  shape        "what shape is at c4 ?"             -> circle / square / triangle / cross

A 3 x 3 pooling window holds 9 glyphs, so a pooled token keeps which colours (shapes) its
window holds, not where; answering needs the named cell's un-pooled patch.

A seed sets the data set (boards, questions), the initialisation and the data order. Within a
seed every mode trains on exactly the same data in the same order. Each training board
carries --turns questions (each about a cell drawn at random), each held-out board one. Runs
go --jobs at a time
(one CPU thread each); every finished run is written to --out/grounding_results.json at once
(a temporary file renamed into place), so an interrupted experiment keeps what it finished and
``--resume`` continues it (with more --modes too: the finished runs are kept when the
training settings match). At the end: each mode's prefill time on the tiny preset (one
held-out question, batch 1, one thread, interleaved rounds), the table (mean, standard
deviation and every seed's held-out accuracy per mode and family) and three figures (accuracy
with error bars; stage-2 curves; accuracy against visual tokens and prefill time).

Stage 2 also records, every --eval-every steps, the held-out accuracy on the first --probe
boards and, for EmbQ, where its attention goes: the share of the image attention (i2q) of the
9 queries on the named cell's patch (chance 1 / 36) and of the text attention (t2q) on the
cell's name in the question; and every step the gradient norms reaching EmbQ and the query
tokens. docs/training.md discusses them.

The recipe differs from the 3.2B one where a tiny model trained from random weights in minutes
needs it (docs/training.md): width-scaled initialisation and stage-2 lr --lr2 = 2e-3 (not
2e-5); the rest is the original's (AdamW without weight decay, cosine schedule with --warmup1 /
--warmup2 warm-up, clipping at 1.0, each stage's freezing), and four questions per training
board (--turns 4) with 100 + 1200 steps. --min-fill < 1 trains on sparser boards (held-out
boards stay full). docs/training.md gives the exact command of each committed result, what it
measured, and the earlier recipes (one question per board, 200 + 2000 steps; sparse boards)
with which flashsloth's advantage depended on the seed.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flashsloth import FlashSloth, FlashSlothConfig  # noqa: E402
from flashsloth.data import ConversationDataset, ShardedSampler, collate  # noqa: E402
from flashsloth.preprocess import Tokenizer  # noqa: E402
from flashsloth.synthetic import COLOURS, SHAPES, GroundingSpec, generate  # noqa: E402
from flashsloth.train import (build_optimizer, configure_stage, cosine_schedule,  # noqa: E402
                              evaluate, train_step)


@dataclass(frozen=True)
class Mode:
    """One compared model: the config's compression (and any other config fields, e.g. a
    peer mode's token budget), whether EmbQ runs, and how to show it. A new compression mode
    is one more entry in MODES."""

    compression: str
    embq: bool
    label: str
    colour: str
    config: Tuple[Tuple[str, object], ...] = ()

    def build_config(self) -> FlashSlothConfig:
        return FlashSlothConfig.preset("tiny", compression=self.compression, **dict(self.config))


# flashsloth's budget on the tiny preset: 4 SAP tokens + 9 query tokens = 13 visual tokens.
# The peers' mechanisms (flashsloth/compression/) get the same 13 (downsample 12: its grid
# must be h x w, and 13 is prime), fastv's after its pruning layer (all 36 enter the LLM).
BUDGET = 13
MODES: Dict[str, Mode] = {
    "flashsloth": Mode("flashsloth", True, "flashsloth (SAP + 9 queries + EmbQ)", "#d94801"),
    "no-embq": Mode("flashsloth", False, "SAP + 9 plain learned tokens (no EmbQ)", "#6a51a3"),
    "sap": Mode("sap", True, "sap", "#2171b5"),
    "avgpool": Mode("avgpool", True, "avgpool (3 x 3 average)", "#41ab5d"),
    "visionzip": Mode("visionzip", True, f"visionzip ({BUDGET} tokens)", "#e7298a",
                      (("token_budget", BUDGET),)),
    "fastv": Mode("fastv", True, f"fastv (36 -> {BUDGET} after layer 2)", "#66a61e",
                  (("token_budget", BUDGET),)),
    "random": Mode("random", True, f"random ({BUDGET} patches)", "#7f7f7f",
                   (("token_budget", BUDGET),)),
    "downsample": Mode("downsample", True, f"downsample ({BUDGET - 1} tokens, 3 x 4)", "#a6761d",
                       (("token_budget", BUDGET - 1),)),
}
# --modes groups: the default experiment (issue "EmbQ's advantage") and the peers' modes
GROUPS = {"core": ["flashsloth", "no-embq", "sap", "avgpool"],
          "peers": ["visionzip", "fastv", "random", "downsample"]}
GROUPS["all"] = GROUPS["core"] + GROUPS["peers"]

# family -> (question kinds of flashsloth.synthetic, number of possible answers)
FAMILIES = {"colour": (("colour",), len(COLOURS)), "shape": (("shape",), len(SHAPES))}

RESULTS = "grounding_results.json"


# ---------------------------------------------------------------------------- the recipe
def width_scaled_init(model: FlashSloth) -> None:
    """Linear / Conv weights N(0, 1 / fan_in), biases 0, embeddings and query tokens N(0, 1)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.normal_(0.0, m.weight[0].numel() ** -0.5)
            elif isinstance(m, nn.Embedding):
                m.weight.normal_(0.0, 1.0)
        if model.learnable_tokens is not None:
            model.learnable_tokens.token.normal_(0.0, 1.0)


class NoQuestion(torch.utils.data.Dataset):
    """A dataset whose question_mask is all False: the model then skips EmbQ for every slot
    (a slot with no question keeps its hidden states), leaving plain learned query tokens."""

    def __init__(self, inner):
        self.inner = inner

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        item = dict(self.inner[i])
        item["question_mask"] = torch.zeros_like(item["question_mask"])
        return item


# ---------------------------------------------------------------------------- diagnostics
class EmbQProbe:
    """Records, while enabled, where EmbQ's attention goes for each slot it updates (in batch
    order): the mean (over heads and queries) i2q probability of every patch and t2q
    probability of every question token. Recomputes EmbQ's first layer's attention from its
    inputs in plain PyTorch (the fused op returns only the attention's output)."""

    def __init__(self, model: FlashSloth):
        self.enabled = False
        self.image: List[torch.Tensor] = []     # (S, N) per call
        self.text: List[torch.Tensor] = []      # (S, T) per call, 0 on padding
        self.handle = model.lqformer.register_forward_hook(self._hook)

    def _hook(self, lq, args, out):
        if not self.enabled:
            return
        hq, text, mask, image = args
        with torch.no_grad():
            layer = lq.layers[0]
            down = lq.down_projector_learnable_text
            q0 = layer.ln_q(down(hq))
            t = layer.ln_text(down(text))
            p_text = _probs(layer.t2q_attn, q0, t, lq.num_heads, lq.scale, mask)
            a1 = lq._attend(layer.t2q_attn, q0, t, t, mask)
            kv = layer.ln_kv(lq.down_projector_image(image))
            p_image = _probs(layer.i2q_attn, a1, kv, lq.num_heads, lq.scale, None)
        self.image.append(p_image.mean((1, 2)).float())
        self.text.append(p_text.mean((1, 2)).float())

    def take(self):
        image, text = self.image, self.text
        self.image, self.text = [], []
        return image, text


def _probs(attn, x_q, x_k, heads, scale, mask):
    B, Lq, Lk = x_q.shape[0], x_q.shape[1], x_k.shape[1]
    q = attn.q_proj(x_q).view(B, Lq, heads, -1).transpose(1, 2)
    k = attn.k_proj(x_k).view(B, Lk, heads, -1).transpose(1, 2)
    logits = (q @ k.transpose(-1, -2)).float() * scale                   # (B, h, Lq, Lk)
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
    return torch.softmax(logits, -1).nan_to_num(0.0)


class GradNorms:
    """The gradient norm reaching each named group of parameters in a backward pass."""

    def __init__(self, groups: Dict[str, List[nn.Parameter]]):
        self.sq = {name: 0.0 for name in groups}
        for name, params in groups.items():
            for p in params:
                p.register_hook(self._hook(name))

    def _hook(self, name):
        def hook(grad):
            self.sq[name] += float(grad.detach().float().pow(2).sum())
        return hook

    def take(self) -> Dict[str, float]:
        out = {k: math.sqrt(v) for k, v in self.sq.items()}
        self.sq = {k: 0.0 for k in self.sq}
        return out


def probe_eval(model, test, probe, cells, embq_probe, grid):
    """Held-out accuracy on the first `probe` boards and, with EmbQ, its attention's share on
    the named cell's patch (i2q) and on the cell's name in the question (t2q)."""
    sub = torch.utils.data.Subset(test, range(min(probe, len(test))))
    if embq_probe is not None:
        embq_probe.enabled = True
    ev = evaluate(model, sub, batch_size=100, per_sample=True)
    row = {"accuracy": ev["accuracy"], "loss": ev["loss"]}
    if embq_probe is not None:
        embq_probe.enabled = False
        image, text = embq_probe.take()
        if image:
            image = torch.cat(image)                                  # (S, N) in batch order
            lines = sorted(ev["correct"])
            target = torch.tensor([(cells[n][0] - 1) * grid + cells[n][1] - 1 for n in lines])
            row["i2q_on_cell"] = float(image[torch.arange(len(lines)), target].mean())
            # the question is "... at <cell> ?": the cell's name is the second-to-last token
            on_name = []
            for row_p in text:
                for p in row_p:
                    real = (p > 0).nonzero().flatten()
                    on_name.append(float(p[real[-2]]) if len(real) >= 2 else 0.0)
            row["t2q_on_name"] = sum(on_name) / max(1, len(on_name))
    return row


# ---------------------------------------------------------------------------- one run
def run_one(task: dict) -> dict:
    """Both stages of one (family, mode, seed); returns losses, curves, timings, results."""
    torch.set_num_threads(1)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    name, seed, family, s = task["mode"], task["seed"], task["family"], task["settings"]
    mode = MODES[name]
    torch.manual_seed(seed)
    cfg = mode.build_config()
    model = FlashSloth(cfg)
    width_scaled_init(model)
    model.train()
    data = task["data"]
    tok = Tokenizer(data)
    train = ConversationDataset(os.path.join(data, "train.jsonl"), tok, cfg, system="",
                                cache_images=True)
    test = ConversationDataset(os.path.join(data, "test.jsonl"), tok, cfg, system="",
                               cache_images=True)
    if not mode.embq:
        train, test = NoQuestion(train), NoQuestion(test)
    cells = {}
    with open(os.path.join(data, "test.jsonl")) as fh:
        for n, line in enumerate(fh, 1):
            cells[n] = json.loads(line)["cell"][0]
    grid = cfg.vision.image_size // cfg.vision.patch_size
    use_embq = mode.embq and model.lqformer is not None
    embq_probe = EmbQProbe(model) if use_embq else None
    grads = GradNorms({"embq": list(model.lqformer.parameters()),
                       "query_tokens": list(model.learnable_tokens.parameters())}) \
        if model.lqformer is not None else None
    result = {"mode": name, "seed": seed, "family": family, "compression": mode.compression,
              "embq": mode.embq, "visual_tokens": cfg.num_visual_tokens(),
              "visual_tokens_kept": cfg.num_visual_tokens_kept(), "stages": {}}
    for stage in (1, 2):
        steps, lr = s[f"steps{stage}"], s[f"lr{stage}"]
        if steps == 0:
            continue
        configure_stage(model, stage)
        opt = build_optimizer(model, stage, lr=lr)
        sched = cosine_schedule(opt, steps, s[f"warmup{stage}"])
        sampler = ShardedSampler(len(train), seed=seed + stage)
        loader = torch.utils.data.DataLoader(train, batch_size=s["batch"], sampler=sampler,
                                             collate_fn=collate,
                                             generator=torch.Generator().manual_seed(0))
        losses: List[float] = []
        norms: Dict[str, List[float]] = {"total": []}
        curve = []
        t0, c0 = time.perf_counter(), time.process_time()
        epoch = 0
        while len(losses) < steps:
            sampler.set_epoch(epoch)
            epoch += 1
            for batch in loader:
                res = train_step(model, batch, opt, scheduler=sched)
                losses.append(res.loss)
                norms["total"].append(res.grad_norm)
                if grads is not None:
                    for k, v in grads.take().items():
                        norms.setdefault(k, []).append(v)
                done = len(losses)
                if stage == 2 and s["eval_every"] and (done % s["eval_every"] == 0
                                                       or done == steps):
                    curve.append({"step": done, **probe_eval(model, test, s["probe"], cells,
                                                             embq_probe, grid)})
                    if s.get("verbose"):
                        print(f"  [{family} {name} seed {seed}] step {done}: " + ", ".join(
                            f"{k} {v:.3g}" for k, v in curve[-1].items() if k != "step"),
                            flush=True)
                if done >= steps:
                    break
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        ev = evaluate(model, test, batch_size=100)
        result["stages"][str(stage)] = {
            "steps": steps, "lr": lr, "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
            "losses": [float(f"{x:.4g}") for x in losses],
            # gradient norms before clipping, as 10-step means
            "grad_norms": {k: [float(f"{sum(v[i:i + 10]) / len(v[i:i + 10]):.4g}")
                               for i in range(0, len(v), 10)] for k, v in norms.items()},
            "curve": curve,
            "held_out_loss": ev["loss"], "accuracy": ev["accuracy"],
            "correct": round(ev["accuracy"] * ev["samples"]), "questions": ev["samples"],
        }
        print(f"[{family} {name} seed {seed}] stage {stage}: {steps} steps in {seconds:.0f} s "
              f"({cpu:.0f} s CPU), loss {statistics.fmean(losses[:10]):.3f} -> "
              f"{statistics.fmean(losses[-10:]):.3f}, held-out accuracy {ev['accuracy']:.3f}",
              flush=True)
    result["seconds"] = round(time.perf_counter() - wall0, 1)
    result["cpu_seconds"] = round(time.process_time() - cpu0, 1)
    return result


# ---------------------------------------------------------------------------- latency
def prefill_latency(modes: List[str], data: str, seconds: float = 3.0) -> Dict[str, dict]:
    """Each mode's prefill time on the tiny preset: one forward over one held-out question
    (batch 1, one thread, logits of the last position only), timed in interleaved rounds
    (benchmarks.timing: medians and quartiles). Random weights: the cost does not depend on
    them. Returns mode -> {median_ms, q25_ms, q75_ms, samples, visual tokens}."""
    from benchmarks.timing import Budget, time_providers

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tok = Tokenizer(data)
        fns, facts = {}, {}
        for m in modes:
            mode = MODES[m]
            cfg = mode.build_config()
            test = ConversationDataset(os.path.join(data, "test.jsonl"), tok, cfg, system="")
            if not mode.embq:
                test = NoQuestion(test)
            b = collate([test[0]])
            torch.manual_seed(0)
            model = FlashSloth(cfg).eval()
            width_scaled_init(model)
            args = {k: b[k] for k in ("images", "input_ids", "attention_mask", "question_mask")}

            def fn(model=model, args=args):
                with torch.inference_mode():
                    return model(**args, logits_to_keep=1)

            fns[m] = fn
            facts[m] = {"visual_tokens": cfg.num_visual_tokens(),
                        "visual_tokens_kept": cfg.num_visual_tokens_kept()}
        timings, errors = time_providers(fns, torch.device("cpu"),
                                         Budget(min_rounds=10, max_rounds=200, seconds=seconds))
    finally:
        torch.set_num_threads(threads)
    if errors:
        raise RuntimeError(f"prefill timing failed: {errors}")
    return {m: {**facts[m], **{k: round(v, 4) for k, v in timings[m].as_dict().items()}}
            for m in modes}


# ---------------------------------------------------------------------------- summary
def key(family: str, mode: str, seed: int) -> str:
    return f"{family}/{mode}/{seed}"


def final_accuracy(run: dict) -> float:
    st = run["stages"]
    return (st.get("2") or st.get("1"))["accuracy"]


def summarise(runs: Dict[str, dict], families: List[str], modes: List[str]) -> dict:
    """family -> mode -> {seeds, accuracy per seed, mean, std (sample), min, max}."""
    out: Dict[str, dict] = {}
    for fam in families:
        for m in modes:
            done = sorted((r["seed"], final_accuracy(r)) for r in runs.values()
                          if r["family"] == fam and r["mode"] == m)
            if not done:
                continue
            acc = [a for _, a in done]
            out.setdefault(fam, {})[m] = {
                "seeds": [sd for sd, _ in done], "accuracy": acc,
                "mean": statistics.fmean(acc),
                "std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                "min": min(acc), "max": max(acc)}
    return out


def verdict(summary: dict) -> Dict[str, str]:
    """Per family: does flashsloth beat every other mode on every seed, by more than the
    spread across seeds (the issue's criterion)?"""
    out = {}
    for fam, per in summary.items():
        fs = per.get("flashsloth")
        others = {m: v for m, v in per.items() if m != "flashsloth"}
        if not fs or not others:
            continue
        ok_seeds, margin_ok = True, True
        if min(len(set(fs["seeds"]) & set(v["seeds"])) for v in others.values()) < 2:
            out[fam] = "fewer than 2 seeds: no spread to compare with"
            continue
        for m, v in others.items():
            common = sorted(set(fs["seeds"]) & set(v["seeds"]))
            for sd in common:
                if fs["accuracy"][fs["seeds"].index(sd)] <= v["accuracy"][v["seeds"].index(sd)]:
                    ok_seeds = False
            if fs["mean"] - v["mean"] <= max(fs["std"], v["std"]):
                margin_ok = False
        out[fam] = ("flashsloth beats every mode on every seed by more than the spread"
                    if ok_seeds and margin_ok else
                    "flashsloth beats every mode on every seed, but not by more than the spread"
                    if ok_seeds else "flashsloth does NOT beat every mode on every seed")
    return out


def table(summary: dict, families: List[str], modes: List[str], tokens: Dict[str, str],
          latency: Optional[Dict[str, dict]] = None) -> str:
    lat = latency or {}
    head = "| mode | visual tokens | " + ("prefill ms (tiny, 1 thread) | " if lat else "") \
        + " | ".join(f"{fam}: held-out accuracy, mean +- sd (each seed)" for fam in families) \
        + " |"
    lines = [head, "|---|---|" + ("---|" if lat else "") + "---|" * len(families)]
    for m in modes:
        cells = [MODES[m].label if m in MODES else m, tokens.get(m, "?")]
        if lat:
            v = lat.get(m)
            cells.append("-" if v is None else
                         f"{v['median_ms']:.2f} ({v['q25_ms']:.2f}-{v['q75_ms']:.2f})")
        for fam in families:
            v = summary.get(fam, {}).get(m)
            cells.append("-" if v is None else
                         f"{100 * v['mean']:.1f}% +- {100 * v['std']:.1f} "
                         f"({', '.join(f'{100 * a:.1f}' for a in v['accuracy'])})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(saved: dict, path: str, curves_path: Optional[str] = None) -> None:
    """Held-out accuracy per mode and family: mean, +- one standard deviation over seeds
    (error bars) and every seed (dots); and, in curves_path, stage 2's curves per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, families, modes = saved["summary"], saved["settings"]["families"], \
        saved["settings"]["modes"]
    fig, axes = plt.subplots(1, len(families), figsize=(4.6 * len(families), 4.0), dpi=110,
                             squeeze=False)
    for ax, fam in zip(axes[0], families):
        per = summary.get(fam, {})
        names = [m for m in modes if m in per]
        for i, m in enumerate(names):
            v = per[m]
            colour = MODES[m].colour if m in MODES else None
            ax.bar(i, 100 * v["mean"], color=colour, alpha=0.8,
                   yerr=100 * v["std"], capsize=5, error_kw={"lw": 1.2})
            ax.scatter([i] * len(v["accuracy"]), [100 * a for a in v["accuracy"]],
                       color="k", s=10, zorder=3)
            ax.text(i, 100 * v["mean"] + 100 * v["std"] + 2, f"{100 * v['mean']:.1f}",
                    ha="center", fontsize=8)
        chance = 100 / FAMILIES[fam][1]
        ax.axhline(chance, color="k", ls="--", lw=1, label=f"chance {chance:.0f}%")
        ax.set_xticks(range(len(names)), names, fontsize=8, rotation=30, ha="right")
        ax.set_ylim(0, 105)
        ax.set_ylabel("held-out questions answered (%)")
        seeds = sorted({sd for m in names for sd in per[m]["seeds"]})
        ax.set_title(f"{fam} questions: mean +- sd over seeds {seeds}", fontsize=9)
        ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    if not curves_path:
        return
    runs = saved["runs"]
    styles = ["-", "--", ":", "-.", (0, (5, 1)), (0, (1, 1))]
    fig, axes = plt.subplots(len(families), 4, figsize=(17, 3.4 * len(families)), dpi=100,
                             squeeze=False)
    for row, fam in zip(axes, families):
        seeds = sorted({r["seed"] for r in runs.values() if r["family"] == fam})
        for r in sorted(runs.values(), key=lambda r: (r["mode"], r["seed"])):
            if r["family"] != fam:
                continue
            st = r["stages"].get("2")
            if not st or not st["curve"]:
                continue
            colour = MODES[r["mode"]].colour if r["mode"] in MODES else None
            ls = styles[seeds.index(r["seed"]) % len(styles)]
            steps = [c["step"] for c in st["curve"]]
            row[0].plot(steps, [100 * c["accuracy"] for c in st["curve"]], color=colour, lw=1,
                        ls=ls, label=r["mode"] if r["seed"] == seeds[0] else None)
            if "i2q_on_cell" in st["curve"][0]:
                lab = f"{r['mode']} seed {r['seed']}"
                row[1].plot(steps, [c["i2q_on_cell"] for c in st["curve"]], color=colour,
                            ls=ls, lw=1.2, label=lab)
                row[2].plot(steps, [c["t2q_on_name"] for c in st["curve"]], color=colour,
                            ls=ls, lw=1.2, label=lab)
            g = st.get("grad_norms", {}).get("embq")
            if g and r.get("embq", True):
                row[3].plot([10 * (i + 1) for i in range(len(g))], g, color=colour, ls=ls,
                            lw=1, label=f"{r['mode']} seed {r['seed']}")
        row[0].axhline(100 / FAMILIES[fam][1], color="k", ls="--", lw=0.8)
        row[0].set_title(f"{fam}: held-out accuracy, first boards (line style: seed)",
                         fontsize=9)
        row[0].set_ylabel("%")
        row[0].legend(fontsize=7)
        row[1].axhline(1 / 36, color="k", ls="--", lw=0.8)
        row[1].set_title(f"{fam}: EmbQ image attention on the named cell (chance 1/36)",
                         fontsize=9)
        row[1].legend(fontsize=7)
        row[2].set_title(f"{fam}: EmbQ text attention on the cell's name", fontsize=9)
        row[3].set_yscale("log")
        row[3].set_title(f"{fam}: gradient norm reaching EmbQ (10-step means)", fontsize=9)
        for ax in row:
            ax.set_xlabel("stage-2 step")
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(curves_path)
    plt.close(fig)


def board_figure(data: str, path: str, count: int = 3) -> None:
    """The first held-out boards, enlarged, with their question and answer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    with open(os.path.join(data, "test.jsonl")) as fh:
        records = [json.loads(next(fh)) for _ in range(count)]
    fig, axes = plt.subplots(1, count, figsize=(3.2 * count, 3.6), dpi=100)
    for ax, rec in zip(axes, records):
        ax.imshow(Image.open(os.path.join(data, rec["image"])), interpolation="nearest")
        g = 6
        ax.set_xticks(range(7, 14 * g, 14), [chr(ord("a") + i) for i in range(g)])
        ax.set_yticks(range(7, 14 * g, 14), [str(i + 1) for i in range(g)])
        ax.tick_params(length=0)
        for k in range(0, 14 * g + 1, 42):      # the 3 x 3 pooling windows
            ax.axhline(k - 0.5, color="w", lw=0.6)
            ax.axvline(k - 0.5, color="w", lw=0.6)
        q = rec["conversations"][0]["value"].replace("<image>\n", "")
        ax.set_title(f"{q}\n-> {rec['conversations'][1]['value']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_json(path: str, obj) -> None:
    """Write to a temporary file in the same directory, then rename it into place."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=d)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=1)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def report(saved: dict, out: str) -> str:
    fams, modes = saved["settings"]["families"], saved["settings"]["modes"]
    tokens = {r["mode"]: tokens_text(r) for r in saved["runs"].values()}
    text = table(saved["summary"], fams, modes, tokens, saved.get("latency"))
    for fam, v in verdict({f: {m: v for m, v in per.items() if m in modes}
                           for f, per in saved["summary"].items()}).items():
        text += f"\n\n{fam}: {v}"
    plot(saved, os.path.join(out, "training_grounding.png"),
         os.path.join(out, "training_grounding_curves.png"))
    if saved.get("latency"):
        budget_plot(saved, os.path.join(out, "training_grounding_budget.png"))
    return text


def tokens_text(run: dict) -> str:
    """Visual tokens in the LLM: "36 -> 13" for a mode that prunes inside it (fastv)."""
    n, kept = run["visual_tokens"], run.get("visual_tokens_kept", run["visual_tokens"])
    return str(n) if n == kept else f"{n} -> {kept}"


def budget_plot(saved: dict, path: str) -> None:
    """Per family: held-out accuracy (mean +- sd over seeds) against the visual tokens the
    LLM keeps and against the tiny preset's measured prefill time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, lat = saved["summary"], saved["latency"]
    families, modes = saved["settings"]["families"], saved["settings"]["modes"]
    fig, axes = plt.subplots(len(families), 2, figsize=(10, 3.6 * len(families)), dpi=110,
                             squeeze=False)
    for row, fam in zip(axes, families):
        per = summary.get(fam, {})
        shown = [m for m in modes if m in per and m in lat]
        for i, m in enumerate(shown):
            v, c = per[m], MODES[m].colour if m in MODES else None
            # modes at the same budget are spread a little sideways so none hides another
            dx = 0.12 * (i - (len(shown) - 1) / 2)
            for ax, x in ((row[0], lat[m]["visual_tokens_kept"] + dx),
                          (row[1], lat[m]["median_ms"])):
                ax.errorbar(x, 100 * v["mean"], yerr=100 * v["std"], fmt="o", color=c,
                            capsize=4, label=m)
        chance = 100 / FAMILIES[fam][1]
        for ax in row:
            ax.axhline(chance, color="k", ls="--", lw=0.8)
            ax.set_ylim(0, 105)
            ax.set_ylabel(f"{fam}: held-out accuracy (%)")
            ax.grid(alpha=0.3)
        row[0].set_xlabel("visual tokens the LLM keeps (fastv: after its pruning layer)")
        row[1].set_xlabel("prefill time, tiny preset, batch 1, 1 thread (ms, median)")
        row[0].legend(fontsize=7, loc="center left", ncol=2)
    fig.suptitle("accuracy at matched budgets: mean +- sd over seeds "
                 f"{saved['settings']['seeds']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------- main
def _ints(text: str) -> List[int]:
    return [int(x) for x in text.split(",") if x.strip()]


class _Parser(argparse.ArgumentParser):
    """A user error is one line, ``error: ...``, and exit status 2 (no usage dump)."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv=None) -> int:
    p = _Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="docs", help="where the results and figures go")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "flashsloth-grounding"),
                   help="where the data sets are written")
    p.add_argument("--modes", default="core",
                   help=f"comma-separated modes of {list(MODES)} or groups {GROUPS} "
                        "(default: core)")
    p.add_argument("--families", default=",".join(FAMILIES), help=f"some of {list(FAMILIES)}")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (data, init, order)")
    p.add_argument("--train", type=int, default=4000, help="training boards")
    p.add_argument("--test", type=int, default=500, help="held-out boards (always full)")
    p.add_argument("--turns", type=int, default=4,
                   help="questions per training board (held-out boards: one each)")
    p.add_argument("--min-fill", type=float, default=1.0,
                   help="training boards fill a fraction in [min-fill, 1] of their cells")
    p.add_argument("--steps1", type=int, default=100)
    p.add_argument("--steps2", type=int, default=1200)
    p.add_argument("--lr1", type=float, default=1e-3)
    p.add_argument("--lr2", type=float, default=2e-3)
    p.add_argument("--warmup1", type=float, default=0.03, help="warm-up share of stage 1")
    p.add_argument("--warmup2", type=float, default=0.03, help="warm-up share of stage 2")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--eval-every", type=int, default=200,
                   help="stage-2 probe every N steps (0: none)")
    p.add_argument("--probe", type=int, default=100, help="held-out boards of each probe")
    p.add_argument("--verbose", action="store_true", help="print every stage-2 probe")
    p.add_argument("--jobs", type=int, default=2, help="runs at the same time (1 thread each)")
    p.add_argument("--resume", action="store_true",
                   help="keep the finished runs of --out's results when the settings match")
    p.add_argument("--plot-only", action="store_true",
                   help="redraw the table and figures from --out's results, train nothing")
    args = p.parse_args(argv)
    results_path = os.path.join(args.out, RESULTS)
    if args.plot_only:
        try:
            with open(results_path) as fh:
                saved = json.load(fh)
        except (OSError, ValueError) as exc:
            p.error(f"--plot-only: cannot read {results_path}: {exc}")
        print(report(saved, args.out))
        return 0
    modes = list(dict.fromkeys(x for m in args.modes.split(",") if m
                               for x in GROUPS.get(m, [m])))
    families = [f for f in args.families.split(",") if f]
    try:
        seeds = _ints(args.seeds)
    except ValueError:
        p.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    for opt, got, known in (("--modes", modes, MODES), ("--families", families, FAMILIES)):
        bad = [x for x in got if x not in known]
        if bad or not got:
            p.error(f"{opt}: unknown {bad or got}; expected some of {list(known)}")
    if not seeds:
        p.error("--seeds: expected at least one seed")
    for name in ("train", "test", "batch", "jobs", "probe", "turns"):
        if getattr(args, name) < 1:
            p.error(f"--{name}: expected an integer >= 1, got {getattr(args, name)}")
    for name in ("steps1", "steps2", "eval_every"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')}: expected an integer >= 0, "
                    f"got {getattr(args, name)}")
    if not 0.0 <= args.min_fill <= 1.0:
        p.error(f"--min-fill: expected a fraction in [0, 1], got {args.min_fill}")
    for name in ("warmup1", "warmup2"):
        if not 0.0 <= getattr(args, name) < 1.0:
            p.error(f"--{name}: expected a share in [0, 1), got {getattr(args, name)}")

    settings = {k: getattr(args, k) for k in ("train", "test", "turns", "min_fill", "steps1",
                                              "steps2",
                                              "lr1", "lr2", "warmup1", "warmup2", "batch",
                                              "eval_every", "probe")}
    task_settings = {**settings, "verbose": args.verbose}
    saved = {"command": "python scripts/grounding_experiment.py "
                        + " ".join(sys.argv[1:] if argv is None else argv),
             "torch": torch.__version__, "settings": {**settings, "families": families,
                                                      "modes": modes, "seeds": seeds,
                                                      "jobs": args.jobs},
             "runs": {}, "summary": {}, "timing": {}, "invocations": []}
    prev_wall = 0.0
    if args.resume and os.path.exists(results_path):
        with open(results_path) as fh:
            old = json.load(fh)
        if {k: old["settings"].get(k) for k in settings} == settings:
            saved["runs"] = old["runs"]
            saved["invocations"] = old.get("invocations", [])
            prev_wall = old.get("timing", {}).get("wall_seconds", 0.0)
            print(f"resuming: {len(saved['runs'])} finished runs kept", flush=True)
        else:
            print("--resume: the saved settings differ; starting afresh", flush=True)
    os.makedirs(args.out, exist_ok=True)
    t0, load0 = time.time(), os.getloadavg()
    this = {"command": saved["command"], "runs": [], "load_average_at_start": load0}
    saved["invocations"].append(this)
    # seed-major order: a partial experiment holds whole seeds
    tasks = []
    for seed in seeds:
        for fam in families:
            data = os.path.join(args.work, f"{fam}-seed{seed}")
            todo = [m for m in modes if key(fam, m, seed) not in saved["runs"]]
            if not todo:
                continue
            spec = GroundingSpec(train=args.train, test=args.test, seed=seed, turns=args.turns,
                                 test_turns=1, kinds=FAMILIES[fam][0], min_fill=args.min_fill)
            meta = os.path.join(data, "meta.json")
            try:
                with open(meta) as fh:
                    have = json.load(fh)
                same = all(have.get(k) == v for k, v in (
                    ("seed", seed), ("train", args.train), ("test", args.test),
                    ("turns", args.turns), ("test_turns", 1),
                    ("min_fill", args.min_fill), ("kinds", list(FAMILIES[fam][0]))))
            except (OSError, ValueError):
                same = False
            if not same:
                generate(data, spec)
            tasks += [{"mode": m, "seed": seed, "family": fam, "data": data,
                       "settings": task_settings} for m in todo]
    print(f"{len(tasks)} runs to do ({len(saved['runs'])} kept); data ready in "
          f"{time.time() - t0:.0f} s", flush=True)

    def timing():
        used = resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime \
            + resource.getrusage(resource.RUSAGE_SELF).ru_utime
        this.update(wall_seconds=round(time.time() - t0, 1), cpu_seconds=round(used, 1),
                    load_average_now=os.getloadavg())
        return {
            # over every invocation that contributed runs (--resume adds up)
            "wall_seconds": round(prev_wall + time.time() - t0, 1),
            "cpu_seconds_all_runs": round(sum(r["cpu_seconds"] for r in saved["runs"].values()),
                                          1),
            "cpu_seconds_this_invocation": round(used, 1),
            "load_average_at_start": load0, "load_average_now": os.getloadavg(),
            "cpu_count": os.cpu_count()}

    def record(run):
        saved["runs"][key(run["family"], run["mode"], run["seed"])] = run
        this["runs"].append(key(run["family"], run["mode"], run["seed"]))
        saved["summary"] = summarise(saved["runs"], families, modes)
        saved["timing"] = timing()
        write_json(results_path, saved)

    if args.jobs > 1 and len(tasks) > 1:
        with mp.get_context("spawn").Pool(min(args.jobs, len(tasks))) as pool:
            for run in pool.imap_unordered(run_one, tasks, chunksize=1):
                record(run)
    else:
        for task in tasks:
            record(run_one(task))
    saved["summary"] = summarise(saved["runs"], families, modes)
    saved["timing"] = timing()
    first = os.path.join(args.work, f"{families[0]}-seed{seeds[0]}")
    if os.path.exists(os.path.join(first, "test.jsonl")):
        # after the training runs, so the timing has the cores to itself
        saved["latency"] = prefill_latency(modes, first)
        saved["latency_load_average"] = os.getloadavg()
    write_json(results_path, saved)
    if os.path.exists(os.path.join(first, "test.jsonl")):
        board_figure(first, os.path.join(args.out, "training_grounding_board.png"))
    print()
    print(report(saved, args.out))
    tm = saved["timing"]
    print(f"\nwall-clock {tm['wall_seconds'] / 60:.1f} min, CPU "
          f"{tm['cpu_seconds_all_runs'] / 60:.1f} min over all runs (load average "
          f"{load0[0]:.1f} -> {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores); results in {results_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
