"""The examples run from a fresh process and do what they print."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quickstart_runs_and_loss_goes_down():
    # One thread: the example's speed is not under test, and small ops crawl when 2 threads share busy cores.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(REPO / "examples" / "quickstart.py"), "--steps", "12"],
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    first, final = map(float, re.search(r"lowrank_compile: loss ([\d.]+) -> ([\d.]+)", out).groups())
    assert final < first - 0.5, out
    rows = dict(re.findall(r"^\| (lowrank_compile|torch\.optim\.AdamW) \| (.*) \|$", out, flags=re.M))
    assert rows.keys() == {"lowrank_compile", "torch.optim.AdamW"}, out
    peaks = {name: float(re.search(r"\| ([\d.]+) MiB \|", f"| {cells} |").group(1)) for name, cells in rows.items()}
    assert peaks["lowrank_compile"] < peaks["torch.optim.AdamW"], out
    assert len(re.findall(r"lowrank_compile\s+step\s+\d+\s+loss", out)) >= 3  # the loss is printed as it trains
