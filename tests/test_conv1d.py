"""transformers' Conv1D (GPT-2 family, weight stored (in, out)) projected like nn.Linear.

Against a dense float64 GPT-2: each wrapped Conv1D delivers the dense weight gradient projected in its stored
layout and selects the dense top-r columns; against an nn.Linear holding the transposed weight: the same
training run gives the transposed weights, so the back-projection respects the layout. A tiny GPT-2 trains
and unwraps to plain Conv1D modules.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import transformers  # noqa: E402  (a test dependency)
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

import lowrank_compile as lrc  # noqa: E402
from lowrank_compile.conv1d import LowRankConv1D  # noqa: E402
from reference import column_scores, dct_basis, project, top_r  # noqa: E402

RANK = 6


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: intra-op threads only add contention on a busy CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def gpt2(seed: int = 0, dtype: torch.dtype = torch.float32) -> GPT2LMHeadModel:
    """A 2-block GPT-2 without dropout: c_attn (32, 96) and c_fc (32, 128) left, both c_proj right."""
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).to(dtype)


def ids(seed: int, batch: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))


def conv1d_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Conv1D)}


def test_wrap_finds_conv1d_and_unwrap_restores_it():
    model = gpt2()
    keys = list(model.state_dict())
    trainable = {id(p) for p in model.parameters()}
    opt = lrc.wrap_model(model, rank=RANK, lr=1e-3)
    layers = conv1d_layers(model)
    assert len(layers) == 8 and all(type(m) is LowRankConv1D for m in layers.values())
    sides = {name.rsplit(".", 2)[-2] + "." + name.rsplit(".", 1)[-1]: m.lowrank_spec.side for name, m in layers.items()}
    assert sides == {"attn.c_attn": "left", "attn.c_proj": "right", "mlp.c_fc": "left", "mlp.c_proj": "right"}
    c_fc = model.transformer.h[0].mlp.c_fc
    assert c_fc.weight.shape == (32, 128) and c_fc.lowrank_grad.shape == (RANK, 128)
    assert "LowRankConv1D(nf=128, nx=32, rank=6, side=left" in repr(c_fc)
    assert list(model.state_dict()) == keys
    assert {id(p) for g in opt.param_groups for p in g["params"]} == trainable  # every weight, no carrier
    lrc.unwrap_model(model)
    assert all(type(m) is Conv1D for m in conv1d_layers(model).values()) and len(conv1d_layers(model)) == 8
    assert list(model.state_dict()) == keys and all(p.requires_grad for p in model.parameters())
    assert repr(c_fc) == "Conv1D(nf=128, nx=32)"


def test_gpt2_rank_r_gradients_are_the_dense_gradient_projected():
    """float64: outputs and plain gradients equal the dense model's; each Conv1D's carrier holds G D_r (right) or
    D_r^T G (left) of its stored (in, out) gradient G, with D_r the dense top-r at a refresh, kept after."""
    dense = gpt2(dtype=torch.float64)
    wrapped = copy.deepcopy(dense)
    opt = lrc.wrap_model(wrapped, rank=RANK, lr=0.0, update_gap=5)
    layers = conv1d_layers(wrapped)
    dense_layers = conv1d_layers(dense)
    selected = {}
    for step, seed in ((1, 1), (2, 2)):  # step 1 refreshes, step 2 (gap 5) keeps the selection
        x = ids(seed)
        loss_d = dense(x, labels=x).loss
        loss_w = wrapped(x, labels=x).loss
        torch.testing.assert_close(loss_w, loss_d, rtol=1e-13, atol=0)
        loss_d.backward()
        loss_w.backward()
        dense_params = dict(dense.named_parameters())
        for name, p in wrapped.named_parameters():
            if name.rsplit(".", 1)[0] not in layers or name.endswith("bias"):
                torch.testing.assert_close(p.grad, dense_params[name].grad, rtol=1e-10, atol=1e-13)
        for name, layer in layers.items():
            g = dense_layers[name].weight.grad  # (in, out): the stored layout
            right = layer.lowrank_spec.right
            d = dct_basis(layer.basis_size)
            assert layer.weight.grad is None and layer.basis_size == min(g.shape)
            if step == 1:
                assert torch.equal(layer.lowrank_idx, top_r(column_scores(g, d, right, 1), RANK)), name
                selected[name] = layer.lowrank_idx.clone()
            else:
                assert torch.equal(layer.lowrank_idx, selected[name]), name
            expected = project(g, d[:, layer.lowrank_idx], right)
            torch.testing.assert_close(layer.lowrank_grad.grad, expected, rtol=1e-10, atol=1e-13)
        opt.step()
        opt.zero_grad()
        dense.zero_grad()


class LinearTwin(nn.Module):
    """y = x W^T + b with W = the Conv1D's weight transposed: the same function as nn.Linear."""

    def __init__(self, conv: Conv1D):
        super().__init__()
        self.lin = nn.Linear(conv.nx, conv.nf).double()
        with torch.no_grad():
            self.lin.weight.copy_(conv.weight.t())
            self.lin.bias.copy_(conv.bias)

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize("fused", [False, True], ids=["step", "fused"])
@pytest.mark.parametrize("shape", [(24, 40), (40, 24)], ids=["wide", "narrow"])
def test_conv1d_trains_as_the_transposed_linear(shape, fused):
    """Six steps of low-rank AdamW (refresh every 2, weight decay) on a Conv1D and on the nn.Linear holding its
    transposed weight: the weights stay transposes of each other, so the Conv1D's update is back-projected in
    its own (in, out) layout."""
    nx, nf = shape
    torch.manual_seed(0)
    conv = nn.Sequential(Conv1D(nf, nx)).double()
    lin = LinearTwin(conv[0])
    kw = dict(rank=5, lr=1e-2, weight_decay=0.1, update_gap=2, fused=fused)
    opts = [lrc.wrap_model(conv, **kw), lrc.wrap_model(lin, **kw)]
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        x = torch.randn(3, 4, nx, generator=g, dtype=torch.float64)
        c = torch.randn(3, 4, nf, generator=g, dtype=torch.float64)
        for model, opt in zip((conv, lin), opts):
            (torch.tanh(model(x)) * c).sum().backward()
            opt.step()
            opt.zero_grad()
        assert torch.equal(conv[0].lowrank_idx, lin.lin.lowrank_idx)
    assert conv[0].lowrank_spec.side != lin.lin.lowrank_spec.side  # same basis (smaller side), opposite layout
    torch.testing.assert_close(conv[0].weight, lin.lin.weight.t(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(conv[0].bias, lin.lin.bias, rtol=1e-12, atol=1e-14)
    assert not torch.equal(conv[0].weight, LinearTwin(Conv1D(nf, nx)).lin.weight.t())  # it did train


def test_gpt2_trains_with_wrap_model_and_unwraps():
    model = gpt2()
    opt = lrc.wrap_model(model, rank=RANK, lr=1e-2, update_gap=4)
    x = ids(0, batch=4, seq=16)
    losses = []
    for _ in range(12):
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    model.eval()
    with torch.no_grad():
        wrapped_logits = model(x).logits
    lrc.unwrap_model(model)
    assert all(type(m) is Conv1D for m in conv1d_layers(model).values())
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, wrapped_logits, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="unwrapped"):
        opt.step()


def test_docstring_example_runs():
    example = LowRankConv1D.__doc__.split("Example::")[1]
    code = "\n".join(line[8:] for line in example.strip("\n").splitlines())
    exec(code, {"lowrank_compile": lrc, "torch": torch})
