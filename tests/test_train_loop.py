"""The trainer: stage freezing, the step (loss, accumulation, checkpointing), checkpoints and
resume, the CLI end to end. Everything on the tiny preset, a few steps each."""

import json
import os
import shutil

import pytest
import torch

from flashsloth import FlashSloth, FlashSlothConfig
from flashsloth.data import ConversationDataset, collate
from flashsloth.preprocess import Tokenizer
from flashsloth.synthetic import GroundingSpec, generate
from flashsloth.train import (answer_tokens, build_optimizer, configure_stage, cosine_schedule,
                              enable_gradient_checkpointing, evaluate, forward_loss, main,
                              random_batch, read_metrics, train_step)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("train_data")
    generate(str(out), GroundingSpec(train=24, test=8, turns=1, seed=1))
    return str(out)


def _model(compression="flashsloth", seed=0):
    torch.manual_seed(seed)
    return FlashSloth(FlashSlothConfig.preset("tiny", compression=compression)).train()


def _prefixes(names):
    return {n.split(".", 1)[0] for n in names}


@pytest.mark.parametrize("compression", ["flashsloth", "sap", "avgpool"])
def test_configure_stage_sets_exactly_the_right_parameters(compression):
    model = _model(compression)
    all_names = [n for n, _ in model.named_parameters()]
    s1 = configure_stage(model, 1)
    expected1 = [n for n in all_names if n.startswith(("pooling.", "mm_projector."))]
    assert s1 == expected1
    assert _prefixes(s1) == ({"pooling", "mm_projector"} if compression != "avgpool"
                             else {"mm_projector"})
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(s1)
    s2 = configure_stage(model, "2")
    assert s2 == [n for n in all_names if not n.startswith("vision_tower.")]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(s2)
    if compression == "flashsloth":
        assert {"learnable_tokens", "lqformer", "language_model"} <= _prefixes(s2)
    # the optimizer holds exactly the trainable parameters
    opt = build_optimizer(model, 2)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert held == {id(p) for n, p in model.named_parameters() if n in set(s2)}
    assert opt.param_groups[0]["lr"] == 2e-5
    assert all(g["weight_decay"] == 0 for g in opt.param_groups)
    assert build_optimizer(_stage(model, 1), 1).param_groups[0]["lr"] == 1e-3


def _stage(model, stage):
    configure_stage(model, stage)
    return model


@pytest.mark.parametrize("bad", [0, 3, "x", True, None])
def test_configure_stage_rejects_bad_stage(bad):
    with pytest.raises(ValueError, match="stage"):
        configure_stage(_model(), bad)


def test_stage1_step_changes_only_sap_and_projector():
    model = _model()
    configure_stage(model, 1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, 1)
    batch = random_batch(model.config, 2, generator=torch.Generator().manual_seed(0))
    train_step(model, batch, opt)
    for n, p in model.named_parameters():
        moved = not torch.equal(p, before[n])
        if n.startswith(("pooling.mlp.0.weight", "mm_projector.")):
            assert moved, n
        if not n.startswith(("pooling.", "mm_projector.")):
            assert not moved, n                  # frozen: vision tower, LLM, queries, EmbQ
            assert p.grad is None, n


def test_cosine_schedule_warms_up_then_decays():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = cosine_schedule(opt, 100, 0.03)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1 / 3) and lrs[2] == pytest.approx(1.0)
    assert lrs[3] == pytest.approx(1.0) and lrs[51] == pytest.approx(0.5, abs=0.02)
    assert lrs[-1] < 0.01 and all(a >= b for a, b in zip(lrs[2:], lrs[3:]))


@pytest.mark.parametrize("stage", [1, 2])
def test_loss_falls_on_a_tiny_synthetic_set(data_dir, stage):
    model = _model()
    configure_stage(model, stage)
    ds = ConversationDataset(os.path.join(data_dir, "train.jsonl"), Tokenizer(data_dir),
                             model.config, system="", cache_images=True)
    batches = [collate([ds[i] for i in range(j, j + 8)]) for j in (0, 8, 16)]

    def held_loss():        # the same batches, no dropout: batch-to-batch noise cancels
        model.eval()
        with torch.no_grad():
            loss = sum(forward_loss(model, b)[0].item() for b in batches) / \
                sum(answer_tokens(b) for b in batches)
        model.train()
        return loss

    opt = build_optimizer(model, stage, lr=1e-2 if stage == 1 else 2e-3)
    before = held_loss()
    losses = [train_step(model, batches[s % 3], opt).loss for s in range(9)]
    after = held_loss()
    # stage 1 moves only SAP and the projector under a frozen random LLM (near-uniform logits
    # over 1024 tokens): a small but clear fall; stage 2 trains the LLM too
    if stage == 1:
        assert after < before - 0.1, (before, after, losses)
    else:
        assert after < 0.7 * before, (before, after, losses)


def _pad_to(batch, T):
    out = dict(batch)
    extra = T - batch["input_ids"].shape[1]
    for key, fill in (("input_ids", 0), ("attention_mask", False), ("labels", -100),
                      ("question_mask", False)):
        t = batch[key]
        out[key] = torch.cat([t, torch.full((t.shape[0], extra), fill, dtype=t.dtype)], 1)
    return out


def test_gradient_accumulation_equals_the_big_batch():
    gen = torch.Generator().manual_seed(4)
    cfg = FlashSlothConfig.preset("tiny")
    # different answer lengths: the step must weight micro-batches by their answer tokens
    a = random_batch(cfg, 2, answer_tokens=2, question_tokens=5, generator=gen)
    b = random_batch(cfg, 3, answer_tokens=7, question_tokens=5, generator=gen)
    T = max(a["input_ids"].shape[1], b["input_ids"].shape[1])
    a, b = _pad_to(a, T), _pad_to(b, T)
    big = {k: torch.cat([a[k], b[k]]) for k in a}
    results, params = [], []
    for batch in ([a, b], big):
        model = _model()
        model.eval()                    # no dropout: both runs compute the same function
        configure_stage(model, 2)
        # SGD: the update is linear in the gradient (Adam would blow up the rounding noise of
        # gradients that are zero in exact arithmetic, e.g. SAP's score bias)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        results.append([train_step(model, batch, opt) for _ in range(2)])
        params.append({n: p.detach() for n, p in model.named_parameters()})
    for r_acc, r_big in zip(*results):
        assert r_acc.tokens == r_big.tokens == 2 * 2 + 3 * 7
        assert r_acc.samples == r_big.samples == 5
        assert r_acc.loss == pytest.approx(r_big.loss, rel=1e-5)
        assert r_acc.grad_norm == pytest.approx(r_big.grad_norm, rel=1e-4)
    for n in params[0]:
        torch.testing.assert_close(params[0][n], params[1][n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("compression", ["flashsloth", "fastv", "none"])
def test_loss_only_gives_the_full_logits_loss_and_gradients(compression):
    """FlashSloth(loss_only=True) (what train_step uses) runs the LM head at the answer
    positions only: the same loss and gradients as the full (B, L, V) logits, in float64 so
    the comparison is exact up to rounding; fastv's pruned layout included."""
    cfg = FlashSlothConfig.preset("tiny", compression=compression)
    batch = random_batch(cfg, 3, answer_tokens=3, turns=2,
                         generator=torch.Generator().manual_seed(2))
    batch["labels"][1] = -100             # a sample without any answer token
    grads, losses = [], []
    for loss_only in (False, True):
        model = _model(compression).double().eval()
        configure_stage(model, 2)
        args = {k: batch[k] for k in ("input_ids", "attention_mask", "labels", "question_mask")}
        out = model(images=batch["images"].double(), **args, loss_only=loss_only)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        if loss_only:
            n = int((out.labels[:, 1:] != -100).sum())
            assert out.logits.shape == (n, cfg.text.vocab_size) and n == 2 * 2 * 3
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-12, atol=0)
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-9, atol=1e-13, msg=n)


def test_loss_only_without_answer_tokens_is_zero_and_reaches_every_weight():
    cfg = FlashSlothConfig.preset("tiny")
    batch = random_batch(cfg, 2, generator=torch.Generator().manual_seed(3))
    batch["labels"][:] = -100
    model = _model()
    configure_stage(model, 2)
    loss, n, out = forward_loss(model, batch, loss_only=True)
    assert n == 0 and float(loss) == 0.0 and out.logits.shape[0] == 0
    loss.backward()
    assert model.language_model.lm_head.weight.grad is not None
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with pytest.raises(ValueError, match="loss_only: needs labels"):
        model(images=batch["images"], input_ids=batch["input_ids"], loss_only=True)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(images=batch["images"], input_ids=batch["input_ids"], labels=batch["labels"],
              logits_to_keep=1, loss_only=True)


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = FlashSlothConfig.preset("tiny")
    batch = random_batch(cfg, 2, generator=torch.Generator().manual_seed(1))
    grads = []
    for ckpt in (False, True):
        model = _model().eval()
        configure_stage(model, 2)
        if ckpt:
            assert enable_gradient_checkpointing(model) == cfg.text.num_hidden_layers
        names = [n for n, _ in model.named_parameters()]
        out = model(batch["images"], batch["input_ids"], batch["attention_mask"],
                    labels=batch["labels"], question_mask=batch["question_mask"])
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert [n for n, _ in model.named_parameters()] == names     # names unchanged
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7, msg=n)


def test_bf16_autocast_step_runs():
    model = _model()
    configure_stage(model, 2)
    opt = build_optimizer(model, 2, lr=1e-3)
    batch = random_batch(model.config, 2, generator=torch.Generator().manual_seed(2))
    res = train_step(model, batch, opt, autocast_dtype=torch.bfloat16)
    assert torch.isfinite(torch.tensor(res.loss)) and res.tokens == 2 * 8
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_evaluate_accuracy_matches_greedy_generation(data_dir):
    model = _model().eval()
    ds = ConversationDataset(os.path.join(data_dir, "test.jsonl"), Tokenizer(data_dir),
                             model.config, system="")
    res = evaluate(model, ds, batch_size=3, per_sample=True)
    assert res["samples"] == 8 and set(res["correct"]) == set(range(1, 9))
    for i in range(4):
        item = ds[i]
        labels = item["labels"]
        first = int((labels != -100).nonzero()[0])
        answer = labels[first:][labels[first:] != -100]
        prompt = item["input_ids"][:first][None]
        new = model.generate(item["pixel_values"][None], prompt, max_new_tokens=len(answer),
                             question_mask=item["question_mask"][:first][None], eos_token_id=None)
        assert bool(torch.equal(new[0], answer)) == res["correct"][item["line"]]


def _cli(data_dir, out, *extra):
    return main(["--stage", "2", "--preset", "tiny",
                 "--data", os.path.join(data_dir, "train.jsonl"), "--output-dir", str(out),
                 "--system", "", "--batch-size", "4", "--lr", "1e-3", "--no-progress",
                 "--threads", "1", *extra])


def test_save_and_resume_continue_the_same_loss_curve(data_dir, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _cli(data_dir, straight, "--max-steps", "6", "--save-every", "3",
                "--grad-accum", "2") == 0
    ckpt = straight / "checkpoint-0000003"
    for name in ("model.safetensors", "config.json", "optimizer.pt", "trainer_state.pt",
                 "rng_state_0.pt"):
        assert (ckpt / name).is_file(), name
    # the resumed run starts from a copy of the checkpoint and of the log up to step 6
    resumed.mkdir()
    shutil.copytree(ckpt, resumed / "checkpoint-0000003")
    shutil.copy(straight / "metrics.jsonl", resumed / "metrics.jsonl")
    assert _cli(data_dir, resumed, "--max-steps", "6", "--save-every", "3", "--grad-accum", "2",
                "--resume", "latest") == 0
    a = [r for r in read_metrics(straight / "metrics.jsonl") if r["split"] == "train"]
    b = [r for r in read_metrics(resumed / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6, abs=1e-7), (ra["step"], ra, rb)
        assert rb["lr"] == pytest.approx(ra["lr"], rel=1e-12)
    wa = FlashSloth.from_pretrained(str(straight / "final")).state_dict()
    wb = FlashSloth.from_pretrained(str(resumed / "final")).state_dict()
    for n in wa:
        torch.testing.assert_close(wa[n], wb[n], rtol=1e-6, atol=1e-7, msg=n)


def test_resume_with_other_settings_is_refused(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert _cli(data_dir, out, "--max-steps", "2", "--save-every", "1") == 0
    assert _cli(data_dir, out, "--max-steps", "2", "--batch-size", "2", "--resume",
                str(out / "checkpoint-0000001")) == 2
    assert "batch_size" in capsys.readouterr().err


def test_cli_two_stages_end_to_end(data_dir, tmp_path):
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    args = ["--data", os.path.join(data_dir, "train.jsonl"), "--system", "", "--batch-size", "8",
            "--no-progress", "--threads", "1", "--eval-data", os.path.join(data_dir, "test.jsonl")]
    assert main(["--stage", "1", "--preset", "tiny", "--output-dir", str(s1), "--max-steps", "3",
                 *args]) == 0
    assert main(["--stage", "2", "--checkpoint", str(s1 / "final"), "--output-dir", str(s2),
                 "--max-steps", "3", "--gradient-checkpointing", *args]) == 0
    for run in (s1, s2):
        rows = read_metrics(run / "metrics.jsonl")
        train_rows = [r for r in rows if r["split"] == "train"]
        assert [r["step"] for r in train_rows] == [1, 2, 3]
        assert all(r["samples_per_s"] > 0 and r["tokens"] == 16 for r in train_rows)
        assert [r["split"] for r in rows].count("eval") == 1
        assert (run / "loss.png").stat().st_size > 1000
        assert (run / "final" / "tokenizer.json").is_file()
        summary = json.loads((run / "summary.json").read_text())
        assert summary["step"] == 3 and 0 <= summary["eval"]["accuracy"] <= 1
    # stage 2 started from stage 1's weights: its frozen vision tower equals stage 1's
    m1 = FlashSloth.from_pretrained(str(s1 / "final")).state_dict()
    m2 = FlashSloth.from_pretrained(str(s2 / "final")).state_dict()
    assert all(torch.equal(m1[k], m2[k]) for k in m1 if k.startswith("vision_tower."))
    assert not torch.equal(m1["lqformer.up_projector.weight"], m2["lqformer.up_projector.weight"])
    # stage 1 left the LLM as initialised
    run = json.loads((s1 / "run.json").read_text())
    assert run["stage"] == 1 and run["strategy"] == "none"


def test_cli_bad_lines_skip_or_reject(data_dir, tmp_path, capsys):
    rows = (open(os.path.join(data_dir, "train.jsonl")).read().splitlines())[:8]
    rows.insert(2, '{"image": "images/none.png", "conversations": []}')
    rows.insert(5, "not json")
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(rows) + "\n")
    shutil.copytree(os.path.join(data_dir, "images"), tmp_path / "images")
    base = ["--stage", "1", "--preset", "tiny", "--data", str(path), "--system", "",
            "--tokenizer", data_dir, "--batch-size", "4", "--max-steps", "1", "--no-progress"]
    assert main([*base, "--output-dir", str(tmp_path / "skip")]) == 0
    err = capsys.readouterr().err
    assert "mixed.jsonl:3:" in err and "mixed.jsonl:6:" in err and "2 bad data line" in err
    listed = (tmp_path / "skip" / "skipped_lines.txt").read_text()
    assert "mixed.jsonl:3:" in listed and "mixed.jsonl:6: not valid JSON" in listed
    assert main([*base, "--output-dir", str(tmp_path / "reject"), "--on-bad", "error"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 2 bad line(s)") and "mixed.jsonl:6:" in err
