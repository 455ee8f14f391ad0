"""wrap_model / unwrap_model: the public contract of API.md.

Every test builds its own small model on CPU; the references are plain torch (nn.Linear, torch.optim,
torch.save/torch.load) or values written out by hand.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import lowrank_compile as lrc
from lowrank_compile.projection import LowRankLinear

REPO = Path(__file__).resolve().parents[1]

# Small shapes: one intra-op thread is faster, and steady on a busy machine (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1")


def mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """32 -> 64 -> 32 with a LayerNorm: two projectable Linears (right and left side), biases, a norm."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 32)).to(dtype)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    loss = (model(x) - y).float().square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


def batch(seed: int = 1, n: int = 16, dim: int = 32, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g).to(dtype), torch.randn(n, dim, generator=g).to(dtype)


def opt_param_ids(opt: torch.optim.Optimizer) -> list[int]:
    return [id(p) for group in opt.param_groups for p in group["params"]]


class TiedLM(nn.Module):
    """Embedding whose weight is shared with the output Linear (tied embeddings)."""

    def __init__(self, vocab: int = 100, dim: int = 32):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, 64)
        self.fc2 = nn.Linear(64, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        return self.head(h + self.fc2(torch.relu(self.fc1(h))))


class AttnBlock(nn.Module):
    """nn.MultiheadAttention reads out_proj.weight directly instead of calling out_proj."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.ff = nn.Linear(dim, 64)
        self.out = nn.Linear(64, dim)

    def forward(self, x):
        h, _ = self.attn(x, x, x, need_weights=False)
        return self.out(torch.relu(self.ff(x + h)))


# -- errors ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, exc, pattern", [
    (dict(rank=0), ValueError, r"rank must be >= 1, got 0"),
    (dict(rank=-3), ValueError, r"rank must be >= 1, got -3"),
    (dict(rank=0.0), ValueError, r"rank as a fraction must lie in \(0, 1\], got 0\.0"),
    (dict(rank=1.5), ValueError, r"rank as a fraction must lie in \(0, 1\], got 1\.5"),
    (dict(rank=-0.25), ValueError, r"got -0\.25"),
    (dict(rank=True), ValueError, r"rank must be an int >= 1 or a float in \(0, 1\], got True"),
    (dict(rank="8"), ValueError, r"got '8'"),
    (dict(rank=8, basis="fourier"), ValueError, r"unknown basis 'fourier'"),
    (dict(rank=8, norm="linf"), ValueError, r"unknown norm 'linf'"),
    (dict(rank=8, state_policy="rotate"), ValueError, r"unknown state_policy 'rotate'"),
    (dict(rank=8, state_dtype="int3"), ValueError, r"unknown state_dtype 'int3'"),
    (dict(rank=8, update_gap=0), ValueError, r"update_gap must be an int >= 1, got 0"),
    (dict(rank=8, update_gap=-2), ValueError, r"update_gap must be an int >= 1, got -2"),
    (dict(rank=8, update_gap=2.5), ValueError, r"update_gap must be an int >= 1, got 2\.5"),
    (dict(rank=8, update_gap=True), ValueError, r"update_gap must be an int >= 1, got True"),
    (dict(rank=8, layer_rank={"0": 0}), ValueError, r"layer_rank\['0'\] must be >= 1, got 0"),
    (dict(rank=64), ValueError, r"rank=64 leaves nothing to project.*largest smaller side: 32"),
    (dict(rank=1.0), ValueError, r"rank=1\.0 leaves nothing to project"),
])
def test_invalid_arguments_raise_naming_the_value(kwargs, exc, pattern):
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(exc, match=pattern):
        lrc.wrap_model(model, **kwargs)
    assert not lrc.is_wrapped(model)  # a failed wrap leaves the model untouched
    assert all(type(m) is not LowRankLinear for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_wrapping_twice_raises():
    model = mlp()
    lrc.wrap_model(model, rank=8)
    with pytest.raises(RuntimeError, match="already wrapped.*unwrap_model"):
        lrc.wrap_model(model, rank=8)


def test_model_without_linear_raises():
    model = nn.Sequential(nn.Conv1d(4, 8, 3), nn.ReLU(), nn.Conv1d(8, 4, 3))
    with pytest.raises(ValueError, match="nothing to project: Sequential has no nn.Linear layer"):
        lrc.wrap_model(model, rank=2)


def test_nothing_eligible_raises():
    model = mlp()
    with pytest.raises(ValueError, match="nothing to project.*filter_fn"):
        lrc.wrap_model(model, rank=8, filter_fn=lambda m, fqn: False)


def test_not_a_module_raises():
    with pytest.raises(TypeError, match="expects an nn.Module, got Tensor"):
        lrc.wrap_model(torch.zeros(3, 3), rank=1)


# -- which layers are projected ------------------------------------------------------------------------------

def test_frozen_linear_left_alone():
    model = mlp()
    model[0].requires_grad_(False)
    frozen = model[0].weight.clone()
    opt = lrc.wrap_model(model, rank=8)
    assert type(model[0]) is nn.Linear
    assert isinstance(model[3], LowRankLinear)
    ids = set(opt_param_ids(opt))
    assert id(model[0].weight) not in ids and id(model[0].bias) not in ids
    x, y = batch()
    train_step(model, opt, x, y)
    assert torch.equal(model[0].weight, frozen)
    assert model[0].weight.grad is None


def test_tied_weight_gets_plain_adamw():
    torch.manual_seed(0)
    model = TiedLM()
    opt = lrc.wrap_model(model, rank=8)
    assert type(model.head) is nn.Linear  # shared with the embedding: not projected
    assert model.head.weight is model.emb.weight
    assert isinstance(model.fc1, LowRankLinear) and isinstance(model.fc2, LowRankLinear)
    plain = [p for g in opt.param_groups if not g["lowrank"] for p in g["params"]]
    assert sum(p is model.emb.weight for p in plain) == 1  # once, not twice
    before = model.emb.weight.detach().clone()
    ids = torch.randint(0, 100, (4, 8), generator=torch.Generator().manual_seed(0))
    model(ids).logsumexp(-1).mean().backward()
    assert model.emb.weight.grad is not None
    opt.step()
    assert not torch.equal(model.emb.weight, before)
    assert model.head.weight is model.emb.weight


def test_multihead_attention_out_proj_not_wrapped_but_trains():
    torch.manual_seed(0)
    model = AttnBlock()
    opt = lrc.wrap_model(model, rank=4, filter_fn=lambda m, fqn: True)
    assert not isinstance(model.attn.out_proj, LowRankLinear)
    assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert model.attn.out_proj.weight.requires_grad
    assert isinstance(model.ff, LowRankLinear) and isinstance(model.out, LowRankLinear)
    assert id(model.attn.out_proj.weight) in set(opt_param_ids(opt))
    before = model.attn.out_proj.weight.detach().clone()
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    model(x).square().mean().backward()
    assert model.attn.out_proj.weight.grad is not None
    opt.step()
    assert not torch.equal(model.attn.out_proj.weight, before)


def test_filter_fn_receives_module_and_fqn():
    model = mlp()
    seen = []

    def keep_first(module, fqn):
        seen.append((fqn, module))
        return fqn == "0"

    opt = lrc.wrap_model(model, rank=8, filter_fn=keep_first)
    assert [f for f, _ in seen] == ["0", "3"]
    assert seen[0][1] is model[0] and seen[1][1] is model[3]
    assert isinstance(model[0], LowRankLinear)
    assert type(model[3]) is nn.Linear and model[3].weight.requires_grad
    lowrank = [p for g in opt.param_groups if g["lowrank"] for p in g["params"]]
    assert lowrank == [model[0].weight]
    assert id(model[3].weight) in set(opt_param_ids(opt))


def test_layer_rank_patterns_give_per_layer_ranks():
    torch.manual_seed(0)
    model = nn.ModuleDict(dict(attn_q=nn.Linear(32, 32), mlp_up=nn.Linear(32, 96), mlp_down=nn.Linear(96, 32),
                               head=nn.Linear(32, 80)))
    lrc.wrap_model(model, rank=8, layer_rank={"mlp_*": 4, "head": 0.25})
    ranks = {name: m.lowrank_spec.rank for name, m in model.items()}
    assert ranks == dict(attn_q=8, mlp_up=4, mlp_down=4, head=8)  # head: round(0.25 * 32)
    assert model["mlp_up"].lowrank_grad.shape == (96, 4)  # right side: (out, r)
    assert model["mlp_down"].lowrank_grad.shape == (4, 96)  # left side: (r, in)


def test_layer_rank_first_matching_pattern_wins():
    model = mlp()
    lrc.wrap_model(model, rank=8, layer_rank={"0": 2, "*": 4})
    assert model[0].lowrank_spec.rank == 2 and model[3].lowrank_spec.rank == 4


@pytest.mark.parametrize("fraction, expected", [
    (0.01, 1),    # round(0.2) = 0 -> at least 1
    (0.05, 1),    # round(1.0)
    (0.125, 2),   # round(2.5) = 2 (round half to even, as Python's round)
    (0.375, 8),   # round(7.5) = 8
    (0.5, 10),
    (0.9, 18),
])
def test_float_rank_rounding(fraction, expected):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 48), nn.Linear(48, 20), nn.Linear(20, 20))  # smaller side 20 for all
    lrc.wrap_model(model, rank=fraction)
    assert expected == max(1, round(fraction * 20))
    for layer in model:
        assert layer.lowrank_spec.rank == expected
    assert model[0].lowrank_spec.side == "right" and model[1].lowrank_spec.side == "left"


def test_layer_whose_smaller_side_is_at_most_rank_gets_plain_adamw():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 8))  # smaller side 8 <= rank 8
    opt = lrc.wrap_model(model, rank=8)
    assert isinstance(model[0], LowRankLinear)
    assert type(model[1]) is nn.Linear
    assert id(model[1].weight) in {id(p) for g in opt.param_groups if not g["lowrank"] for p in g["params"]}


# -- state_dict, storage and gradients while wrapped --------------------------------------------------------

def test_state_dict_keys_unchanged_and_strict_load_while_wrapped():
    model = mlp()
    keys = list(model.state_dict())
    opt = lrc.wrap_model(model, rank=8)
    assert list(model.state_dict()) == keys
    assert not any("lowrank" in k for k in model.state_dict())
    other = mlp(seed=5)
    result = model.load_state_dict(other.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for k, v in other.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)
    x, y = batch()
    train_step(model, opt, x, y)
    assert list(model.state_dict()) == keys
    lrc.unwrap_model(model)
    assert list(model.state_dict()) == keys


def test_wrapping_reuses_weight_storage():
    model = mlp()
    ptrs = [model[0].weight.data_ptr(), model[3].weight.data_ptr(), model[0].bias.data_ptr()]
    weights = [model[0].weight, model[3].weight]
    opt = lrc.wrap_model(model, rank=8)
    assert model[0].weight is weights[0] and model[3].weight is weights[1]
    assert [model[0].weight.data_ptr(), model[3].weight.data_ptr(), model[0].bias.data_ptr()] == ptrs
    x, y = batch()
    train_step(model, opt, x, y)
    assert [model[0].weight.data_ptr(), model[3].weight.data_ptr()] == ptrs[:2]  # updated in place
    lrc.unwrap_model(model)
    assert [model[0].weight.data_ptr(), model[3].weight.data_ptr()] == ptrs[:2]


def test_weight_grad_stays_none_and_carrier_has_rank_r_grad():
    model = mlp()
    opt = lrc.wrap_model(model, rank=8)
    x, y = batch()
    (model(x) - y).square().mean().backward()
    for layer in (model[0], model[3]):
        assert layer.weight.grad is None
        assert layer.lowrank_grad.grad is not None
        assert layer.lowrank_grad.grad.shape == layer.lowrank_grad.shape
    assert model[0].lowrank_grad.shape == (64, 8) and model[3].lowrank_grad.shape == (8, 64)
    opt.step()
    assert model[0].weight.grad is None
    assert not any("lowrank_grad" in k for k in model.state_dict())


# -- unwrap ----------------------------------------------------------------------------------------------------

def test_unwrap_restores_plain_linear_with_trained_values():
    model = mlp()
    keys = list(model.state_dict())
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    opt = lrc.wrap_model(model, rank=8)
    x, y = batch()
    for _ in range(3):
        train_step(model, opt, x, y)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    assert not torch.equal(trained["0.weight"], initial["0.weight"])
    assert lrc.unwrap_model(model) is model
    assert not lrc.is_wrapped(model)
    assert type(model[0]) is nn.Linear and type(model[3]) is nn.Linear
    assert list(model.state_dict()) == keys
    for k, v in model.state_dict().items():
        assert torch.equal(v, trained[k])
    assert model[0].weight.requires_grad and model[3].weight.requires_grad
    assert not hasattr(model[0], "lowrank_grad") and "lowrank_grad" not in dict(model.named_parameters())
    assert not any("lowrank" in name for name, _ in model.named_buffers())
    # A plain nn.Linear again: its weight gets a full gradient.
    (model(x) - y).square().mean().backward()
    assert model[0].weight.grad is not None and model[0].weight.grad.shape == (64, 32)


def test_old_optimizer_refuses_to_step_after_unwrap_and_rewrap_gives_fresh_one():
    model = mlp()
    opt = lrc.wrap_model(model, rank=8)
    x, y = batch()
    train_step(model, opt, x, y)
    lrc.unwrap_model(model)
    with pytest.raises(RuntimeError, match="unwrap"):
        opt.step()
    opt2 = lrc.wrap_model(model, rank=8)
    assert opt2 is not opt and len(opt2.state) == 0
    with pytest.raises(RuntimeError, match="unwrap"):  # the first one stays dead after a re-wrap
        opt.step()
    losses = [train_step(model, opt2, x, y) for _ in range(5)]
    assert losses[-1] < losses[0]


# -- the optimizer -----------------------------------------------------------------------------------------------

def test_optimizer_owns_every_trainable_parameter_and_no_carrier():
    torch.manual_seed(0)
    model = AttnBlock()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = lrc.wrap_model(model, rank=4)
    ids = opt_param_ids(opt)
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in trainable}
    carriers = {id(m.lowrank_grad) for m in model.modules() if isinstance(m, LowRankLinear)}
    assert len(carriers) == 2 and not carriers & set(ids)
    lowrank = [p for g in opt.param_groups if g["lowrank"] for p in g["params"]]
    assert {id(p) for p in lowrank} == {id(model.ff.weight), id(model.out.weight)}


def test_weight_decay_skips_biases_and_norm_weights_by_default():
    model = mlp()
    opt = lrc.wrap_model(model, rank=8, weight_decay=0.1)
    wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert wd[id(model[0].weight)] == 0.1 and wd[id(model[3].weight)] == 0.1
    assert wd[id(model[0].bias)] == 0.0 and wd[id(model[3].bias)] == 0.0
    assert wd[id(model[1].weight)] == 0.0 and wd[id(model[1].bias)] == 0.0  # LayerNorm


def test_weight_decay_all_with_decay_all():
    model = mlp()
    opt = lrc.wrap_model(model, rank=8, weight_decay=0.1, decay_all=True)
    assert all(g["weight_decay"] == 0.1 for g in opt.param_groups)
    # decay is decoupled and applied: with lr > 0 and zero gradients, a weight shrinks by (1 - lr * wd)
    b = model[1].bias
    b.data.fill_(1.0)
    x, y = batch()
    (model(x) - y).square().mean().backward()
    b.grad.zero_()
    opt.step()
    assert torch.allclose(b, torch.full_like(b, 1 - 1e-3 * 0.1))


def test_lr_scheduler_drives_every_group():
    model = mlp()
    opt = lrc.wrap_model(model, rank=8, lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = batch()
    for _ in range(3):
        train_step(model, opt, x, y)
        sched.step()
    assert all(math.isclose(g["lr"], 1e-2 / 8) for g in opt.param_groups)
    # lr 0 from a scheduler: nothing moves (the step reads group["lr"] live)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_step(model, opt, x, y)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_clip_grad_norm_clips_rank_r_gradients():
    model = mlp()
    plain = copy.deepcopy(model)
    opt = lrc.wrap_model(model, rank=8)
    x, y = batch()
    (model(x) - y).square().mean().backward()
    carriers = [model[0].lowrank_grad, model[3].lowrank_grad]
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert len(grads) == 6  # 2 carriers + 2 biases + LayerNorm weight and bias; the frozen W have none
    expected_total = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
    carrier_before = [c.grad.clone() for c in carriers]
    max_norm = 1e-3
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    torch.testing.assert_close(total, expected_total)
    coef = max_norm / (expected_total + 1e-6)
    for c, before in zip(carriers, carrier_before):
        torch.testing.assert_close(c.grad, before * coef)
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(after, torch.tensor(max_norm), rtol=1e-4, atol=0)
    # The projected gradient's norm is at most the full gradient's (orthonormal columns).
    (plain(x) - y).square().mean().backward()
    assert carrier_before[0].norm() <= plain[0].weight.grad.norm()
    assert carrier_before[1].norm() <= plain[3].weight.grad.norm()
    opt.step()


_RESUME_CHILD = textwrap.dedent("""
    import sys
    import lowrank_compile as lrc
    import torch
    state = torch.load(sys.argv[1], weights_only=True)
    data = torch.load(sys.argv[2], weights_only=True)
    dtype = data["dtype"]
    for s in state["state"].values():
        if "indices" in s:
            assert s["indices"].dtype == torch.int64, s["indices"].dtype
        assert s["exp_avg"].dtype == torch.float32 and s["exp_avg_sq"].dtype == torch.float32
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.LayerNorm(64), torch.nn.GELU(),
                                torch.nn.Linear(64, 32)).to(dtype)
    opt = lrc.wrap_model(model, rank=8, lr=1e-2, update_gap=2)
    model.load_state_dict(data["model"])
    opt.load_state_dict(state)
    for s in opt.state.values():
        if "indices" in s:
            assert s["indices"].dtype == torch.int64
        assert s["exp_avg"].dtype == torch.float32 and s["exp_avg_sq"].dtype == torch.float32
    assert torch.equal(model[0].lowrank_idx, data["idx0"])
    for x, y in data["batches"]:
        (model(x) - y).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    torch.save(model.state_dict(), sys.argv[3])
""")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_optimizer_state_dict_loads_weights_only_in_fresh_process_and_resumes(tmp_path, dtype):
    model = mlp(dtype=dtype)
    opt = lrc.wrap_model(model, rank=8, lr=1e-2, update_gap=2)
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(16, 32, generator=g).to(dtype), torch.randn(16, 32, generator=g).to(dtype))
               for _ in range(6)]
    for x, y in batches[:3]:
        train_step(model, opt, x, y)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    torch.save(dict(model=model.state_dict(), batches=batches[3:], dtype=dtype, idx0=model[0].lowrank_idx.clone()),
               tmp_path / "data.pt")
    for x, y in batches[3:]:  # steps 4 (refresh), 5, 6 (refresh) in this process
        train_step(model, opt, x, y)

    args = [str(tmp_path / name) for name in ("opt.pt", "data.pt", "resumed.pt")]
    child = subprocess.run([sys.executable, "-c", _RESUME_CHILD, *args], capture_output=True, text=True, cwd=REPO,
                           env=ONE_THREAD, timeout=120)
    assert child.returncode == 0, child.stderr
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(resumed[k], v, rtol=0, atol=0, msg=k)


def test_optimizer_state_dict_round_trip_in_process_keeps_dtypes():
    model = mlp(dtype=torch.bfloat16)
    opt = lrc.wrap_model(model, rank=8, lr=1e-2)
    x, y = batch(dtype=torch.bfloat16)
    train_step(model, opt, x, y)
    sd = opt.state_dict()
    opt.load_state_dict(sd)
    state = opt.state[model[0].weight]
    assert state["indices"].dtype == torch.int64
    assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32
    assert torch.equal(state["indices"], model[0].lowrank_idx)
    assert opt.global_step == 1


# -- dtypes, logging, output -----------------------------------------------------------------------------------

def test_bf16_weights_train():
    model = mlp(dtype=torch.bfloat16)
    opt = lrc.wrap_model(model, rank=8, lr=1e-2, update_gap=5)
    x, y = batch(dtype=torch.bfloat16)
    losses = [train_step(model, opt, x, y) for _ in range(20)]
    assert model[0].weight.dtype == torch.bfloat16 and model[0].lowrank_grad.dtype == torch.bfloat16
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0], losses


def test_summary_is_logged_and_nothing_printed(caplog, capsys):
    with caplog.at_level(logging.INFO, logger="lowrank_compile"):
        opt = lrc.wrap_model(mlp(), rank=8)
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("lowrank_compile")]
    assert len(messages) == 1 and messages[0] == lrc.summary(opt), messages
    assert "2 Linear layers" in messages[0] and "rank 8 " in messages[0]
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ""
    assert isinstance(opt, torch.optim.Optimizer)


def test_import_prints_nothing():
    result = subprocess.run([sys.executable, "-c", "import lowrank_compile"], capture_output=True, text=True,
                            cwd=REPO, env=ONE_THREAD, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""


class Reused(nn.Module):
    """One Linear called twice in a forward (weights shared across calls, as in ALBERT or looped blocks)."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(32, 32)

    def forward(self, x):
        return self.layer(torch.tanh(self.layer(x)))


def test_linear_called_twice_per_forward_trains():
    """A Linear applied twice per forward (shared weights) trains across refresh steps, in eager mode."""
    torch.manual_seed(0)
    model = Reused()
    opt = lrc.wrap_model(model, rank=4, update_gap=2)
    x, y = batch()
    losses = [train_step(model, opt, x, y) for _ in range(4)]
    assert losses[-1] < losses[0]


def test_readme_options_table_matches_the_config_dataclass():
    """README's table of wrap_model options lists every LowRankConfig field, in order, with its default; and
    wrap_model's signature takes exactly those options with the same defaults (one definition, no drift)."""
    import ast
    import dataclasses
    import inspect
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("### Options of `wrap_model`", 1)[1].split("\n\n", 2)[1]
    documented = {}
    for line in table.splitlines()[2:]:
        names_cell, default_cell = (c.strip() for c in line.strip("|").split("|")[:2])
        names = re.findall(r"`([a-z_]+)`", names_cell)
        defaults = [ast.literal_eval(d) for d in re.findall(r"`([^`]+)`", default_cell)]
        assert len(names) == len(defaults), line
        documented.update(zip(names, defaults))
    fields = {f.name: f.default for f in dataclasses.fields(lrc.LowRankConfig)}
    fields["layer_rank"] = None  # wrap_model takes a mapping or None; the config keeps it as a tuple, () for None
    assert lrc.LowRankConfig(layer_rank=None).layer_rank == lrc.LowRankConfig().layer_rank == ()
    params = inspect.signature(lrc.wrap_model).parameters
    assert list(documented) == list(fields) == list(params)[1:-1]
    assert list(params)[-1] == "verbose" and "verbose=True)`" in readme  # how to report, not an option: no field
    for name, default in fields.items():
        assert documented[name] == default, name
        assert params[name].default == default, name


def test_stagger_spreads_the_layers_refreshes_over_the_steps():
    """stagger=True: layer i refreshes at t == 1 and when (t + i) % update_gap == 0; stagger=False (default): all
    layers on the same steps. Observed through each layer's `refreshed` flag after backward."""
    torch.manual_seed(0)
    for stagger in (True, False):
        model = nn.Sequential(*[nn.Linear(24, 24) for _ in range(4)])
        opt = lrc.wrap_model(model, rank=4, update_gap=3, stagger=stagger)
        layers = list(opt.layers.values())
        for t in range(1, 10):
            model(torch.randn(8, 24)).square().mean().backward()
            seen = [layer.refreshed for layer in layers]
            want = [t == 1 or (t + (i if stagger else 0)) % 3 == 0 for i in range(4)]
            assert seen == want, (stagger, t, seen)
            assert opt.refresh_control.refresh == any(want)  # the step being taken
            opt.step()
            opt.zero_grad()
