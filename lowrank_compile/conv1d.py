"""LowRankConv1D: transformers' Conv1D (GPT-2 family) with the projected backward of LowRankLinear.

Conv1D is a Linear whose weight is stored transposed: W has shape (in, out) and y = x W + b. Its stored
gradient is x^T gy (in, out), which the projected backward forms in rank-r form exactly as for nn.Linear with
x and gy swapped (projection.py). Sides, carriers, indices, Adam states and the back-projection all live in
the stored layout, so the optimizer needs no special case. The basis sits on the smaller side as for
nn.Linear, so the update of a Conv1D is that of the equivalent nn.Linear (out, in), transposed.

wrap_model finds Conv1D layers on its own (transformers is not imported unless the model has one), and
unwrap_model gives them back as plain Conv1D modules.
"""
from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

from .projection import LowRankLinear

__all__ = ["LowRankConv1D"]


class LowRankConv1D(LowRankLinear, Conv1D):
    """A transformers Conv1D whose weight gradient is projected to rank r in backward. Made by wrap_model.

    It is still a Conv1D (isinstance holds, and the weight keeps its (in, out) storage and state_dict key);
    everything else is LowRankLinear's, with the weight read transposed.

    Example::

        from transformers import GPT2Config, GPT2LMHeadModel
        model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64))
        opt = lowrank_compile.wrap_model(model, rank=16, lr=1e-3)  # the c_attn / c_proj / c_fc Conv1D layers
        ids = torch.randint(0, 256, (2, 32))
        model(ids, labels=ids).loss.backward(); opt.step(); opt.zero_grad()
    """

    _lowrank_dense_class = Conv1D
    _lowrank_transposed = True

    __repr__ = nn.Module.__repr__  # Conv1D overrides it without extra_repr

    def extra_repr(self) -> str:
        s = self.lowrank_spec
        return f"nf={self.nf}, nx={self.nx}, rank={s.rank}, side={s.side}, basis={s.basis}"
