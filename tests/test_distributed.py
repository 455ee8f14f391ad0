"""Data-parallel training: DDP and FSDP2 on 2 CPU processes with gloo, against one process.

One spawn of 2 processes runs every multi-process scenario (importing torch and torchao dominates the cost);
each scenario returns plain tensors, and the tests below compare them across ranks and with a
single-process reference trained on the concatenated global batch.

Tolerance: everything is float64. A rank's gradient is the average of two half-batch gradients instead of
one full-batch sum, so the two runs differ only in summation order, ~1e-16 relative per gradient. Adam's
update m / (sqrt(v) + eps) is scale-free, so that relative error passes to the update unamplified (the
gradients here are ~1e-2, far above eps = 1e-8), and a few steps at lr 1e-2 leave weight differences of a
few 1e-16; 1e-12 is that with margin. Selections must be exactly equal: top-r of float64 scores that differ
by 1e-16 only changes at a near-tie, which the fixed data here do not have.
"""
from __future__ import annotations

import datetime
import os
import sys
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import lowrank_compile as lrc
from lowrank_compile import distributed as lrd
from lowrank_compile.distributed import RefreshReducer
from lowrank_compile.selection import left_scores, right_scores, sketched_left_scores, sketched_right_scores

WORLD = 2
STEPS = 5  # update_gap 2: refreshes at steps 1, 2 and 4
TOL = dict(rtol=0, atol=1e-12)


class Net(nn.Module):
    """up 24 -> 40 (right projection), a LayerNorm, down 40 -> 24 (left), head 24 -> head_rows (too small to
    project: plain AdamW)."""

    def __init__(self, head_rows: int = 3):
        super().__init__()
        self.up = nn.Linear(24, 40)
        self.norm = nn.LayerNorm(40)
        self.down = nn.Linear(40, 24, bias=False)
        self.head = nn.Linear(24, head_rows)

    def forward(self, x):
        return self.head(F.gelu(self.down(F.gelu(self.norm(self.up(x))))))


def make_net() -> Net:
    torch.manual_seed(0)
    return Net().double()


def global_batches(n: int = STEPS, rows: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n global batches of `rows` sequences of 3 tokens; rank k trains on rows [k*rows/2, (k+1)*rows/2)."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(rows, 3, 24, generator=g, dtype=torch.float64),
             torch.randn(rows, 3, 3, generator=g, dtype=torch.float64)) for _ in range(n)]


def shard(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t.chunk(WORLD)[rank]


def loss_fn(model, x, y) -> torch.Tensor:
    return (model(x) - y).square().mean()


OPT = dict(rank=6, lr=1e-2, update_gap=2, weight_decay=0.1)


def selections(opt) -> list[torch.Tensor]:
    return [layer.selection().clone() for layer in opt.refresh_control.layers]


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}


def reference(accumulate: int = 1, **kw) -> dict:
    """One process, the global batches (split into `accumulate` micro-batches as the ranks see them)."""
    model = make_net()
    opt = lrc.wrap_model(model, **{**OPT, **kw}, accumulate=accumulate, refresh_sync="local")
    sels = []
    for x, y in global_batches():
        for xm, ym in zip(split_micro(x, accumulate), split_micro(y, accumulate)):
            (loss_fn(model, xm, ym) / accumulate).backward()
            opt.step()
            opt.zero_grad()
        sels.append(selections(opt))
    return dict(weights=weights(model), sels=sels)


def split_micro(t: torch.Tensor, k: int) -> list[torch.Tensor]:
    """Micro-batch j of a global batch: rank r's share of it is shard(split_micro(t, k)[j], r)."""
    return list(t.chunk(k))


def train_ddp(rank: int, *, accumulate: int = 1, no_sync: bool = False, refresh_sync=None, counter=None,
              dtype=torch.float64, compile: bool = False, **kw) -> dict:
    model = make_net().to(dtype)
    opt = lrc.wrap_model(model, **{**OPT, **kw}, accumulate=accumulate)
    hook = dict(comm_hook=lrd.counting_allreduce_hook, comm_hook_state=counter) if counter is not None else {}
    ddp = lrd.prepare_ddp(model, opt, refresh_sync=refresh_sync, **hook)
    net = torch.compile(ddp, backend="aot_eager") if compile else ddp  # dynamo + AOT autograd; no codegen time
    sels = []
    for x, y in global_batches():
        x, y = x.to(dtype), y.to(dtype)
        for j, (xm, ym) in enumerate(zip(split_micro(x, accumulate), split_micro(y, accumulate))):
            last = j == accumulate - 1
            if no_sync and not last:
                with ddp.no_sync():
                    (loss_fn(net, shard(xm, rank), shard(ym, rank)) / accumulate).backward()
            else:
                (loss_fn(net, shard(xm, rank), shard(ym, rank)) / accumulate).backward()
            opt.step()
            opt.zero_grad()
        sels.append(selections(opt))
    reducer = opt.refresh_control.score_reducer
    return dict(weights=weights(model), sels=sels, reducer_bytes=reducer.bytes if reducer else 0,
                ddp_ignores=sorted(ddp.parameters_to_ignore),
                carriers=sum(layer.lowrank_grad.numel() for layer in opt.refresh_control.layers),
                plain=sum(p.numel() for g in opt.param_groups if not g["lowrank"] for p in g["params"]),
                full=sum(p.numel() for p in model.state_dict().values()))


# -- scenarios (run in each of the 2 processes) ------------------------------------------------------------
SCENARIOS = {}


def scenario(fn):
    SCENARIOS[fn.__name__] = fn
    return fn


@scenario
def ddp_exact(rank):
    counter = lrd.CommCounter()
    out = train_ddp(rank, counter=counter)
    return dict(out, buckets=list(counter.buckets), bucket_bytes=counter.bytes, ref=reference())


@scenario
def ddp_auto(rank):
    """No refresh_sync anywhere: wrap_model sees 2 processes and installs the default reducer itself."""
    model = make_net()
    opt = lrc.wrap_model(model, **OPT)
    reducer = opt.refresh_control.score_reducer
    return dict(mode=None if reducer is None else reducer.mode, default=lrd.DEFAULT_REFRESH_SYNC)


@scenario
def ddp_cheap(rank):
    return train_ddp(rank, refresh_sync="cheap")


@scenario
def ddp_local(rank):
    """No agreement: each process selects from its own gradient (what consistent refreshes prevent)."""
    return train_ddp(rank, refresh_sync="local")


@scenario
def ddp_random_sketch(rank):
    kw = dict(basis="random", sketch_rows=8)
    return dict(train_ddp(rank, **kw), ref=reference(**kw))


@scenario
def ddp_sketch_cheap(rank):
    return train_ddp(rank, refresh_sync="cheap", sketch_rows=8, norm="l2")


@scenario
def ddp_svd(rank):
    kw = dict(basis="svd", state_policy="keep")
    return dict(train_ddp(rank, **kw), ref=reference(**kw))


@scenario
def ddp_bf16(rank):
    """bf16 weights: stochastic rounding draws the same bits on every rank (keyed by seed, parameter, step)."""
    return train_ddp(rank, dtype=torch.bfloat16, refresh_sync="cheap")


@scenario
def ddp_fused(rank):
    return dict(train_ddp(rank, fused=True), ref=reference())


@scenario
def ddp_accumulate(rank):
    """accumulate=2 with the first micro-batch under no_sync, fused and not; and fused syncing every micro-batch."""
    return dict(no_sync=train_ddp(rank, accumulate=2, no_sync=True),
                fused_no_sync=train_ddp(rank, accumulate=2, no_sync=True, fused=True),
                fused_sync=train_ddp(rank, accumulate=2, fused=True),
                ref=reference(accumulate=2))


@scenario
def ddp_compiled(rank):
    """torch.compile(ddp): the refresh all-reduce is traced into the layers' graphs (no graph break there).

    backend="aot_eager" keeps this scenario to seconds; the default inductor backend gave the same selections
    and weights as eager DDP when run by hand (docs/DISTRIBUTED.md).
    """
    from torch._dynamo.utils import counters

    counters.clear()
    out = train_ddp(rank, compile=True)
    return dict(out, graph_breaks=[str(k) for k in counters["graph_break"]], ref=reference())


@scenario
def comm_bytes(rank):
    """Bytes DDP all-reduces per step: torch AdamW on the plain model vs the wrapped model."""
    counters = {}
    for kind in ("adamw", "lowrank"):
        model = make_net()
        counter = lrd.CommCounter()
        if kind == "adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
            ddp = nn.parallel.DistributedDataParallel(model)
            ddp.register_comm_hook(counter, lrd.counting_allreduce_hook)
        else:
            opt = lrc.wrap_model(model, **OPT)
            ddp = lrd.prepare_ddp(model, opt, comm_hook=lrd.counting_allreduce_hook, comm_hook_state=counter)
        for x, y in global_batches():
            loss_fn(ddp, shard(x, rank), shard(y, rank)).backward()
            opt.step()
            opt.zero_grad()
        counters[kind] = counter.bytes / STEPS
    return counters


@scenario
def fsdp(rank):
    out = {}
    for accumulate in (1, 2):
        model = make_net()
        opt = lrc.wrap_model(model, **OPT, accumulate=accumulate)
        lrd.prepare_fsdp(model, opt, units=[model.up, model.down])
        placements = {n: p.placements[0].dim for n, p in model.named_parameters()}  # all Shard(dim)
        local_shapes = {n: tuple(p.to_local().shape) for n, p in model.named_parameters()}
        sels = []
        for x, y in global_batches():
            for xm, ym in zip(split_micro(x, accumulate), split_micro(y, accumulate)):
                (loss_fn(model, shard(xm, rank), shard(ym, rank)) / accumulate).backward()
                opt.step()
                opt.zero_grad()
            sels.append(selections(opt))
        out[accumulate] = dict(weights=weights(model), sels=sels, placements=placements, local_shapes=local_shapes,
                               state_shapes=[tuple(s["exp_avg"].shape) for s in opt.state.values()],
                               ref=reference(accumulate=accumulate))
    return out


@scenario
def fsdp_fused_refused(rank):
    model = make_net()
    opt = lrc.wrap_model(model, **OPT, fused=True)
    try:
        lrd.prepare_fsdp(model, opt)
    except ValueError as e:
        return dict(error=str(e))
    return dict(error=None)


@scenario
def fsdp_grad_scaler_refused(rank):
    """GradScaler under FSDP2: refused before the step changes anything (weights and selections as they were)."""
    model = make_net()
    opt = lrc.wrap_model(model, **OPT)
    lrd.prepare_fsdp(model, opt, units=[model.up, model.down])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    x, y = global_batches()[0]
    scaler.scale(loss_fn(model, shard(x, rank), shard(y, rank))).backward()
    before = {n: p.to_local().clone() for n, p in model.named_parameters()}
    try:
        scaler.step(opt)
    except RuntimeError as e:
        same = all(torch.equal(p.to_local(), before[n]) for n, p in model.named_parameters())
        return dict(error=str(e), same=same, step=opt.global_step)
    return dict(error=None, same=None, step=opt.global_step)


@scenario
def fused_without_prepare_ddp(rank):
    """Last: fused=True under a DDP built by hand must refuse (its backward raises on both ranks)."""
    model = make_net()
    _opt = lrc.wrap_model(model, **OPT, fused=True)  # its guard hooks sit on the model's parameters
    ddp = nn.parallel.DistributedDataParallel(model)
    x, y = global_batches(1)[0]
    try:
        loss_fn(ddp, shard(x, rank), shard(y, rank)).backward()
    except RuntimeError as e:
        return dict(error=str(e))
    return dict(error=None)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    for name, fn in SCENARIOS.items():
        start = time.perf_counter()
        try:
            results[name] = fn(rank)
        except Exception:
            results[name] = dict(exception=traceback.format_exc())
        results[name + ".seconds"] = time.perf_counter() - start
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs():
    """Both ranks' results of every scenario: {name: (rank 0's, rank 1's)}."""
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(_worker, args=(os.path.join(tmp, "store"), tmp), nprocs=WORLD, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + 110
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail("the 2-process run did not finish in 110 s")
        per_rank = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]
    print({k: round(v, 2) for k, v in per_rank[0].items() if k.endswith(".seconds")}, file=sys.stderr)
    return {name: tuple(r[name] for r in per_rank) for name in SCENARIOS}


def get(runs, name):
    r0, r1 = runs[name]
    for r in (r0, r1):
        if isinstance(r, dict) and "exception" in r:
            pytest.fail(f"scenario {name} raised:\n{r['exception']}")
    return r0, r1


def assert_same_across_ranks(r0, r1):
    """Bit-identical weights and selections on both processes."""
    for k in r0["weights"]:
        assert torch.equal(r0["weights"][k], r1["weights"][k]), f"{k} differs between ranks"
    for step, (s0, s1) in enumerate(zip(r0["sels"], r1["sels"]), start=1):
        for a, b in zip(s0, s1):
            assert torch.equal(a, b), f"selection after step {step} differs between ranks"


def assert_matches_reference(r, ref, tol=TOL):
    for step, (s, sref) in enumerate(zip(r["sels"], ref["sels"]), start=1):
        for a, b in zip(s, sref):
            if a.dtype == torch.int64:
                assert torch.equal(a, b), f"step {step}: selection {a.tolist()} != single process {b.tolist()}"
            else:  # svd: a basis
                torch.testing.assert_close(a, b, **tol)
    for k, w in ref["weights"].items():
        torch.testing.assert_close(r["weights"][k], w, **tol, msg=lambda m: f"{k}: {m}")


# -- tests -----------------------------------------------------------------------------------------------------
def test_ddp_exact_matches_single_process(runs):
    r0, r1 = get(runs, "ddp_exact")
    assert_same_across_ranks(r0, r1)
    assert_matches_reference(r0, r0["ref"])
    # 3 refreshes x (up: (40, 24) similarity G D + down: (24, 40) D^T G) float64, in blocks
    assert r0["reducer_bytes"] == 3 * (40 * 24 + 24 * 40) * 8


def test_ddp_reduces_rank_r_gradients(runs):
    """DDP's buckets hold the carriers and plain parameters: (out, r) / (r, in), never a full weight."""
    r0, _ = get(runs, "ddp_exact")
    per_step = sum(r0["buckets"]) // STEPS
    assert per_step == r0["carriers"] + r0["plain"]
    # up: (40, 6) right; down: (6, 40) left; the rest plain: up.bias 40, norm 80, head 72 + 3
    assert r0["carriers"] == 40 * 6 + 6 * 40 and r0["plain"] == 40 + 80 + 72 + 3
    assert per_step < r0["full"]
    assert r0["bucket_bytes"] == 8 * sum(r0["buckets"])  # float64
    assert r0["ddp_ignores"] == ["down.lowrank_idx", "up.lowrank_idx"]  # no per-step broadcast of the indices


def test_comm_ratio_vs_ddp_adamw(runs):
    r0, r1 = get(runs, "comm_bytes")
    assert r0 == r1
    full = 24 * 40 + 40 + 80 + 40 * 24 + 24 * 3 + 3
    assert r0["adamw"] == 8 * full
    assert r0["lowrank"] == 8 * (40 * 6 + 6 * 40 + 40 + 80 + 24 * 3 + 3)
    assert r0["lowrank"] / r0["adamw"] < 0.35


def test_wrap_model_installs_default_reducer_in_multiprocess_job(runs):
    r0, r1 = get(runs, "ddp_auto")
    assert r0 == r1 == dict(mode="exact", default="exact")


def test_cheap_mode_is_consistent_across_ranks(runs):
    r0, r1 = get(runs, "ddp_cheap")
    assert_same_across_ranks(r0, r1)
    assert r0["reducer_bytes"] == 3 * 2 * 24 * 8  # 3 refreshes x 2 layers x n=24 float64 scores


def test_local_selection_diverges_without_agreement(runs):
    """The failure consistent refreshes fix: each rank picks its own columns and the replicas drift apart."""
    r0, r1 = get(runs, "ddp_local")
    assert any(not torch.equal(a, b) for s0, s1 in zip(r0["sels"], r1["sels"]) for a, b in zip(s0, s1))
    assert any(not torch.equal(r0["weights"][k], r1["weights"][k]) for k in r0["weights"])


def test_random_basis_with_sketch_is_consistent_and_exact(runs):
    r0, r1 = get(runs, "ddp_random_sketch")
    assert_same_across_ranks(r0, r1)
    assert_matches_reference(r0, r0["ref"])


def test_bf16_with_stochastic_rounding_is_consistent(runs):
    r0, r1 = get(runs, "ddp_bf16")
    assert r0["weights"]["up.weight"].dtype == torch.bfloat16
    assert_same_across_ranks(r0, r1)


def test_sketch_cheap_is_consistent(runs):
    r0, r1 = get(runs, "ddp_sketch_cheap")
    assert_same_across_ranks(r0, r1)


def test_svd_basis_is_consistent(runs):
    r0, r1 = get(runs, "ddp_svd")
    assert_same_across_ranks(r0, r1)
    assert_matches_reference(r0, r0["ref"], tol=dict(rtol=0, atol=1e-10))


def test_compiled_ddp_matches_single_process(runs):
    r0, r1 = get(runs, "ddp_compiled")
    assert_same_across_ranks(r0, r1)
    assert_matches_reference(r0, r0["ref"])
    assert not [b for b in r0["graph_breaks"] if "all_reduce" in b or "async_op" in b or "lowrank" in b]


def test_fused_under_prepare_ddp_matches_single_process(runs):
    r0, r1 = get(runs, "ddp_fused")
    assert_same_across_ranks(r0, r1)
    assert_matches_reference(r0, r0["ref"])


@pytest.mark.parametrize("variant", ["no_sync", "fused_no_sync", "fused_sync"])
def test_accumulate_under_ddp(runs, variant):
    r0, r1 = get(runs, "ddp_accumulate")
    assert_same_across_ranks(r0[variant], r1[variant])
    assert_matches_reference(r0[variant], r0["ref"])


def test_fused_without_prepare_ddp_is_refused(runs):
    r0, r1 = get(runs, "fused_without_prepare_ddp")
    for r in (r0, r1):
        assert r["error"] is not None and "prepare_ddp" in r["error"] and "fused=False" in r["error"]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_fsdp2_matches_single_process(runs, accumulate):
    r0, r1 = get(runs, "fsdp")
    a, b = r0[accumulate], r1[accumulate]
    assert_same_across_ranks(a, b)
    assert_matches_reference(a, a["ref"])
    # left-projected down: weight and carrier sharded by columns, so its update D_r u stays local
    assert a["placements"]["down.weight"] == a["placements"]["down.lowrank_grad"] == 1
    assert a["placements"]["up.weight"] == a["placements"]["up.lowrank_grad"] == 0
    assert a["local_shapes"]["down.lowrank_grad"] == (6, 20) and a["local_shapes"]["up.lowrank_grad"] == (20, 6)
    assert (20, 6) in a["state_shapes"] and (6, 20) in a["state_shapes"]  # states of the local shards


def test_fsdp2_refuses_a_grad_scaler(runs):
    for r in get(runs, "fsdp_grad_scaler_refused"):
        assert r["error"] is not None and "prepare_fsdp" in r["error"] and r["same"] and r["step"] == 0


def test_fsdp2_refuses_fused(runs):
    r0, _ = get(runs, "fsdp_fused_refused")
    assert r0["error"] is not None and "fused=False" in r0["error"]


# -- single process ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("right", [True, False])
@pytest.mark.parametrize("mode", ["exact", "cheap"])
@pytest.mark.parametrize("sketch", [False, True])
def test_reducer_without_process_group_equals_local_scores(right, mode, sketch):
    """With one process the agreed scores are the process's own (blockwise exact included, odd block size)."""
    g = torch.Generator().manual_seed(0)
    gy, x = torch.randn(30, 40, generator=g, dtype=torch.float64), torch.randn(30, 24, generator=g, dtype=torch.float64)
    omega = torch.randn(8, 40 if right else 24, generator=g, dtype=torch.float64) if sketch else None
    reducer = RefreshReducer(mode, block=7)
    for p in (1, 2):
        if right:
            got, want = reducer.right_scores(gy, x, p, omega), (
                right_scores(gy, x, p) if omega is None else sketched_right_scores(gy, x, omega, p))
        else:
            got, want = reducer.left_scores(gy, x, p, omega), (
                left_scores(gy, x, p) if omega is None else sketched_left_scores(gy, x, omega, p))
        torch.testing.assert_close(got, want, rtol=1e-13, atol=0)
    assert reducer.bytes == 0  # nothing was sent


def test_refresh_sync_is_validated():
    model = make_net()
    with pytest.raises(ValueError, match="refresh_sync"):
        lrc.wrap_model(model, rank=6, refresh_sync="global")
    assert not lrc.is_wrapped(model)


def test_single_process_has_no_reducer_by_default():
    opt = lrc.wrap_model(make_net(), rank=6)
    assert opt.refresh_control.score_reducer is None
    assert lrd.sync_refreshes(opt, "cheap").mode == "cheap"
    assert lrd.sync_refreshes(opt, "local") is None and opt.refresh_control.score_reducer is None
