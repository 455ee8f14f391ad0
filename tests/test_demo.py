"""python -m lowrank_compile.demo runs end to end on tiny settings and writes what it promises."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from lowrank_compile import data

REPO = Path(__file__).resolve().parents[1]


def test_corpus_is_bundled_and_split_without_overlap():
    assert len(data.DOCUMENTS) >= 4
    texts = [data.read(name) for name in data.DOCUMENTS]
    assert sum(map(len, texts)) > 300_000
    train, held = data.splits()
    assert train.dtype == torch.uint8 and held.numel() > 0.05 * train.numel()
    first = next(data.batches(train, 3, 32, 1, seed=5))
    assert first.shape == (3, 32) and first.dtype == torch.int64
    assert torch.equal(first, next(data.batches(train, 3, 32, 1, seed=5)))  # deterministic order
    assert data.decode(first[0]) in data.decode(train)
    (a, b), (c, d) = data.passages("train"), data.passages("test")
    assert set(b) == set(d) == set(range(len(data.DOCUMENTS)))
    assert not set(a) & set(c)


def test_demo_runs_and_both_losses_fall(tmp_path):
    """A reduced demo: both runs side by side, one thread each; the table, the summary, the three files, and not
    one line on stderr (no progress bar with --quiet, no third-party import notices)."""
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "lowrank_compile.demo", "--steps", "24", "--hidden", "64", "--layers", "2",
           "--batch", "4", "--seq", "64", "--eval-batches", "2", "--adamw-lr", "2e-3", "--lowrank-lr", "4e-3",
           "--quiet", "--out", str(out)]  # a tiny model, 24 steps: larger learning rates than the demo's
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=dict(os.environ), timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == "", result.stderr
    assert "| torch AdamW |" in result.stdout and "| lowrank_compile |" in result.stdout, result.stdout
    assert "projected:" in result.stdout and "lowrank_grad carriers" in result.stdout  # lrc.summary
    for name in ("demo.png", "results.json", "optimizer.safetensors"):
        assert str(out / name) in result.stdout, result.stdout  # says where it wrote each
    runs = json.loads((out / "results.json").read_text())["results"]
    assert [r["name"] for r in runs] == ["torch AdamW", "lowrank_compile"]
    for r in runs:
        first, last = r["evals"][0][1], r["evals"][-1][1]
        assert last < first - 1.0, (r["name"], r["evals"])
        assert r["step_s"] > 0 and r["peak_above_mib"] >= 0 and r["state_mib"] > 0
        assert r["spec"]["threads"] >= 1
    assert runs[1]["state_mib"] < 0.5 * runs[0]["state_mib"]  # rank 16 of 64: the states shrink plainly
    with safe_open(str(out / "optimizer.safetensors"), "pt") as f:
        assert f.metadata()["format"] == "lowrank_compile.optim"
        assert any(k.endswith(".indices") for k in f.keys())
    assert (out / "demo.png").stat().st_size > 10_000  # matplotlib is in the test extra


def test_progress_without_tqdm_prints_a_line_every_tenth(monkeypatch, capsys):
    from lowrank_compile.demo import _Progress

    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # as if the examples extra were not installed
    bar = _Progress(total=40, enabled=True)
    for done in range(0, 41, 5):
        bar.update(done, f"a {done}/40")
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "training: 12% (a 5/40)" and lines[-1] == "training: 100% (a 40/40)", lines
    assert len(lines) == 8
