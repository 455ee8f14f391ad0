"""Exact resume across processes: N steps, save, a NEW process builds a fresh model and optimizer, loads, and
runs M more steps — its weights and optimizer states are bit-identical to an uninterrupted N + M run.

Cases: fp32 and int8 states, eager and fused (updates inside backward); bf16 weights with int8 states and
stochastic rounding (its bits come from (seed, parameter, step), all in the checkpoint); and the
``opt.state_dict()`` path through torch.save / torch.load(weights_only=True). Every resumed run goes
through refreshes in both halves (update_gap 3: steps 1, 3, 6) with state_policy "match", weight decay,
and an lr changed before the save (as a scheduler would) that only the checkpoint knows.

This file is also the worker: ``python tests/test_resume.py <dir> <case>...`` resumes each case in <dir>.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import safetensors.torch
import torch
from torch import nn

import lowrank_compile as lrc

N_STEPS, M_STEPS = 4, 4
CASES = {  # name: (state_dtype, weight dtype, fused, via)
    "fp32": ("fp32", torch.float32, False, "safetensors"),
    "int8": ("int8", torch.float32, False, "safetensors"),
    "fp32-fused": ("fp32", torch.float32, True, "safetensors"),
    "int8-fused": ("int8", torch.float32, True, "safetensors"),
    "int8-bf16-weights": ("int8", torch.bfloat16, False, "safetensors"),
    "int8-state-dict": ("int8", torch.float32, False, "state_dict"),
}


@pytest.fixture(autouse=True)
def one_thread():
    """Small ops on a loaded 2-core machine run ~100x slower with 2 threads; one thread in both processes
    also keeps the two runs' reductions identical."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def build(case: str):
    """The same model and optimizer in every process: 2 projected layers (right, left), one plain Linear
    (filtered out) big enough for quantised states, and small biases that stay fp32."""
    state_dtype, dtype, fused, _ = CASES[case]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64), nn.Linear(64, 128)).to(dtype)
    opt = lrc.wrap_model(model, rank=16, lr=1e-2, update_gap=3, weight_decay=0.1, state_dtype=state_dtype,
                         fused=fused, filter_fn=lambda m, fqn: fqn != "3", seed=7)
    return model, opt


def train(model, opt, start: int, steps: int) -> None:
    dtype = model[0].weight.dtype
    for t in range(start, start + steps):
        g = torch.Generator().manual_seed(1000 + t)  # data depends on the step only
        x = torch.randn(8, 64, generator=g).to(dtype)
        target = torch.randn(8, 128, generator=g)
        torch.manual_seed(12345 + 17 * t)  # the global RNG moves differently in each process: must not matter
        loss = (model(x).float() - target).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()


def save(model, opt, directory: str, tag: str, via: str) -> None:
    safetensors.torch.save_file(model.state_dict(), os.path.join(directory, f"{tag}.model.safetensors"))
    if via == "state_dict":
        torch.save(opt.state_dict(), os.path.join(directory, f"{tag}.opt.pt"))
    lrc.save_optimizer(opt, os.path.join(directory, f"{tag}.opt.safetensors"))


def resume(directory: str, case: str) -> None:
    """The worker: fresh model and optimizer, load the step-N checkpoint, train M steps, save the result."""
    via = CASES[case][3]
    model, opt = build(case)
    model.load_state_dict(safetensors.torch.load_file(os.path.join(directory, f"{case}.mid.model.safetensors")))
    if via == "state_dict":
        opt.load_state_dict(torch.load(os.path.join(directory, f"{case}.mid.opt.pt"), weights_only=True))
    else:
        lrc.load_optimizer(opt, os.path.join(directory, f"{case}.mid.opt.safetensors"))
    train(model, opt, N_STEPS, M_STEPS)
    save(model, opt, directory, f"{case}.resumed", "safetensors")


def _tensors_and_meta(path: str):
    with safetensors.safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["meta"])
        return {k: f.get_tensor(k) for k in f.keys()}, meta


def test_resume_in_a_new_process_is_bit_identical(tmp_path):
    d = str(tmp_path)
    for case, (_, _, _, via) in CASES.items():
        model, opt = build(case)
        train(model, opt, 0, N_STEPS)
        for group in opt.param_groups:
            group["lr"] = 5e-3  # as a scheduler would; the resumed process only learns it from the checkpoint
        save(model, opt, d, f"{case}.mid", via)
        train(model, opt, N_STEPS, M_STEPS)
        save(model, opt, d, f"{case}.straight", "safetensors")

    run = subprocess.run([sys.executable, __file__, d, *CASES], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]

    for case in CASES:
        straight = safetensors.torch.load_file(os.path.join(d, f"{case}.straight.model.safetensors"))
        resumed = safetensors.torch.load_file(os.path.join(d, f"{case}.resumed.model.safetensors"))
        mid = safetensors.torch.load_file(os.path.join(d, f"{case}.mid.model.safetensors"))
        assert straight.keys() == resumed.keys()
        for k in straight:
            assert torch.equal(straight[k], resumed[k]), f"{case}: weight {k} differs after resume"
        assert not torch.equal(straight["0.weight"], mid["0.weight"])  # the M steps did train
        s_states, s_meta = _tensors_and_meta(os.path.join(d, f"{case}.straight.opt.safetensors"))
        r_states, r_meta = _tensors_and_meta(os.path.join(d, f"{case}.resumed.opt.safetensors"))
        assert s_states.keys() == r_states.keys()
        for k in s_states:
            assert torch.equal(s_states[k], r_states[k]), f"{case}: optimizer tensor {k} differs after resume"
        assert s_meta == r_meta
        assert r_meta["global_step"] == N_STEPS + M_STEPS
        assert all(g["lr"] == 5e-3 for g in r_meta["param_groups"])
        if CASES[case][0] == "int8":
            assert r_states["0.weight.exp_avg.codes"].dtype == torch.uint8  # really quantised


if __name__ == "__main__":
    torch.set_num_threads(1)
    directory, *cases = sys.argv[1:]
    for c in cases:
        resume(directory, c)
