"""save_optimizer / load_optimizer: the file's contents, the atomic write, the round trip, and every rejection.

A rejected load must name what differs and leave the optimizer untouched.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import safetensors
import safetensors.torch
import torch
from torch import nn

import lowrank_compile as lrc
from lowrank_compile import checkpoint, quant
from lowrank_compile.checkpoint import CheckpointError
from lowrank_compile.inspect import main as inspect_main


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny ops are far slower on 2 busy threads


def make(hidden: int = 256, rank: int = 16, state_dtype: str = "int8", extra: bool = False, skip_down=False,
         frozen: bool = False, dtype: torch.dtype = torch.float32, **kw):
    """A model with a right- and a left-projected layer, a plain Linear (filtered out), biases; and its optimizer."""
    torch.manual_seed(0)
    layers = [nn.Linear(64, hidden), nn.GELU(), nn.Linear(hidden, 64), nn.Linear(64, 128)]
    if extra:
        layers.append(nn.Linear(128, 512))
    model = nn.Sequential(*layers).to(dtype)
    if frozen:
        model[3].requires_grad_(False)
    skip = {"3"} | ({"2"} if skip_down else set())
    opt = lrc.wrap_model(model, rank=rank, lr=1e-2, update_gap=2, state_dtype=state_dtype,
                         filter_fn=lambda m, fqn: fqn not in skip, **kw)
    return model, opt


def train(model, opt, steps: int = 3) -> None:
    for t in range(steps):
        g = torch.Generator().manual_seed(t)
        model(torch.randn(8, 64, generator=g)).square().mean().backward()
        opt.step()
        opt.zero_grad()


def snapshot(opt) -> dict:
    """Every state tensor's parts (codes and scales for quantised ones), param-group values, the global step."""
    out = {"global_step": opt.global_step, "groups": [{k: v for k, v in g.items() if k != "params"}
                                                      for g in opt.param_groups]}
    for i, p in enumerate(q for g in opt.param_groups for q in g["params"]):
        for key, value in opt.state.get(p, {}).items():
            for part, t in quant.state_parts(value).items():
                out[f"{i}.{key}.{part}"] = t.clone()
    return out


def same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    return all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


@pytest.fixture
def saved(tmp_path):
    model, opt = make()
    train(model, opt)
    path = tmp_path / "opt.safetensors"
    lrc.save_optimizer(opt, path)
    return model, opt, path


def test_the_file_is_plain_safetensors_with_compact_indices(saved):
    _, opt, path = saved
    with safetensors.safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["format"] == "lowrank_compile.optim" and meta["format_version"] == "1"
    assert meta["checksum"].startswith("sha256:")
    info = json.loads(meta["meta"])
    assert info["state_dtype"] == "int8" and info["global_step"] == 3
    layers = {e["name"]: e for e in info["layers"]}
    assert layers["0.weight"]["side"] == "right" and layers["0.weight"]["rank"] == 16
    assert layers["2.weight"]["side"] == "left" and layers["2.weight"]["state_shape"] == [16, 256]
    assert layers["0.bias"]["state_dtype"] == "fp32" and "4096" in layers["0.bias"]["fallback"]
    assert tensors["0.weight.indices"].dtype == torch.uint8  # basis size 64 <= 256
    assert tensors["2.weight.indices"].dtype == torch.uint8  # basis size 256
    assert torch.equal(tensors["0.weight.indices"].long(), opt.state[next(iter(opt.layers))]["indices"])
    assert tensors["0.weight.exp_avg.codes"].dtype == torch.uint8
    assert tensors["0.weight.exp_avg.scale"].shape == (256 * 16 // 256,)
    assert tensors["3.weight.exp_avg_sq.codes"].shape == (128, 64)  # plain AdamW state, quantised too
    assert tensors["0.bias.exp_avg"].dtype == torch.float32
    assert tensors["0.weight.step"].item() == 3.0
    assert checkpoint.index_dtype(257) == torch.int16 and checkpoint.index_dtype(40000) == torch.int32


def test_round_trip_restores_every_bit_and_hyperparameter(saved):
    model, opt, path = saved
    for g in opt.param_groups:
        g["lr"] = 3e-3  # as a scheduler leaves it
    lrc.save_optimizer(opt, path)
    before = snapshot(opt)
    model2, opt2 = make()
    model2.load_state_dict(model.state_dict())
    lrc.load_optimizer(opt2, path)
    assert same(snapshot(opt2), before)
    for layer, layer2 in zip(opt.layers.values(), opt2.layers.values()):
        assert torch.equal(layer.selection(), layer2.selection())  # the layers' own index buffers too
    assert opt2.refresh_control.refresh == opt.refresh_control.refresh
    train(model, opt, 2)
    train(model2, opt2, 2)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))


@pytest.mark.parametrize("basis,policy", [("svd", "keep"), ("random", "reset")])
def test_round_trip_other_bases(tmp_path, basis, policy):
    model, opt = make(state_dtype="fp8", basis=basis, state_policy=policy)
    train(model, opt)
    lrc.save_optimizer(opt, tmp_path / "o.safetensors")
    model2, opt2 = make(state_dtype="fp8", basis=basis, state_policy=policy)
    model2.load_state_dict(model.state_dict())
    lrc.load_optimizer(opt2, tmp_path / "o.safetensors")
    assert same(snapshot(opt2), snapshot(opt))
    train(model, opt, 2)
    train(model2, opt2, 2)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))


def test_the_write_is_atomic(saved, monkeypatch):
    _, opt, path = saved
    original = path.read_bytes()
    train(*saved[:2], 1)

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        lrc.save_optimizer(opt, path)
    assert path.read_bytes() == original  # the previous checkpoint is intact
    assert os.listdir(path.parent) == [path.name]  # and no temporary file is left behind


def expect_rejection(opt, path, *patterns):
    before = snapshot(opt)
    with pytest.raises(CheckpointError) as info:
        lrc.load_optimizer(opt, path)
    for pattern in patterns:
        assert pattern in str(info.value), str(info.value)
    assert same(snapshot(opt), before)  # untouched
    return str(info.value)


def fresh_trained(**kw):
    model, opt = make(**kw)
    train(model, opt, 1)  # has states of its own, which a rejected load must keep
    return opt


def test_rejects_a_file_cut_in_half(saved, tmp_path):
    _, _, path = saved
    cut = tmp_path / "cut.safetensors"
    data = path.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    expect_rejection(fresh_trained(), cut, "truncated")
    cut.write_bytes(data[:5])
    expect_rejection(fresh_trained(), cut, "truncated")


def test_rejects_a_flipped_byte_in_the_json_header(saved, tmp_path):
    _, _, path = saved
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    bad = tmp_path / "bad.safetensors"
    opt = fresh_trained()
    meta_at = data.index(b'"meta"', 8)
    positions = sorted({9, 8 + n // 3, meta_at + 20, meta_at + 200, 8 + n - 1} |
                       set(range(8, 8 + n, max(1, n // 40))))
    for pos in positions:
        flipped = bytearray(data)
        flipped[pos] ^= 0x01
        bad.write_bytes(bytes(flipped))
        expect_rejection(opt, bad)  # whichever check catches it: JSON, safetensors, format, checksum
    flipped = bytearray(data)
    flipped[meta_at + 200] ^= 0x01
    bad.write_bytes(bytes(flipped))
    message = expect_rejection(opt, bad)
    assert "checksum" in message or "JSON" in message


def test_rejects_a_flipped_byte_in_tensor_data(saved, tmp_path):
    _, _, path = saved
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    start, end = header["0.weight.exp_avg.codes"]["data_offsets"]
    flipped = bytearray(data)
    flipped[8 + n + (start + end) // 2] ^= 0x10
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(flipped))
    expect_rejection(fresh_trained(), bad, "checksum", "corrupted")


def test_rejects_a_different_rank(saved):
    expect_rejection(fresh_trained(rank=8), saved[2], "0.weight rank: checkpoint has 16, this optimizer 8")


def test_rejects_a_different_state_dtype(saved):
    expect_rejection(fresh_trained(state_dtype="int4"), saved[2], "state_dtype: checkpoint has 'int8', "
                                                                  "this optimizer 'int4'")


def test_rejects_missing_and_extra_layers(saved):
    expect_rejection(fresh_trained(extra=True), saved[2], "missing from the checkpoint: 4.weight, 4.bias")
    expect_rejection(fresh_trained(frozen=True), saved[2],
                     "in the checkpoint but not in this optimizer: 3.weight, 3.bias")
    message = expect_rejection(fresh_trained(skip_down=True), saved[2], "2.weight projected")
    assert "checkpoint has True, this optimizer False" in message


def test_rejects_other_shapes(saved):
    expect_rejection(fresh_trained(hidden=320), saved[2], "0.weight shape: checkpoint has [256, 64], "
                                                          "this optimizer [320, 64]")


def _rewrite(path, out, change) -> None:
    """A copy of a checkpoint with its metadata changed and a valid checksum: only the change is wrong."""
    with safetensors.safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(meta, tensors)
    meta["checksum"] = checkpoint._checksum(meta, tensors)
    safetensors.torch.save_file(tensors, str(out), metadata=meta)


def test_rejects_another_format_version(saved, tmp_path):
    out = tmp_path / "v2.safetensors"
    _rewrite(saved[2], out, lambda meta, t: meta.update(format_version="2"))
    expect_rejection(fresh_trained(), out, "format version '2'", "reads version 1")


def test_rejects_inconsistent_tensors_even_with_a_valid_checksum(saved, tmp_path):
    out = tmp_path / "odd.safetensors"
    _rewrite(saved[2], out, lambda meta, t: t.pop("2.weight.exp_avg_sq.scale"))
    expect_rejection(fresh_trained(), out, "tensor 2.weight.exp_avg_sq.scale is missing")

    def bad_indices(meta, t):
        t["0.weight.indices"][0] = 200  # basis size 64
    _rewrite(saved[2], out, bad_indices)
    expect_rejection(fresh_trained(), out, "indices must be distinct and in [0, 64)")


def test_rejects_files_that_are_not_optimizer_checkpoints(saved, tmp_path):
    model = saved[0]
    weights = tmp_path / "model.safetensors"
    safetensors.torch.save_file(model.state_dict(), str(weights))
    expect_rejection(fresh_trained(), weights, "not a lowrank_compile optimizer checkpoint")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    expect_rejection(fresh_trained(), junk, "not valid JSON")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cpu_checkpoint_loads_onto_cuda(saved):
    model, opt, path = saved
    torch.manual_seed(0)
    model2 = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64), nn.Linear(64, 128)).cuda()
    model2.load_state_dict(model.state_dict())
    opt2 = lrc.wrap_model(model2, rank=16, lr=1e-2, update_gap=2, state_dtype="int8",
                          filter_fn=lambda m, fqn: fqn != "3")
    lrc.load_optimizer(opt2, path)
    p = next(iter(opt2.layers))
    assert opt2.state[p]["exp_avg"].codes.is_cuda and opt2.state[p]["indices"].is_cuda
    assert same({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in snapshot(opt2).items()},
                snapshot(opt))
    model2(torch.randn(8, 64, device="cuda")).square().mean().backward()
    opt2.step()


def test_inspect_prints_the_table_and_the_total(saved, tmp_path, capsys):
    path = saved[2]
    run = subprocess.run([sys.executable, "-m", "lowrank_compile.inspect", str(path), "--verify"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "0.weight" in out and "right" in out and "int8" in out and "fp32 (fallback)" in out
    assert "total:" in out and "torch AdamW would store" in out and "checksum: ok" in out
    assert run.stderr == ""
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:100])
    assert inspect_main([str(cut)]) == 1
    assert "truncated" in capsys.readouterr().err


def test_state_dict_keeps_fp32_states_and_int_indices_next_to_bf16_weights(tmp_path):
    """opt.state_dict() through torch.save / torch.load(weights_only=True): torch.optim would cast the
    states to the bf16 weights' dtype; ours keep fp32 states and int64 indices (and torchao subclasses)."""
    for state_dtype, kind in (("fp32", "fp32"), ("int8", "int8")):
        model, opt = make(state_dtype=state_dtype, dtype=torch.bfloat16)
        model(torch.randn(8, 64, dtype=torch.bfloat16)).float().square().mean().backward()
        opt.step()
        torch.save(opt.state_dict(), tmp_path / "sd.pt")
        _, opt2 = make(state_dtype=state_dtype, dtype=torch.bfloat16)
        opt2.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
        p = next(iter(opt2.layers))
        assert quant.kind_of(opt2.state[p]["exp_avg"]) == kind
        assert opt2.state[p]["indices"].dtype == torch.int64
        assert same(snapshot(opt2), snapshot(opt))


def test_refuses_to_save_between_micro_batches(tmp_path):
    model, opt = make(accumulate=2)
    model(torch.randn(8, 64)).square().mean().backward()
    opt.step()  # the first of two micro-batches: no update yet
    with pytest.raises(RuntimeError, match="between the micro-batches"):
        lrc.save_optimizer(opt, tmp_path / "o.safetensors")


def _addresses(opt) -> dict:
    """data_ptr of every stored part of every state tensor (step, moments' codes and scales, indices)."""
    return {f"{i}.{key}.{part}": t.data_ptr()
            for i, p in enumerate(q for g in opt.trained_groups for q in g["params"])
            for key, value in opt.state.get(p, {}).items() for part, t in quant.state_parts(value).items()}


@pytest.mark.parametrize("loader", ["load_state_dict", "load_optimizer", "dcp"])
@pytest.mark.parametrize("state_dtype", ["fp32", "int8"])
def test_loading_copies_into_the_existing_states(tmp_path, state_dtype, loader):
    """States live at static addresses (what a captured CUDA graph or a compiled step holds on to): every loader
    copies into the existing state tensors, and the loaded values are the saved ones."""
    model, opt = make(state_dtype=state_dtype)
    train(model, opt, 5)
    saved = snapshot(opt)
    model2, opt2 = make(state_dtype=state_dtype)
    train(model2, opt2, 2)
    before = _addresses(opt2)
    assert len(before) == len([k for k in saved if k[0].isdigit()]) > 10
    if loader == "load_state_dict":
        opt2.load_state_dict(opt.state_dict())
    elif loader == "load_optimizer":
        lrc.save_optimizer(opt, tmp_path / "opt.safetensors")
        lrc.load_optimizer(opt2, tmp_path / "opt.safetensors")
    else:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        set_optimizer_state_dict(model2, opt2, get_optimizer_state_dict(model, opt))
    assert _addresses(opt2) == before
    loaded = snapshot(opt2)
    for key, value in saved.items():
        if key[0].isdigit():
            assert torch.equal(loaded[key], value), key
    assert loaded["global_step"] == saved["global_step"] == 5
    train(model2, opt2, 1)  # and it steps on
    assert _addresses(opt2) == before
