"""Sharded checkpoints with torch.distributed.checkpoint: torch's own get_state_dict / set_state_dict with
dcp.save / dcp.load, unchanged, on a wrapped model in one process, under DDP and under FSDP2 (gloo, CPU).

A resume is compared with an uninterrupted run on the same data: bit-identical where the arithmetic is the same
(same number of processes), to 1e-12 in fp64 after resharding (2 -> 1 or 4 processes: a rank's gradient is then
the average of another number of partial sums, so the two runs differ in summation order only; see
tests/test_distributed.py for the bound). Selections must be equal in every case.

The default run spawns 2 processes once (< 30 s); the resharding, restart and HSDP runs are marked slow.
"""
from __future__ import annotations

import datetime
import io
import os
import tempfile
import time
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict, set_state_dict)

import lowrank_compile as lrc
from lowrank_compile import distributed as lrd
from lowrank_compile import quant
from test_distributed import Net as _DistributedNet

warnings.filterwarnings("ignore", message="torch.distributed is disabled")
OPT = dict(rank=6, lr=1e-2, update_gap=2, weight_decay=0.1)
STEPS, SAVE_AT = 6, 3  # update_gap 2: refreshes at 1, 2, 4, 6; the resume starts at step 4, a refresh
TOL = dict(rtol=0, atol=1e-12)


def Net() -> nn.Module:
    """test_distributed's model with a head of 4 rows, so that each of 4 FSDP2 processes holds some of it."""
    return _DistributedNet(head_rows=4)


class BigNet(nn.Module):
    """Layers whose rank-r states reach torchao's 4096 elements on each of 2 processes, so int8 states are really
    quantised (under FSDP2 too)."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(24, 1024)  # right: (1024, 8) states, Shard(0)
        self.down = nn.Linear(1024, 24)  # left: (8, 1024) states, Shard(1)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


def make(kind: str = "fp64", **kw):
    torch.manual_seed(0)
    if kind == "int8":
        model = BigNet()
        # compile_step=False: eager torchao codecs, no compile time for these small states
        return model, lrc.wrap_model(model, **{**OPT, "rank": 8, "state_dtype": "int8", "compile_step": False, **kw})
    model = Net().double()
    return model, lrc.wrap_model(model, **{**OPT, **kw})


def batches(kind: str = "fp64", n: int = STEPS, rows: int = 8):
    g = torch.Generator().manual_seed(1)
    dtype = torch.float64 if kind == "fp64" else torch.float32
    return [(torch.randn(rows, 3, 24, generator=g, dtype=dtype), torch.randn(rows, 3, 24 if kind == "int8" else 4,
                                                                             generator=g, dtype=dtype))
            for _ in range(n)]


def world_and_rank() -> tuple[int, int]:
    return (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)


def train(net, opt, data, kind="fp64") -> list:
    """Train on each global batch's share of this process; returns the selections after every step."""
    world, rank = world_and_rank()
    sels = []
    for x, y in data:
        (net(x.chunk(world)[rank]) - y.chunk(world)[rank]).square().mean().backward()
        opt.step()
        opt.zero_grad()
        sels.append([layer.selection().clone() for layer in opt.refresh_control.layers])
    return sels


def snapshot(model, opt) -> dict:
    """Full weights and this process's states (dequantised), selections and step counters, as plain tensors."""
    full = lambda t: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()  # noqa: E731
    names = {p: n for n, p in model.named_parameters()}
    states = {}
    for g in opt.param_groups:
        for p in g["params"]:
            for k, v in opt.state.get(p, {}).items():
                plain = not v.is_floating_point() and not quant.is_quantized(v) or k == "step"
                states[f"{names.get(p, len(states))}.{k}"] = ((str(v.dtype), v.clone()) if plain else
                                                             (quant.kind_of(v), quant.dequantize(v).clone()))
    return dict(weights={k: full(v) for k, v in model.state_dict().items()}, states=states,
                sels=[layer.selection().clone() for layer in opt.refresh_control.layers], step=opt.global_step)


def detached_copy(obj):
    """A copy sharing no tensor with `obj` (copy.deepcopy cannot copy torchao's quantised states)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def save(model, opt, path, **options):
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(**options))
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)


def load(model, opt, path, **options):
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(**options))
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd, options=StateDictOptions(**options))


def shard(model, opt, mesh=None):
    return lrd.prepare_fsdp(model, opt, units=[model.up, model.down], mesh=mesh)


def engine(model, opt, how: str, refresh_sync: str | None = None):
    if how == "fsdp":
        return shard(model, opt)
    if how == "ddp":
        return lrd.prepare_ddp(model, opt, refresh_sync=refresh_sync)
    return model


def assert_same(a: dict, b: dict, exact: bool = True):
    tol = dict(rtol=0, atol=0) if exact else TOL
    assert a["step"] == b["step"]
    for k in a["weights"]:
        torch.testing.assert_close(a["weights"][k], b["weights"][k], **tol, msg=lambda m: f"{k}: {m}")
    for x, y in zip(a["sels"], b["sels"]):
        assert torch.equal(x, y), "selections differ"
    if exact:
        assert a["states"].keys() == b["states"].keys()
        for k, (kind, v) in a["states"].items():
            assert b["states"][k][0] == kind, k
            assert torch.equal(v, b["states"][k][1]), k


# -- runs inside spawned processes ------------------------------------------------------------------------------
def resume_in_place(how: str, kind: str, path: str, **kw) -> dict:
    """Uninterrupted run vs save at SAVE_AT + load into fresh objects + continue, in the same processes."""
    data = batches(kind)
    model, opt = make(kind, **kw)
    net = engine(model, opt, how)
    train(net, opt, data, kind)
    whole = snapshot(model, opt)
    model, opt = make(kind, **kw)
    net = engine(model, opt, how)
    train(net, opt, data[:SAVE_AT], kind)
    save(net, opt, path)
    model, opt = make(kind, **kw)
    net = engine(model, opt, how)
    fresh = (opt.global_step, opt.micro_step, opt.refresh_control.refresh)
    load(net, opt, path)
    train(net, opt, data[SAVE_AT:], kind)
    return dict(whole=whole, resumed=snapshot(model, opt), fresh=fresh)


def default_scenarios(path: str) -> dict:
    _, rank = world_and_rank()
    out = dict(fsdp=resume_in_place("fsdp", "fp64", os.path.join(path, "fsdp")),
               ddp_int8_fused_cheap=resume_in_place("ddp", "int8", os.path.join(path, "ddp"), fused=True,
                                                    refresh_sync="cheap"))
    out["fsdp_int8"] = resume_in_place("fsdp", "int8", os.path.join(path, "fsdp_int8"))
    model, opt = make()
    shard(model, opt)
    try:
        lrc.save_optimizer(opt, os.path.join(path, f"opt{rank}.safetensors"))
        out["save_optimizer_error"] = None
    except RuntimeError as e:
        out["save_optimizer_error"] = str(e)
    out["unwrap"] = unwrap_after_fsdp()
    return out


def unwrap_after_fsdp() -> dict:
    """Train 2 steps under prepare_fsdp, unwrap, then train 2 more with torch.optim.AdamW on the still-sharded model;
    the same 2 AdamW steps on a plain copy of the unwrapped weights (whole batch, one process) are the reference."""
    world, rank = world_and_rank()
    data = batches()
    model, opt = make()
    net = shard(model, opt)
    train(net, opt, data[:2])
    x = data[2][0]
    before = (net(x).detach().clone(), {k: v.full_tensor() for k, v in model.state_dict().items()})
    lrc.unwrap_model(model)
    out = dict(types=sorted({type(m).__name__ for m in model.modules()}), keys=sorted(model.state_dict()),
               plain_keys=sorted(Net().state_dict()), before=before, after=(net(x).detach().clone(), {
                   k: v.full_tensor() for k, v in model.state_dict().items()}),
               sharded=all(hasattr(p, "device_mesh") for p in model.parameters()),
               trainable=all(p.requires_grad for p in model.parameters()))
    try:
        opt.step()
    except RuntimeError as e:
        out["old_opt_error"] = str(e)
    plain = Net().double()
    plain.load_state_dict(before[1])
    adamw = torch.optim.AdamW(net.parameters(), lr=1e-2)
    reference = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    for xb, yb in data[2:4]:
        (net(xb.chunk(world)[rank]) - yb.chunk(world)[rank]).square().mean().backward()
        adamw.step()
        adamw.zero_grad()
        (plain(xb) - yb).square().mean().backward()
        reference.step()
        reference.zero_grad()
    out["trained"] = {k: v.full_tensor() for k, v in model.state_dict().items()}
    out["reference"] = {k: v.detach().clone() for k, v in plain.state_dict().items()}
    return out


def save_run(path: str, how: str = "fsdp", mesh_shape=None, kind: str = "fp64", **kw) -> dict:
    """The uninterrupted run, and a run saved at SAVE_AT (its snapshot then)."""
    mesh = None
    if mesh_shape is not None:
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("replicate", "shard"))
    data = batches(kind)
    out = {}
    for part in ("whole", "saved"):
        model, opt = make(kind, **kw)
        net = shard(model, opt, mesh) if how == "fsdp" else engine(model, opt, how, kw.get("refresh_sync"))
        out[part + "_sels"] = train(net, opt, data if part == "whole" else data[:SAVE_AT], kind)
        out[part] = snapshot(model, opt)
        out["mesh_ndim"] = model.up.weight.device_mesh.ndim if how == "fsdp" else 0
        if part == "saved":
            save(net, opt, path)
    return out


def load_run(path: str, how: str = "fsdp", mesh_shape=None, kind: str = "fp64", expect_error: bool = False,
             **kw) -> dict:
    """Load the checkpoint into a fresh job of this size, snapshot, continue to STEPS; also export the weights into
    a plain (unwrapped, unsharded) model."""
    mesh = None
    if mesh_shape is not None:
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("replicate", "shard"))
    model, opt = make(kind, **kw)
    net = shard(model, opt, mesh) if how == "fsdp" else engine(model, opt, how)
    try:
        load(net, opt, path)
    except ValueError as e:
        if not expect_error:
            raise
        return dict(error=str(e))
    out = dict(loaded=snapshot(model, opt))
    out["sels"] = train(net, opt, batches(kind)[SAVE_AT:], kind)
    out["final"] = snapshot(model, opt)
    if kind != "fp64":
        return out
    plain = Net().double()
    sd = get_model_state_dict(plain)
    dcp.load({"model": sd}, checkpoint_id=path)  # the model's part of the checkpoint only
    plain.load_state_dict(sd)
    out["export"] = {k: v.clone() for k, v in plain.state_dict().items()}
    return out


def _worker(rank: int, world: int, tmp: str, fn_name: str, args: tuple, kwargs: dict) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        result = globals()[fn_name](*args, **kwargs)
    except Exception:
        result = dict(exception=traceback.format_exc())
    torch.save(result, os.path.join(tmp, f"rank{rank}.pt"))
    if world > 1:
        dist.destroy_process_group()


def spawn(world: int, fn, *args, timeout: float = 110, **kwargs) -> list:
    """Run fn(*args, **kwargs) in `world` new processes (gloo); every rank's result."""
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(_worker, args=(world, tmp, fn.__name__, args, kwargs), nprocs=world, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=2):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail(f"{fn.__name__} on {world} processes did not finish in {timeout} s")
        results = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world)]
    errors = [f"rank {i}: {r['exception']}" for i, r in enumerate(results) if isinstance(r, dict) and "exception" in r]
    if errors:  # the first to fail is the one whose error is not a lost connection
        errors.sort(key=lambda e: "Connection closed by peer" in e)
        pytest.fail(f"{fn.__name__} raised on {len(errors)} of {world} processes:\n{errors[0]}")
    return results


# -- the default run: one spawn of 2 processes ---------------------------------------------------------------
@pytest.fixture(scope="module")
def two_process_run():
    with tempfile.TemporaryDirectory() as ckpt:
        return spawn(2, default_scenarios, ckpt)


@pytest.mark.parametrize("name", ["fsdp", "ddp_int8_fused_cheap", "fsdp_int8"])
def test_two_process_dcp_resume_is_bit_identical(two_process_run, name):
    for r in two_process_run:
        run = r[name]
        assert run["fresh"] == (0, 0, True)  # get_state_dict's lr-0 step on a fresh optimizer moved nothing
        assert_same(run["whole"], run["resumed"])
    if "int8" in name:
        assert {kind for kind, _ in two_process_run[0][name]["resumed"]["states"].values()} >= {"int8"}


def test_save_optimizer_of_sharded_model_points_to_dcp(two_process_run):
    for r in two_process_run:
        assert "torch.distributed.checkpoint" in r["save_optimizer_error"]


def test_unwrap_after_fsdp_gives_plain_linears_that_train(two_process_run):
    """unwrap_model after prepare_fsdp: nn.Linear again, the original keys, the weights still FSDP's sharded (and now
    trainable) parameters with their values; forward unchanged; torch.optim.AdamW then trains the sharded model as
    it trains a plain copy on the whole batch (to 1e-12 in fp64: the processes' gradients are summed)."""
    for r in two_process_run:
        u = r["unwrap"]
        assert "LowRankLinear" not in u["types"] and "Linear" in u["types"]
        assert u["keys"] == u["plain_keys"]
        assert u["sharded"] and u["trainable"]
        assert torch.equal(u["before"][0], u["after"][0])
        assert all(torch.equal(v, u["after"][1][k]) for k, v in u["before"][1].items())
        assert "unwrap" in u["old_opt_error"]
        assert not all(torch.equal(v, u["trained"][k]) for k, v in u["before"][1].items())
        for k, v in u["reference"].items():
            torch.testing.assert_close(u["trained"][k], v, **TOL)


# -- one process ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, flatten, kw", [
    ("fp64", False, {}), ("fp64", True, dict(sketch_rows=4, stagger=True)),
    ("fp64", False, dict(basis="svd", state_policy="keep")), ("int8", False, {})])
def test_single_process_round_trip(tmp_path, kind, flatten, kw):
    """dcp.load writes into the tensors it is given; set_state_dict gets a copy here, so the states really come
    through set_state_dict (the projected weights' ones too, which torch leaves out as frozen). Sketches and
    staggered refreshes continue as in the uninterrupted run; basis="svd" saves its bases."""
    data = batches(kind)
    model, opt = make(kind, **kw)
    train(model, opt, data, kind)
    whole = snapshot(model, opt)
    model, opt = make(kind, **kw)
    train(model, opt, data[:SAVE_AT], kind)
    save(model, opt, tmp_path, flatten_optimizer_state_dict=flatten)
    model, opt = make(kind, **kw)
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(flatten_optimizer_state_dict=flatten))
    msd, osd = detached_copy((msd, osd))
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=tmp_path)
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd,
                   options=StateDictOptions(flatten_optimizer_state_dict=flatten))
    assert opt.global_step == SAVE_AT
    train(model, opt, data[SAVE_AT:], kind)
    assert_same(whole, snapshot(model, opt))


def test_state_dict_keys_and_group_step():
    model, opt = make()
    train(model, opt, batches()[:2])
    msd, osd = get_state_dict(model, opt)
    assert set(msd) == set(Net().state_dict())  # the original keys, no carriers
    assert "up.weight" in osd["state"] and "indices" in osd["state"]["up.weight"]
    assert all(g["global_step"] == 2 for g in osd["param_groups"])


def test_init_step_only_creates_states():
    model, opt = make(sketch_rows=4)
    sketches = {k: v.clone() for k, v in opt.refresh_control.sketches.items()}
    get_state_dict(model, opt)
    assert (opt.global_step, opt.micro_step) == (0, 0)
    assert all(float(s["step"]) == 0 for s in opt.state.values()) and len(opt.state) == 7
    assert all(torch.equal(v, opt.refresh_control.sketches[k]) for k, v in sketches.items())
    assert all(p.grad is None for g in opt.param_groups for p in g["params"])


def test_ignore_frozen_params_is_refused():
    model, opt = make()
    with pytest.raises(ValueError, match=r"ignore_frozen_params=True\) would leave out up.weight"):
        get_state_dict(model, opt, options=StateDictOptions(ignore_frozen_params=True))


def bitwise(model, opt):
    params = [p for g in opt.param_groups for p in g["params"]]
    return detached_copy((model.state_dict(), [dict(opt.state[p]) for p in params], opt.global_step,
                          [layer.selection() for layer in opt.refresh_control.layers]))


def assert_unchanged(before, model, opt):
    after = bitwise(model, opt)
    assert before[2] == after[2]
    for k in before[0]:
        assert torch.equal(before[0][k], after[0][k])
    for s, t in zip(before[1], after[1]):
        assert s.keys() == t.keys() and all(torch.equal(v, t[k]) for k, v in s.items())
    assert all(torch.equal(a, b) for a, b in zip(before[3], after[3]))


@pytest.mark.parametrize("problem", ["local", "shape", "indices", "steps"])
def test_bad_state_dict_is_refused_and_changes_nothing(problem):
    model, opt = make()
    train(model, opt, batches()[:2])
    msd, osd = detached_copy(get_state_dict(model, opt))
    before = bitwise(model, opt)
    if problem == "local":  # saved by 2 processes with refresh_sync="local"
        for g in osd["param_groups"]:
            g["selections_per_process"] = 2
        match = "saved by 2 processes with refresh_sync='local'"
    elif problem == "shape":
        osd["state"]["up.weight"]["exp_avg"] = torch.zeros(3, 3, dtype=torch.float64)
        match = "exp_avg must be a"
    elif problem == "indices":
        osd["state"]["down.weight"]["indices"] = torch.zeros(6, dtype=torch.int64)
        match = "indices must be 6 distinct"
    else:
        osd["param_groups"][0]["global_step"] = 7
        match = "disagree on the global step"
    with pytest.raises(ValueError, match=match):
        set_state_dict(model, opt, model_state_dict={}, optim_state_dict=osd)
    assert_unchanged(before, model, opt)


# -- slow: new processes, resharding, HSDP ------------------------------------------------------------------
@pytest.fixture(scope="module")
def fsdp_checkpoint(tmp_path_factory):
    """A checkpoint saved at SAVE_AT by 2 FSDP2 processes, and both processes' runs."""
    path = str(tmp_path_factory.mktemp("fsdp2"))
    return path, spawn(2, save_run, path)


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 4])
def test_fsdp_checkpoint_of_2_processes_loads_into(fsdp_checkpoint, world):
    """Saved by 2 FSDP2 processes; loaded in new processes (1, 2 or 4), it continues as the uninterrupted run."""
    path, saved = fsdp_checkpoint
    loaded = spawn(world, load_run, path, how="fsdp" if world > 1 else "plain")
    whole, at_save = saved[0]["whole"], saved[0]["saved"]
    for rank, r in enumerate(loaded):
        if world == 2:  # states are local shards: compared with the same process's at 2 only
            assert_same(saved[rank]["saved"], r["loaded"])
            assert_same(saved[rank]["whole"], r["final"])
        for k, v in at_save["weights"].items():
            assert torch.equal(v, r["loaded"]["weights"][k])  # the weights as saved, bit for bit
            assert torch.equal(v, r["export"][k])  # and in a plain single-process model
        assert_same(whole, r["final"], exact=False)
        for s, t in zip(saved[0]["whole_sels"][SAVE_AT:], r["sels"]):  # every refresh after the resume
            assert all(torch.equal(a, b) for a, b in zip(s, t))


@pytest.mark.slow
def test_local_refresh_checkpoint_refuses_another_world_size(tmp_path):
    spawn(2, save_run, str(tmp_path), how="ddp", refresh_sync="local")
    (r,) = spawn(1, load_run, str(tmp_path), how="plain", expect_error=True)
    assert "refresh_sync='local'" in r["error"] and "2 processes" in r["error"]


@pytest.mark.slow
def test_ddp_int8_resume_in_new_processes(tmp_path):
    saved = spawn(2, save_run, str(tmp_path), how="ddp", kind="int8")
    loaded = spawn(2, load_run, str(tmp_path), how="ddp", kind="int8")
    for r in loaded:
        assert_same(saved[0]["whole"], r["final"])


@pytest.mark.slow
def test_hsdp_matches_1d_fsdp_and_resumes_exactly(tmp_path):
    """A 2 x 2 mesh (replicate x shard) on 4 processes: the same training as 1-D FSDP2 on 4 (weights to 1e-12,
    identical selections), and its DCP checkpoint resumes bit for bit in new processes."""
    one_d = spawn(4, save_run, str(tmp_path / "1d"))
    hsdp = spawn(4, save_run, str(tmp_path / "hsdp"), mesh_shape=(2, 2))
    for a, b in zip(one_d, hsdp):
        assert (a["mesh_ndim"], b["mesh_ndim"]) == (1, 2)
        assert_same(a["whole"], b["whole"], exact=False)
        for s, t in zip(a["whole_sels"], b["whole_sels"]):
            assert all(torch.equal(x, y) for x, y in zip(s, t))
    loaded = spawn(4, load_run, str(tmp_path / "hsdp"), mesh_shape=(2, 2))
    for rank, r in enumerate(loaded):
        assert_same(hsdp[rank]["saved"], r["loaded"])
        assert_same(hsdp[rank]["whole"], r["final"])




def full_state_round_trips() -> dict:
    """FSDP2 with StateDictOptions(full_state_dict=True): whole tensors (every process, or process 0 only with
    broadcast_from_rank0), loaded back into fresh sharded objects."""
    out = {}
    data = batches()
    model, opt = make()
    net = shard(model, opt)
    train(net, opt, data)
    whole = snapshot(model, opt)
    for broadcast in (False, True):
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=broadcast)
        model, opt = make()
        net = shard(model, opt)
        train(net, opt, data[:SAVE_AT])
        msd, osd = detached_copy(get_state_dict(net, opt, options=StateDictOptions(full_state_dict=True)))
        if broadcast and dist.get_rank() != 0:
            msd, osd = {}, {}
        model, opt = make()
        net = shard(model, opt)
        # two calls: set_state_dict would take an empty model state dict for "optimizer only" on processes > 0
        set_model_state_dict(net, msd, options=opts)
        set_optimizer_state_dict(net, opt, osd, options=opts)
        train(net, opt, data[SAVE_AT:])
        out[broadcast] = dict(whole=whole, resumed=snapshot(model, opt))
    return out


@pytest.mark.slow
def test_fsdp_full_state_dict_round_trips():
    for r in spawn(2, full_state_round_trips):
        for run in r.values():
            assert_same(run["whole"], run["resumed"])


@pytest.mark.slow
def test_example_resumes_under_torchrun(tmp_path):
    """examples/dcp_resume.py: the resumed run prints the uninterrupted run's losses after the save, bit for bit."""
    import re
    import subprocess
    import sys

    def run(*extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.join(os.path.dirname(__file__), "..", "examples", "dcp_resume.py"), "--ckpt",
               str(tmp_path / "ckpt"), *extra]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert result.returncode == 0, result.stdout + result.stderr
        return dict(re.findall(r"^step\s+(\d+)\s+loss ([\d.]+)$", result.stdout, flags=re.M))

    whole, resumed = run(), run("--resume")
    assert sorted(resumed, key=int) == [str(t) for t in range(7, 13)]
    assert all(resumed[t] == whole[t] for t in resumed)


# -- quantised states under FSDP2 (slow) ---------------------------------------------------------------------------
class RightNet(nn.Module):
    """Quantised states sharded by rows only, reaching 4096 values on each of 4 processes: a right-projected layer
    ((2048, 8) states, Shard(0)) and an unprojected head whose plain AdamW states (24, 2048) are Shard(0) too."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(24, 2048)
        self.down = nn.Linear(2048, 24)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


def make_right(state_dtype: str = "int8"):
    torch.manual_seed(0)
    model = RightNet()
    return model, lrc.wrap_model(model, **{**OPT, "rank": 8, "state_dtype": state_dtype, "compile_step": False,
                                          "filter_fn": lambda m, fqn: fqn == "up"})


def whole_moments(net, opt) -> dict:
    """Every Adam moment as (storage kind, whole dequantised value), gathered from get_state_dict's DTensors."""
    from torch.distributed.tensor import DTensor
    out = {}
    for fqn, state in get_state_dict(net, opt)[1]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            v = state[key]
            local = v.to_local() if isinstance(v, DTensor) else v
            value = quant.dequantize(local)
            if isinstance(v, DTensor):
                value = DTensor.from_local(value, v.device_mesh, v.placements, shape=v.shape,
                                           stride=v.stride()).full_tensor()
            out[f"{fqn}.{key}"] = (quant.kind_of(local), value.clone())
    return out


def quantised_save(path: str, model_name: str = "right", state_dtype: str = "int8") -> dict:
    data = batches("int8")
    model, opt = make_right(state_dtype) if model_name == "right" else make("int8", state_dtype=state_dtype)
    net = shard(model, opt)
    train(net, opt, data, "int8")
    whole = snapshot(model, opt)
    model, opt = make_right(state_dtype) if model_name == "right" else make("int8", state_dtype=state_dtype)
    net = shard(model, opt)
    train(net, opt, data[:SAVE_AT], "int8")
    save(net, opt, path)
    return dict(moments=whole_moments(net, opt), whole=whole)


def quantised_load(path: str, model_name: str = "right", state_dtype: str = "int8") -> dict:
    world, _ = world_and_rank()
    model, opt = make_right(state_dtype) if model_name == "right" else make("int8", state_dtype=state_dtype)
    net = shard(model, opt) if world > 1 else model
    try:
        load(net, opt, path)
    except Exception:  # noqa: BLE001 - dcp.load wraps what it raises
        return dict(error=traceback.format_exc())
    out = dict(moments=whole_moments(net, opt))
    train(net, opt, batches("int8")[SAVE_AT:], "int8")
    out["final"] = snapshot(model, opt)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("state_dtype", ["int4", "fp8"])
def test_fsdp_quantised_resume_is_bit_identical(tmp_path, state_dtype):
    """int4 and fp8 states under FSDP2 (int8: the default run), resumed in new processes of the same number."""
    saved = spawn(2, quantised_save, str(tmp_path), "big", state_dtype)
    loaded = spawn(2, quantised_load, str(tmp_path), "big", state_dtype)
    for s, r in zip(saved, loaded):
        assert {kind for kind, _ in r["final"]["states"].values()} >= {state_dtype}
        assert_same(s["whole"], r["final"])


@pytest.mark.slow
def test_fsdp_int8_checkpoint_reshards_rows_exactly(tmp_path):
    """States sharded by rows (right-projected layers, plain parameters) load into 1 and 4 processes with the
    saved codes and scales (the whole moments bit for bit, still int8: every shard boundary is a block boundary),
    then train on, close to the uninterrupted 2-process run (another summation order, amplified by int8 codes)."""
    saved = spawn(2, quantised_save, str(tmp_path))[0]
    for world in (1, 4):
        for r in spawn(world, quantised_load, str(tmp_path)):
            assert r["moments"].keys() == saved["moments"].keys()
            for k, (kind, value) in saved["moments"].items():
                assert r["moments"][k][0] == kind and torch.equal(r["moments"][k][1], value), k
            assert {kind for kind, _ in r["moments"].values()} >= {"int8"}
            for k, v in saved["whole"]["weights"].items():
                torch.testing.assert_close(r["final"]["weights"][k], v, rtol=0, atol=1e-3)

