"""lrc.summary(opt) and wrap_model(..., verbose=True): what was projected, what got plain AdamW and why, the cost."""
from __future__ import annotations

import logging
import re

import torch
from torch import nn

import lowrank_compile as lrc
from lowrank_compile import wrap as wrap_module


class Net(nn.Module):
    """Every reason a parameter gets plain AdamW: an embedding, a tied Linear, a small Linear, one filter_fn rejects,
    nn.MultiheadAttention's out_proj, norm and bias vectors; and a frozen Linear."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 64)
        self.big = nn.Linear(64, 128)
        self.rejected = nn.Linear(128, 64, bias=False)
        self.small = nn.Linear(64, 8)
        self.attn = nn.MultiheadAttention(64, 4)
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, 50, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.frozen = nn.Linear(64, 64)
        self.frozen.requires_grad_(False)


def test_summary_names_every_reason_and_counts_state_and_parameters():
    torch.manual_seed(0)
    model = Net()
    own = sum(p.numel() for p in model.parameters())
    opt = lrc.wrap_model(model, rank=16, filter_fn=lambda m, fqn: fqn != "rejected")
    text = lrc.summary(opt)
    assert "projected:    1 Linear layers" in text and "rank 16" in text, text
    for reason, name in [("embeddings", "embed.weight"), ("smaller side <= its rank", "small.weight"),
                         ("rejected by filter_fn", "rejected.weight"),
                         ("read directly by nn.MultiheadAttention", "attn.out_proj.weight"),
                         ("vectors (biases, norms)", "big.bias"), ("not an nn.Linear weight", "attn.in_proj_weight")]:
        line = next((ln for ln in text.splitlines() if reason in ln), "")
        assert name in line or "more)" in line, (reason, text)
    # the tied head is the embedding's parameter: listed once, as an embedding
    assert "head.weight" not in text
    # Adam states: the projected (128, 64) weight keeps (128, 16) moments; every other parameter its own shape
    plain = sum(p.numel() for g in opt.param_groups if not g["lowrank"] for p in g["params"])
    ours, adamw = 2 * 4 * (128 * 16 + plain), 2 * 4 * (128 * 64 + plain)
    assert f"{ours / 2**20:.1f} MiB, torch AdamW {adamw / 2**20:.1f} MiB" in text, text
    carriers = model.big.lowrank_grad.numel()
    assert f"Net has {own:,}; model.parameters() (and num_parameters()) count {own + carriers:,}" in text, text
    assert sum(p.numel() for p in model.parameters()) == own + carriers
    assert "no memory in one process" in text and "DDP, FSDP2" in text
    assert f"{64 * 64 + 64:,} frozen parameters" in text
    assert max(map(len, text.splitlines())) <= 120 and len(text.splitlines()) <= 24  # one screen


def test_verbose_prints_the_summary_and_the_default_only_logs_it(capsys, caplog):
    torch.manual_seed(0)
    opt = lrc.wrap_model(nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 32)), rank=8, verbose=True)
    assert capsys.readouterr().out.strip() == lrc.summary(opt)
    with caplog.at_level(logging.INFO, logger="lowrank_compile"):
        lrc.wrap_model(nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 32)), rank=8)
    assert capsys.readouterr().out == ""
    assert any("projected:" in r.getMessage() for r in caplog.records)


def test_a_long_first_compile_is_announced_once(caplog, monkeypatch):
    monkeypatch.setattr(wrap_module, "_compile_noted", False)
    with caplog.at_level(logging.INFO, logger="lowrank_compile"):
        for _ in range(2):
            opt = lrc.wrap_model(nn.Sequential(nn.Linear(64, 1024), nn.Linear(1024, 64)), rank=8, state_dtype="int8")
    notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("lowrank_compile: compiling")]
    assert len(notes) == 1 and "about 30 s the first time" in notes[0], notes
    assert "torch.compile'd at the first step" in lrc.summary(opt)
    assert re.search(r"state_dtype 'int8'", lrc.summary(opt))
    small = lrc.wrap_model(nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 32)), rank=8, state_dtype="int8")
    assert "torch.compile" not in lrc.summary(small)  # every state too small to quantise: nothing to compile


def test_summary_finds_the_optimizer_behind_a_wrapper():
    opt = lrc.wrap_model(nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 32)), rank=8)

    class Accelerated:  # what accelerate and Trainer hand around
        optimizer = opt

    assert lrc.summary(Accelerated()) == lrc.summary(opt)


def test_verbose_prints_on_rank_0_only(capsys, monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    for rank, printed in ((1, False), (0, True)):
        monkeypatch.setattr(dist, "get_rank", lambda group=None, rank=rank: rank)
        monkeypatch.setattr(wrap_module.distributed, "is_multiprocess", lambda group=None: False)
        lrc.wrap_model(nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 32)), rank=8, verbose=True)
        assert ("projected:" in capsys.readouterr().out) is printed, rank
