"""Quantised Adam states (torchao subclasses), their fallbacks, stochastic rounding of bf16 weights, quiet import.

The round-trip bounds come from torchao's source (torchao/optim/quant_utils.py, subclass_*.py, 0.18):
- int8 / int4: each block of the flattened state (256 / 128 elements) is divided by its absmax s
  (scale_tensor), and each value y = x / s in [-1, 1] gets the code of the nearest entry of a fixed map
  (quantize_8bit_with_qmap / quantize_4bit_with_qmap: binary search, then round to the nearer neighbour).
  So |x - deq(q(x))| = s * min_k |y - qmap[k]|: at most s * 0.00703 for signed int8 (half the widest gap of
  the dynamic-tree map, 0.99297..1), s * 0.003516 unsigned int8, s * 0.1125 signed int4, s * 0.0625
  unsigned int4 (its linear map 1/16..1 has no zero).
- fp8: scale s = absmax / 448, codes = (x / s) cast to float8_e4m3fn (round to nearest even, 3 mantissa
  bits): |x - deq| <= s * max(2^-4 |x / s|, 2^-10) (half an ulp: relative 2^-4, subnormal step 2^-9).
"""
from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch
from torch import nn

import lowrank_compile as lrc
from lowrank_compile import _torchao, quant
from lowrank_compile.update import match_slots, matched


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny ops are far slower on 2 busy threads


def _blocks_of_many_scales(numel: int, block: int, signed: bool) -> torch.Tensor:
    """Blocks of randn scaled from 1e-8 to 1e3, one all-zero block, one with a single non-zero value."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(numel // block, block, generator=g, dtype=torch.float64)
    x *= torch.logspace(-8, 3, numel // block, dtype=torch.float64)[:, None]
    x[1] = 0
    x[2] = 0
    x[2, 5] = 3.0
    if not signed:
        x = x.abs()
    return x.float().reshape(-1)


@pytest.mark.parametrize("kind,signed,block_bound", [("int8", True, 0.00703), ("int8", False, 0.003516),
                                                     ("int4", True, 0.1125), ("int4", False, 0.0625)])
def test_int_codes_round_to_the_nearest_map_value(kind, signed, block_bound):
    block = quant.BLOCK_SIZE[kind]
    x = _blocks_of_many_scales(64 * block, block, signed)
    state = quant.new_state((64, block), kind, signed=signed, device="cpu")
    assert quant.is_quantized(state) and quant.kind_of(state) == kind
    state.copy_(x.view(64, block))
    deq = quant.dequantize(state).double().reshape(64, block)

    x64 = x.double().reshape(64, block)
    s = x64.abs().amax(1, keepdim=True).clamp_min(1e-12)  # scale_tensor: absmax per block, clip 1e-12
    y = x64 / s
    nearest = (y[..., None] - state.qmap.double()).abs().amin(-1)  # distance to the closest code value
    err = (deq - x64).abs()
    slack = 4e-7 * s  # fp32 rounding of x / s and of qmap * s
    assert (err <= s * nearest + slack).all(), (err - s * nearest).max()
    qmap = state.qmap.double()
    worst = max(qmap.diff().max().item() / 2, qmap[0].item() - (-1.0 if signed else 0.0), 1.0 - qmap[-1].item())
    assert worst == pytest.approx(block_bound, rel=1e-3)  # the per-block bound of the docstring, from the map
    assert (err <= s * worst + slack).all()
    assert err.max() > 0.1 * block_bound * s.min()  # not trivially exact
    assert deq[1].abs().max() <= 1e-12  # an all-zero block: its scale is clipped to 1e-12 (int4's unsigned map
    # has no zero, so it comes back as 1e-12 / 16)


def test_fp8_codes_round_within_half_an_e4m3_ulp():
    x = _blocks_of_many_scales(64 * 256, 256, True)
    state = quant.new_state((64, 256), "fp8", signed=True, device="cpu")
    assert quant.kind_of(state) == "fp8" and state.codes.dtype == torch.float8_e4m3fn
    state.copy_(x.view(64, 256))
    deq = quant.dequantize(state).double()
    x64 = x.double().reshape(64, 256)
    s = x64.abs().amax(1, keepdim=True).clamp_min(1e-12) / 448.0
    y = x64 / s
    bound = s * torch.maximum(y.abs() * 2.0 ** -4, torch.full_like(y, 2.0 ** -10))
    assert ((deq - x64).abs() <= bound * (1 + 1e-5) + 1e-6 * x64.abs()).all()


def test_fallback_rules_follow_torchao():
    assert quant.storage_kind((64, 64), "int8") == "int8"  # 4096 elements, 16 blocks
    assert quant.storage_kind((64,), "int8") == "fp32"  # fewer than 4096
    assert quant.storage_kind((4097,), "int8") == "fp32"  # not a multiple of 256
    assert quant.storage_kind((33, 128), "int4") == "int4"  # 4224 = 33 blocks of 128
    assert quant.storage_kind((33, 128), "int8") == "fp32"  # not a multiple of 256
    assert quant.storage_kind((100,), "bf16") == "bf16"
    assert "4096" in quant.fallback_reason((64,), "fp8")
    assert "block size 256" in quant.fallback_reason((4097,), "int8")
    small = quant.new_state((64,), "int8", signed=True, device="cpu")
    assert type(small) is torch.Tensor and small.dtype == torch.float32
    for kind in ("int8", "int4", "fp8"):
        t = quant.new_state((64, 64), kind, signed=False, device="cpu")
        assert quant.kind_of(t) == kind and t.dtype == torch.float32  # fp32 appearance dtype
        assert torch.equal(quant.dequantize(t), torch.zeros(64, 64))
        t.copy_(torch.rand(64, 64))
        quant.zero_(t)
        assert torch.equal(quant.dequantize(t), torch.zeros(64, 64))


def _model(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    # 0: 64 -> 256 right-projected, state (256, 16); 2: 256 -> 64 left, state (16, 256); 3: plain AdamW (filtered)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64), nn.Linear(64, 128)).to(dtype)


def _train(model, steps: int, **kw) -> list[torch.Tensor]:
    opt = lrc.wrap_model(model, rank=16, update_gap=5, filter_fn=lambda m, fqn: fqn != "3", **kw)
    dtype = model[0].weight.dtype
    for t in range(steps):
        g = torch.Generator().manual_seed(t)
        x, y = torch.randn(32, 64, generator=g), torch.randn(32, 128, generator=g)
        (model(x.to(dtype)).float() - y).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return [v.detach().float().clone() for v in model.state_dict().values()], opt


def test_wrap_stores_and_logs_states_as_asked(caplog):
    with caplog.at_level(logging.INFO, logger="lowrank_compile.quant"):
        _, opt = _train(_model(), 1, state_dtype="int8")
    kinds = {name: quant.kind_of(opt.state[p]["exp_avg"]) for p, name in opt.param_names.items() if p in opt.state}
    assert kinds == {"0.weight": "int8", "2.weight": "int8", "3.weight": "int8", "0.bias": "fp32",
                     "2.bias": "fp32", "3.bias": "fp32"}
    projected = next(iter(opt.layers))
    assert opt.state[projected]["exp_avg_sq"].signed is False  # torchao's unsigned map for the second moment
    assert opt.state[projected]["exp_avg"].signed is True
    assert "3 of 6 parameters' states quantised" in caplog.text
    assert "0.bias (256 elements < 4096)" in caplog.text


@pytest.mark.parametrize("state_dtype,tol", [("bf16", 0.05), ("int8", 0.25), ("fp8", 0.35), ("int4", 0.7)])
def test_quantised_states_track_fp32(state_dtype, tol):
    """30 steps at lr 1e-2: each parameter's distance to the fp32-state run, relative to how far it moved.

    Measured (torch 2.13 CPU, torchao 0.18): worst parameter bf16 0.010, int8 0.14, fp8 0.22, int4 0.49.
    """
    w0 = [v.clone() for v in _model().state_dict().values()]
    ref, _ = _train(_model(), 30, lr=1e-2)
    got, _ = _train(_model(), 30, lr=1e-2, state_dtype=state_dtype)
    for a, b, c in zip(got, ref, w0):
        assert (a - b).norm() <= tol * (b - c).norm()


@pytest.mark.parametrize("policy", ["match", "keep", "reset"])
def test_every_state_policy_runs_on_quantised_states(policy):
    ref, _ = _train(_model(), 7, lr=1e-2, state_policy=policy)
    got, opt = _train(_model(), 7, lr=1e-2, state_policy=policy, state_dtype="int8")
    assert all(torch.isfinite(w).all() for w in got)
    assert (got[0] - ref[0]).norm() < 0.3 * ref[0].norm()


@pytest.mark.parametrize("fused", [False, True])
def test_match_on_quantised_states_moves_the_decoded_states_in_the_update(fused):
    """On a refresh step, "match" on int8 states runs inside the Adam update: the decoded states of the previous
    selection move to their new slots (new slots start at 0), the moments update, and each state is encoded once.
    Checked bit for bit against that computation done by hand (eager, compile_step=False), for a right- and a
    left-projected layer."""
    model = _model()
    opt = lrc.wrap_model(model, rank=16, update_gap=1, state_dtype="int8", state_policy="match", fused=fused,
                         compile_step=False, filter_fn=lambda m, fqn: fqn != "3", lr=1e-2)
    layers = list(opt.layers.items())
    expected = {}
    for t in range(3):
        gen = torch.Generator().manual_seed(t)
        x, y = torch.randn(32, 64, generator=gen), torch.randn(32, 128, generator=gen)
        before = {p: (quant.dequantize(opt.state[p]["exp_avg"]).clone(),
                      quant.dequantize(opt.state[p]["exp_avg_sq"]).clone(),
                      opt.state[p]["indices"].clone()) for p, _ in layers if p in opt.state}
        if fused:  # the update runs in backward: capture each rank-r gradient as it completes
            grads = {}
            hooks = [layer.lowrank_grad.register_hook(lambda g, p=p: grads.__setitem__(p, g.clone()))
                     for p, layer in layers]
        (model(x) - y).square().mean().backward()
        if not fused:
            grads = {p: layer.lowrank_grad.grad.clone() for p, layer in layers}
        else:
            for h in hooks:
                h.remove()
        for p, layer in layers:
            if p not in before:
                continue
            m, v, old = before[p]
            src, kept = match_slots(old, layer.selection())
            assert 0 < int(kept.sum()) < 16 or t == 0  # the selection did move
            dim = 1 if layer.lowrank_spec.right else 0
            m, v = matched(m, src, kept, dim), matched(v, src, kept, dim)
            g = grads[p]
            m.mul_(0.9).add_(g, alpha=0.1)
            v.mul_(0.999).addcmul_(g, g, value=0.001)
            expected[p] = []
            for value, signed in ((m, True), (v, False)):
                q = quant.new_state(value.shape, "int8", signed=signed, device="cpu")
                q.copy_(value)
                expected[p].append(quant.dequantize(q))
        opt.step()
        opt.zero_grad()
        for p, (m, v) in expected.items():
            assert torch.equal(quant.dequantize(opt.state[p]["exp_avg"]), m)
            assert torch.equal(quant.dequantize(opt.state[p]["exp_avg_sq"]), v)
        expected.clear()
    assert not opt._pending_match


def test_rounding_key_mixes_seed_index_and_step():
    """Every write-back's key differs by seed, parameter index and step, and is the same in every process."""
    keys = {quant.rounding_key(seed, index, step) for seed in (0, 1) for index in range(4) for step in range(1, 5)}
    assert len(keys) == 2 * 4 * 4
    assert quant.rounding_key(0, 3, 5) == 0x11F51534581E267C  # pinned: a change would alter resumed runs' bits
    base = quant.counter_base(7, 2)
    assert base.dtype == torch.int64 and base.ndim == 0 and int(base) == quant.rounding_key(7, 2, 0) & 0xFFFFFFFF


def test_counter_based_rounding_is_unbiased_keyed_and_chunk_independent():
    """The compiled write-back's rounding: bits from a hash of (key, element index), no generator."""
    x = torch.full((1 << 16,), 1.0 + 2.0 ** -10)
    key = quant.counter_key(quant.counter_base(0, 3), torch.tensor(5.0))
    y = quant.round_to_bf16(x, key).float()
    assert set(y.unique().tolist()) == {1.0, 1.0 + 2.0 ** -7}
    assert abs(y.mean().item() - (1.0 + 2.0 ** -10)) < 4 * 2.0 ** -7 * 0.5 / 256  # 4 sigma of the mean
    assert torch.equal(quant.round_to_bf16(x, quant.counter_key(quant.counter_base(0, 3), torch.tensor(5))).float(), y)
    for other in (quant.counter_key(quant.counter_base(0, 3), torch.tensor(6.0)),
                  quant.counter_key(quant.counter_base(0, 4), torch.tensor(5.0)),
                  quant.counter_key(quant.counter_base(1, 3), torch.tensor(5.0))):
        assert not torch.equal(quant.round_to_bf16(x, other).float(), y)
    assert torch.equal(quant.round_to_bf16(x), x.bfloat16())  # no key: round to nearest
    assert int(key) == 3188030247  # pinned, as the first 32 decisions: checkpoints resume with these bits
    assert "".join("1" if v > 1 else "0" for v in y[:32].tolist()) == "00100100110100011000000001000001"
    neg = quant.round_to_bf16(-x, key).float()
    assert torch.equal(neg, -y)  # symmetric: the magnitude is rounded
    halves = torch.cat([quant.round_to_bf16(x[:1000], key), quant.round_to_bf16(x[1000:], key, offset=1000)])
    assert torch.equal(halves.float(), y)  # chunked with offsets: the same bits
    compiled = torch.compile(quant.round_to_bf16, fullgraph=True)
    assert torch.equal(compiled(x, key).float(), y)  # the same bits inside a graph


def test_bf16_weights_keep_small_updates_with_stochastic_rounding():
    """lr 2e-4 on bf16 weights from the same start as an fp32 run: how much of the fp32 run's movement each
    weight makes, <w - w0, d> / <d, d> with d = w_fp32 - w0. Round-to-nearest loses most updates (measured
    0.29 to 0.61 on the three weights); stochastic rounding keeps them on average (0.998 to 1.03)."""
    start = _model(torch.bfloat16)
    w0 = [v.float() for v in start.state_dict().values()]
    ref, _ = _train(_model(torch.bfloat16).float(), 40, lr=2e-4)
    sr, _ = _train(_model(torch.bfloat16), 40, lr=2e-4)
    rtn, _ = _train(_model(torch.bfloat16), 40, lr=2e-4, stochastic_round=False)
    weights = [0, 2, 4]  # 0.weight, 2.weight, 3.weight (projected right, projected left, plain)
    for i in weights:
        d = ref[i] - w0[i]
        progress_sr = ((sr[i] - w0[i]) * d).sum() / d.square().sum()
        progress_rtn = ((rtn[i] - w0[i]) * d).sum() / d.square().sum()
        assert 0.9 < progress_sr < 1.1, (i, progress_sr)
        assert progress_rtn < 0.75, (i, progress_rtn)


def test_eager_bf16_write_back_rounds_with_the_counter_key_of_seed_index_and_step():
    """An eager update of a bf16 weight rounds with the counter hash of (seed, parameter index, step), the rounding
    compiled updates use: checked by hand on the first step of a plain bf16 weight (Adam's first direction
    computed as update.moments_direction does, then quant.round_to_bf16 keyed by counter_key(base, 1))."""
    from lowrank_compile.update import moments_direction

    model = _model(torch.bfloat16)
    p = model[3].weight
    w0 = p.detach().float().clone()
    opt = lrc.wrap_model(model, rank=16, update_gap=5, filter_fn=lambda m, fqn: fqn != "3", lr=1e-2, seed=3,
                         compile_step=False)
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    model(x.bfloat16()).float().square().mean().backward()
    g = p.grad.float().clone()
    opt.step()
    u = moments_direction(g, torch.zeros_like(g), torch.zeros_like(g), torch.tensor(1.0), 0.9, 0.999, 1e-8)
    index = next(i for i, q in enumerate(q for group in opt.param_groups for q in group["params"]) if q is p)
    key = quant.counter_key(quant.counter_base(3, index), torch.tensor(1.0))
    expected = quant.round_to_bf16(w0.sub_(u.mul_(1e-2)), key)
    assert torch.equal(p.detach(), expected)
    assert not torch.equal(p.detach(), quant.round_to_bf16(w0))  # stochastic: not the nearest everywhere


@pytest.mark.parametrize("state_dtype", ["fp32", "bf16"])  # quantised states: their moments compile by default too
def test_eager_and_compiled_rounding_give_the_same_bits(state_dtype):
    """compile_step=False hashes the rounding bits eagerly, the default runs the same hash compiled
    (torch.compile of quant.round_to_bf16): bf16 weights come out bit for bit equal after several steps, the
    compiled hash fed by a step counter that lives in a tensor (one graph for every step)."""
    from lowrank_compile.compile import compiled

    eager, _ = _train(_model(torch.bfloat16), 4, lr=1e-2, state_dtype=state_dtype, compile_step=False)
    calls = []
    real = compiled(quant.round_to_bf16)._compiled
    compiled(quant.round_to_bf16)._compiled = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    try:
        default, _ = _train(_model(torch.bfloat16), 4, lr=1e-2, state_dtype=state_dtype)
    finally:
        compiled(quant.round_to_bf16)._compiled = real
    assert len(calls) == 4 * 6  # each step, every bf16 parameter (3 weights, 2 of them projected; 3 biases)
    for a, b in zip(eager, default):
        assert torch.equal(a, b)
    nearest, _ = _train(_model(torch.bfloat16), 4, lr=1e-2, state_dtype=state_dtype, stochastic_round=False)
    assert not all(torch.equal(a, b) for a, b in zip(eager, nearest))


def test_stochastic_rounding_ignores_the_global_rng():
    """Same seed, same steps: identical bf16 weights whatever the global RNG does (so every rank agrees)."""
    a, _ = _train(_model(torch.bfloat16), 5, lr=1e-3, state_dtype="int8")
    torch.manual_seed(999)
    torch.rand(1000)
    b, _ = _train(_model(torch.bfloat16), 5, lr=1e-3, state_dtype="int8")
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c, _ = _train(_model(torch.bfloat16), 5, lr=1e-3, state_dtype="int8", seed=1)
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_a_state_dtype_that_cannot_run_says_so(monkeypatch):
    monkeypatch.setattr(_torchao, "import_error", ImportError("No module named 'torchao'"))
    with pytest.raises(RuntimeError, match="state_dtype='int8' needs torchao"):
        lrc.wrap_model(_model(), rank=16, state_dtype="int8")
    assert not lrc.is_wrapped(_model())
    lrc.wrap_model(_model(), rank=16, state_dtype="bf16")  # plain kinds do not need torchao


def test_import_prints_nothing_and_registers_torchao_safe_globals():
    code = ("import lowrank_compile, torch\n"
            "names = {getattr(g, '__name__', '') for g in torch.serialization.get_safe_globals()}\n"
            "assert {'OptimState8bit', 'OptimState4bit', 'OptimStateFp8'} <= names, names\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "" and run.stderr == ""


@pytest.mark.parametrize("state_dtype", ["int8", "int4", "fp8", "fp32"])
def test_large_plain_parameters_update_in_row_chunks_exactly(monkeypatch, state_dtype):
    """A plain parameter bigger than the chunk is updated in block-aligned row slices: same result as whole."""
    from lowrank_compile import update

    whole, _ = _train(_model(torch.bfloat16), 4, lr=1e-2, state_dtype=state_dtype, compile_step=False)
    monkeypatch.setattr(update, "UPDATE_CHUNK_ELEMS", 3000)  # layer 3's weight: 128 x 64 = 8192 elements
    chunks = [c[0].numel() for _, c in update.row_chunks((torch.zeros(128, 64),), 3000, block=256)]
    assert chunks == [2816, 2816, 2560]  # 44 rows of 64 = 11 blocks of 256, and the rest
    chunked, opt = _train(_model(torch.bfloat16), 4, lr=1e-2, state_dtype=state_dtype, compile_step=False)
    for a, b in zip(chunked, whole):
        assert torch.equal(a, b)


def test_adam_ratio_bound_holds_for_adversarial_gradients():
    """|m_hat / sqrt(v_hat)| never exceeds update.adam_ratio_bound, even for gradients built to maximise it."""
    from lowrank_compile.update import adam_ratio_bound

    b1, b2 = 0.9, 0.999
    for t in (1, 3, 40, 500):
        g = torch.randn(1000, t, dtype=torch.float64)
        worst = torch.tensor([(b1 / b2) ** (t - i) for i in range(1, t + 1)], dtype=torch.float64)
        g = torch.cat([g, worst[None]])  # the Cauchy-Schwarz equality case
        m = torch.zeros(g.shape[0], dtype=torch.float64)
        v = torch.zeros_like(m)
        for i in range(t):
            m = b1 * m + (1 - b1) * g[:, i]
            v = b2 * v + (1 - b2) * g[:, i] ** 2
        ratio = (m / (1 - b1 ** t)).abs() / (v / (1 - b2 ** t)).sqrt()
        bound = adam_ratio_bound(torch.tensor(float(t), dtype=torch.float64), b1, b2)
        assert ratio.max() <= bound * (1 + 1e-9)
        assert ratio.max() >= bound * 0.999  # and it is tight: the worst case reaches it


def test_quantised_second_moment_rounding_to_zero_cannot_blow_up_a_step():
    """A fresh slot (small v) in a block whose absmax is huge: v rounds to 0 in int8 while m does not.

    Unclamped, the direction would be m / eps (~1e5); the bound keeps it at most ~1 at step 1.
    """
    from lowrank_compile.update import moments_direction

    n = 4096
    g = torch.full((n,), 1e-3)
    g[0] = 1e3  # one huge gradient sets the block's absmax
    m = quant.new_state((n,), "int8", signed=True, device="cpu")
    v = quant.new_state((n,), "int8", signed=False, device="cpu")
    u = moments_direction(g, m, v, torch.tensor(1.0), 0.9, 0.999, 1e-8)
    assert (quant.dequantize(v)[1:256] == 0).all()  # the premise: small v vanished in the big block
    assert u.abs().max() <= 1.05 + 1e-6


def test_quantised_updates_are_compiled_by_default_and_eager_on_request():
    from lowrank_compile.compile import compiled
    from lowrank_compile.update import moments_direction

    _, opt = _train(_model(), 1, state_dtype="int8")
    p = next(iter(opt.layers))
    assert opt._state_fn(moments_direction, opt.state[p]["exp_avg"]) is compiled(moments_direction)
    _, opt = _train(_model(), 1, state_dtype="int8", compile_step=False)
    p = next(iter(opt.layers))
    assert opt._state_fn(moments_direction, opt.state[p]["exp_avg"]) is moments_direction
