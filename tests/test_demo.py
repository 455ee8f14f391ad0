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
    out = tmp_path / "demo"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "lowrank_compile.demo", "--steps", "24", "--hidden", "64", "--layers", "2",
           "--batch", "4", "--seq", "64", "--eval-batches", "2", "--threads", "1", "--quiet", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| torch AdamW |" in result.stdout and "| lowrank_compile |" in result.stdout, result.stdout
    runs = json.loads((out / "results.json").read_text())["results"]
    assert [r["name"] for r in runs] == ["torch AdamW", "lowrank_compile"]
    for r in runs:
        first, last = r["evals"][0][1], r["evals"][-1][1]
        assert last < first - 1.0, (r["name"], r["evals"])
        assert r["step_s"] > 0 and r["peak_above_mib"] >= 0
    with safe_open(str(out / "optimizer.safetensors"), "pt") as f:
        assert f.metadata()["format"] == "lowrank_compile.optim"
        assert any(k.endswith(".indices") for k in f.keys())
    assert (out / "demo.png").stat().st_size > 10_000  # matplotlib is in the test extra
