"""Activation checkpointing: the recomputed forward makes the same refresh decision as the original one.

A wrapped model trained with torch.utils.checkpoint (reentrant and not) around its blocks, or a
transformers LlamaForCausalLM with gradient_checkpointing_enable(), must give the same rank-r gradients,
the same selected indices and the same weights, step for step and across refreshes, as without it.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import lowrank_compile as lrc
from lowrank_compile.projection import LowRankLinear

# Small shapes: one intra-op thread is faster, and steady on a busy machine (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 6
UPDATE_GAP = 2  # refreshes at steps 1, 2, 4, 6


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 4 * dim)  # right projection
        self.down = nn.Linear(4 * dim, dim)  # left projection

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


class Net(nn.Module):
    def __init__(self, dim: int = 32, depth: int = 2, ckpt: bool | None = None):
        super().__init__()
        self.inp = nn.Linear(16, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.head = nn.Linear(dim, 16)
        self.ckpt = ckpt  # None: no checkpointing; else use_reentrant

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = block(h) if self.ckpt is None else checkpoint(block, h, use_reentrant=self.ckpt)
        return self.head(h)


def lowrank_layers(model: nn.Module) -> dict[str, LowRankLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


def trace(model: nn.Module, opt: torch.optim.Optimizer, batches, loss_fn) -> list[dict]:
    """Per step: every rank-r gradient (before the step), then every index buffer and weight after it."""
    out = []
    for b in batches:
        loss = loss_fn(model, b)
        loss.backward()
        layers = lowrank_layers(model)
        record = dict(loss=loss.detach().clone(),
                      grads={n: m.lowrank_grad.grad.clone() for n, m in layers.items()})
        opt.step()
        opt.zero_grad()
        record["idx"] = {n: m.lowrank_idx.clone() for n, m in layers.items()}
        record["params"] = {k: v.clone() for k, v in model.state_dict().items()}
        out.append(record)
    return out


def assert_same_traces(ref: list[dict], got: list[dict]) -> None:
    assert len(ref) == len(got)
    for step, (a, b) in enumerate(zip(ref, got), start=1):
        torch.testing.assert_close(b["loss"], a["loss"], rtol=1e-6, atol=1e-7, msg=f"loss, step {step}")
        assert a["grads"].keys() == b["grads"].keys()
        for n in a["grads"]:
            torch.testing.assert_close(b["grads"][n], a["grads"][n], rtol=1e-5, atol=1e-7,
                                       msg=f"rank-r grad of {n}, step {step}")
            assert torch.equal(b["idx"][n], a["idx"][n]), f"indices of {n} differ at step {step}"
        for k in a["params"]:
            torch.testing.assert_close(b["params"][k], a["params"][k], rtol=1e-5, atol=1e-6,
                                       msg=f"{k}, step {step}")


def mse(model, batch):
    x, y = batch
    return (model(x) - y).square().mean()


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_torch_checkpoint_matches_no_checkpoint(use_reentrant):
    torch.manual_seed(0)
    ref_model = Net()
    ckpt_model = copy.deepcopy(ref_model)
    ckpt_model.ckpt = use_reentrant
    g = torch.Generator().manual_seed(1)
    # 3-D inputs: the projected backward flattens the leading dims.
    batches = [(torch.randn(2, 8, 16, generator=g), torch.randn(2, 8, 16, generator=g)) for _ in range(STEPS)]
    kwargs = dict(rank=4, lr=1e-2, update_gap=UPDATE_GAP)
    ref_opt = lrc.wrap_model(ref_model, **kwargs)
    ckpt_opt = lrc.wrap_model(ckpt_model, **kwargs)
    assert len(lowrank_layers(ckpt_model)) == 6  # inp, head, and up/down of both blocks

    calls = []
    ckpt_model.blocks[0].up.register_forward_pre_hook(lambda *a: calls.append(1))
    ref = trace(ref_model, ref_opt, batches, mse)
    got = trace(ckpt_model, ckpt_opt, batches, mse)
    assert len(calls) == 2 * STEPS  # the block's forward really ran again in every backward
    assert_same_traces(ref, got)
    # the indices really changed at some refresh, so equal indices are not trivially equal
    first, last = got[0]["idx"], got[-1]["idx"]
    assert any(not torch.equal(first[n], last[n]) for n in first)


def tiny_llama():
    import transformers
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, vocab_size=128,
                                      max_position_embeddings=64, attention_dropout=0.0)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).train()


def enable_checkpointing(model, use_reentrant: bool | None) -> None:
    kwargs = None if use_reentrant is None else dict(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renames it activation_checkpointing_enable
        model.gradient_checkpointing_enable(**(kwargs or {}))


def lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("use_reentrant", [None, True])
def test_llama_gradient_checkpointing_matches(use_reentrant):
    ref_model = tiny_llama()
    ckpt_model = copy.deepcopy(ref_model)
    enable_checkpointing(ckpt_model, use_reentrant)
    g = torch.Generator().manual_seed(2)
    # Two fixed sequences, each step drawing one as a batch: learnable, so the loss must go down.
    seqs = torch.randint(0, 128, (2, 2, 16), generator=g)
    batches = [seqs[i % 2] for i in range(STEPS)]
    kwargs = dict(rank=8, lr=3e-3, update_gap=UPDATE_GAP)
    ref_opt = lrc.wrap_model(ref_model, **kwargs)
    ckpt_opt = lrc.wrap_model(ckpt_model, **kwargs)
    layers = lowrank_layers(ckpt_model)
    # q, k, v, o, gate, up, down per layer, and lm_head
    assert len(layers) == 2 * 7 + 1, sorted(layers)

    calls = []
    # A pre-hook on the layer's first projection: recomputation may stop early (torch's checkpoint early
    # stop), after the last saved tensor it needs, so a hook on a later module can miss the recompute.
    ckpt_model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda *a: calls.append(1))
    ref = trace(ref_model, ref_opt, batches, lm_loss)
    got = trace(ckpt_model, ckpt_opt, batches, lm_loss)
    assert len(calls) == 2 * STEPS  # checkpointing really recomputed the decoder layer
    assert_same_traces(ref, got)
    assert got[4]["loss"] < got[0]["loss"] and got[5]["loss"] < got[1]["loss"]  # same batches, 4 steps apart
