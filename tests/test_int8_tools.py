"""Smoke test of tools/llama7b_memory.py (issue 20): the whole pipeline on a tiny LLaMA, in a few seconds.

Meta-device build, wrap (lm_head projected, fused), materialisation by lowrank_compile.load_weights from a lazy
random-init Mapping (int8 weights) or by the tool's own loader (bf16), real training steps, the breakdown,
the JSON and its table. The 7B measurement itself is a tool, not a test.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TOOL = REPO / "tools" / "llama7b_memory.py"


def run_tool(tmp_path, *extra):
    out = tmp_path / "r.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, str(TOOL), "--tiny", "--layers", "1", "--threads", "1", "--steps", "2",
           "--state-dtype", "fp32", "--lr", "1e-2", "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), out


def check(r, fused=True):
    assert r["layers"] == 1 and r["hidden"] == 256 and r["lm_head_projected"] and r["fused"] == fused
    assert r["projected_layers"] == 8  # q, k, v, o, gate, up, down and lm_head
    assert len(r["steps"]) == 2 and r["steps"][0]["refresh"]
    assert r["steps"][1]["loss"] < r["steps"][0]["loss"]  # the updates ran (inside backward)
    assert r["state_bytes"] > 0
    bd = r["breakdown_mib"]
    assert {"runtime", "weights", "optimizer states", "activations", "transients", "other"} <= set(bd)
    assert abs(sum(bd.values()) - r["peak_bytes"] / 2**20) < 1e-3 * r["peak_bytes"] / 2**20
    assert r["peak_bytes"] > r["runtime_bytes"] > 0


def test_memory_tool_bf16(tmp_path):
    r, out = run_tool(tmp_path, "--weight-dtype", "bf16", "--loader", "fallback")
    check(r)
    assert r["materialize"]["loader"] == "fallback"
    assert "bfloat16 parameters" in r["weights"]["by_kind_mib"]
    assert out.with_suffix(".md").read_text().startswith("| device |")


def test_memory_tool_int8(tmp_path):
    import lowrank_compile as lrc

    if not hasattr(lrc, "load_weights"):
        pytest.skip("lowrank_compile.load_weights is not there yet")
    r, _ = run_tool(tmp_path, "--weight-dtype", "int8")  # fused: the in-backward updates must survive loading
    check(r)
    assert r["materialize"]["loader"] == "api"
    assert r["weights"]["by_kind_mib"].get("int8 codes", 0) > 0


def test_random_init_is_lazy_and_deterministic():
    sys.path.insert(0, str(REPO / "tools"))
    try:
        from llama7b_memory import RandomInit
    finally:
        sys.path.remove(str(REPO / "tools"))
    src = RandomInit({"a.weight": (torch.Size([4, 3]), torch.float32), "n.weight": (torch.Size([3]), torch.float32)})
    assert src.reads == 0 and len(src) == 2 and set(src) == {"a.weight", "n.weight"}
    a = src["a.weight"]
    assert a.dtype == torch.bfloat16 and torch.equal(a, src["a.weight"]) and torch.equal(src["n.weight"],
                                                                                         torch.ones(3, dtype=a.dtype))
    assert src.reads == 3
