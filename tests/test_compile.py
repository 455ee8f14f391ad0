"""torch.compile is the normal path: fullgraph, two graphs (refresh / ordinary), no recompiles, and the same
training as eager. Also the in-backward (fused) updates, gradient accumulation and the compiled step."""
import copy

import pytest
import torch
import torch._dynamo as dynamo
from torch import nn

import lowrank_compile as lrc


def _mlp(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(40, 24), nn.Linear(24, 64), nn.GELU(), nn.Linear(64, 24), nn.LayerNorm(24),
                         nn.Linear(24, 40)).to(dtype)


def _batches(n, b=4, t=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 40, (b, t), generator=g), torch.randint(0, 40, (b, t), generator=g)) for _ in range(n)]


def _loss(model, ids, y, k=1):
    logits = model(ids)
    return nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") / (y.numel() * k)


def _train(model, opt, batches, forward=None, sched=None, accumulate=1):
    forward = forward or model
    for ids, y in batches:
        for chunk_ids, chunk_y in zip(ids.chunk(accumulate), y.chunk(accumulate)):
            _loss(forward, chunk_ids, chunk_y, accumulate).backward()
            opt.step()
            opt.zero_grad()
        if sched is not None:
            sched.step()
    return model


def _max_diff(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    dynamo.utils.counters.clear()
    yield
    dynamo.reset()


def test_compiled_model_matches_eager_across_refreshes():
    """fullgraph compile of a wrapped model trains like eager over steps 1-5 (refreshes at 1, 2, 4).

    float64 keeps the reassociation noise of inductor's kernels near 1e-16; Adam's normalisation can amplify
    a gradient difference by ~1/eps-relative factors, so 1e-7 on weights is still a strict bound.
    """
    batches = _batches(5)
    eager = _mlp()
    compiled_model = copy.deepcopy(eager)
    _train(eager, lrc.wrap_model(eager, rank=6, lr=1e-2, update_gap=2), batches)
    opt = lrc.wrap_model(compiled_model, rank=6, lr=1e-2, update_gap=2)
    _train(compiled_model, opt, batches, forward=torch.compile(compiled_model, fullgraph=True))
    assert _max_diff(eager, compiled_model) < 1e-7
    assert dict(dynamo.utils.counters["graph_break"]) == {}


def test_no_recompiles_after_warmup_across_refreshes_and_lr_changes():
    """After one refresh step and one ordinary step have compiled, later refreshes, index changes, LR schedule
    changes and step counts never compile again."""
    model = _mlp(torch.float32)
    opt = lrc.wrap_model(model, rank=6, lr=1e-2, update_gap=3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    cm = torch.compile(model, fullgraph=True)
    batches = _batches(8)
    _train(model, opt, batches[:2], forward=cm, sched=sched)  # step 1 refresh, step 2 ordinary
    graphs = dynamo.utils.counters["stats"]["unique_graphs"]
    idx_before = model[1].lowrank_idx.clone()
    _train(model, opt, batches[2:], forward=cm, sched=sched)  # steps 3..8: refreshes at 3 and 6
    assert dynamo.utils.counters["stats"]["unique_graphs"] == graphs == 2
    assert dict(dynamo.utils.counters["graph_break"]) == {}
    assert not torch.equal(idx_before, model[1].lowrank_idx) or not torch.equal(
        model[3].lowrank_idx, torch.arange(6)), "refreshes should have changed some selection"


def test_fused_equals_unfused():
    """Updates inside backward give exactly the weights of backward-then-step."""
    batches = _batches(5)
    a, b = _mlp(), _mlp()
    _train(a, lrc.wrap_model(a, rank=6, lr=1e-2, update_gap=2), batches)
    opt = lrc.wrap_model(b, rank=6, lr=1e-2, update_gap=2, fused=True)
    _train(b, opt, batches)
    assert _max_diff(a, b) == 0.0


def test_fused_leaves_no_gradients_after_backward():
    model = _mlp()
    opt = lrc.wrap_model(model, rank=6, lr=1e-2, fused=True)
    ids, y = _batches(1)[0]
    _loss(model, ids, y).backward()
    assert all(p.grad is None for p in model.parameters())
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("k", [2, 4])
def test_accumulate_equals_full_batch_with_fixed_basis(fused, k):
    """accumulate=k over micro-batches of b/k equals one batch of b while the basis is held fixed."""
    batches = _batches(4, b=4)
    a, b = _mlp(), _mlp()
    opt_a = lrc.wrap_model(a, rank=6, lr=1e-2, update_gap=1000)
    opt_b = lrc.wrap_model(b, rank=6, lr=1e-2, update_gap=1000, fused=fused, accumulate=k)
    for opt in (opt_a, opt_b):  # skip the step-1 refresh: both keep the initial columns 0..r-1
        for layer in opt.refresh_control.layers:
            layer.restore_selection(layer.selection().clone())
        opt.refresh_control.set_step(1)
    _train(a, opt_a, batches)
    _train(b, opt_b, batches, accumulate=k)
    assert _max_diff(a, b) < 1e-10


def test_accumulate_refresh_selects_from_first_micro_batch():
    """On a refresh step the basis is chosen once, by the first micro-batch; later ones reuse it."""
    model = _mlp()
    opt = lrc.wrap_model(model, rank=6, lr=1e-2, update_gap=1000, accumulate=2)
    (ids, y), = _batches(1)
    _loss(model, ids[:2], y[:2], 2).backward()
    chosen = model[1].lowrank_idx.clone()
    assert not model[1]._lowrank_refresh
    _loss(model, ids[2:], y[2:], 2).backward()
    assert torch.equal(chosen, model[1].lowrank_idx)


def test_compiled_step_matches_eager_step():
    """compile_step=True (one graph per same-shape group, tensor lr) trains like the eager step."""
    batches = _batches(4)
    a, b = _mlp(), _mlp()
    sched_a = torch.optim.lr_scheduler.StepLR(opt_a := lrc.wrap_model(a, rank=6, lr=1e-2, update_gap=2), 1, 0.5)
    sched_b = torch.optim.lr_scheduler.StepLR(
        opt_b := lrc.wrap_model(b, rank=6, lr=1e-2, update_gap=2, compile_step=True), 1, 0.5)
    _train(a, opt_a, batches, sched=sched_a)
    _train(b, opt_b, batches, sched=sched_b)
    assert _max_diff(a, b) < 1e-10
    assert dict(dynamo.utils.counters["graph_break"]) == {}


def test_clip_per_tensor_bounds_each_gradient():
    model = _mlp()
    opt = lrc.wrap_model(model, rank=6, lr=1e-2, clip_per_tensor=1e-3)
    (ids, y), = _batches(1)
    _loss(model, ids, y).backward()
    seen = []
    orig = opt._prepare_state

    def spy(p, group, grad):
        seen.append(torch.linalg.vector_norm(grad).item())
        orig(p, group, grad)

    opt._prepare_state = spy
    opt.step()
    assert seen and max(seen) <= 1e-3 * (1 + 1e-6)


def test_per_block_compile_with_fused_matches_eager():
    """compile_blocks + fused=True (the compiled form that keeps in-backward updates) trains like eager."""
    batches = _batches(3)

    def blocks():
        torch.manual_seed(0)
        return nn.Sequential(nn.Embedding(40, 24), nn.ModuleList(
            [nn.Sequential(nn.Linear(24, 64), nn.GELU(), nn.Linear(64, 24)) for _ in range(2)]),
            nn.Linear(24, 40)).double()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = blocks()

        def forward(self, ids):
            h = self.body[0](ids)
            for block in self.body[1]:
                h = h + block(h)
            return self.body[2](h)

    a, b = Net(), Net()
    _train(a, lrc.wrap_model(a, rank=6, lr=1e-2, update_gap=2), batches)
    opt = lrc.wrap_model(b, rank=6, lr=1e-2, update_gap=2, fused=True)
    assert lrc.compile_blocks(b) == ["body.1.0", "body.1.1"]
    _train(b, opt, batches)
    assert _max_diff(a, b) < 1e-7


def test_autocast_bf16_trains_with_fp32_and_bf16_weights():
    """Under torch.autocast(bf16) the wrapped model trains; its rank-r gradient tracks the fp32 one."""
    for weight_dtype in (torch.float32, torch.bfloat16):
        model = _mlp(weight_dtype)
        ref = copy.deepcopy(model).float()
        opt = lrc.wrap_model(model, rank=6, lr=3e-2)
        ref_opt = lrc.wrap_model(ref, rank=6, lr=3e-2)
        (ids, y), = _batches(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            first = _loss(model, ids, y)
        first.backward()
        _loss(ref, ids, y).backward()
        g, g_ref = model[1].lowrank_grad.grad.float(), ref[1].lowrank_grad.grad
        assert model[1].lowrank_grad.grad.dtype == weight_dtype
        assert torch.equal(model[1].lowrank_idx, ref[1].lowrank_idx) or weight_dtype == torch.bfloat16
        assert (g - g_ref).norm() / g_ref.norm() < 0.05
        opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        for _ in range(15):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = _loss(model, ids, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
        assert loss.item() < first.item() - 0.1


def test_llama_compiles_fullgraph_without_graph_breaks():
    """A transformers LlamaForCausalLM, wrapped, compiles with fullgraph=True and trains: two graphs."""
    import transformers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(cfg)
    opt = lrc.wrap_model(model, rank=4, lr=1e-2, update_gap=2)
    cm = torch.compile(model, fullgraph=True)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(4):
        loss = cm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert dynamo.utils.counters["stats"]["unique_graphs"] == 2
    assert dict(dynamo.utils.counters["graph_break"]) == {}
    assert losses[-1] < losses[0]


def test_compiled_updates_raise_the_recompile_limit_only_during_their_calls():
    """compile_step=True needs more graphs than dynamo's default limit allows one function; the raise is scoped
    to the compiled update's own calls and the process-wide limit is left as it was."""
    import torch._dynamo

    from lowrank_compile.compile import compiled
    from lowrank_compile.update import lowrank_adamw_

    before = torch._dynamo.config.recompile_limit
    model = nn.Sequential(nn.Linear(16, 20))
    opt = lrc.wrap_model(model, rank=4, compile_step=True, update_gap=2)
    assert compiled(lowrank_adamw_).graphs > before  # what the update may need
    seen = []
    real = compiled(lowrank_adamw_)._compiled
    compiled(lowrank_adamw_)._compiled = lambda *a, **k: (seen.append(torch._dynamo.config.recompile_limit), real(*a, **k))[1]
    try:
        for _ in range(3):
            model(torch.randn(8, 16)).square().mean().backward()
            opt.step()
            opt.zero_grad()
    finally:
        compiled(lowrank_adamw_)._compiled = real
    assert seen and all(limit == compiled(lowrank_adamw_).graphs for limit in seen)
    assert torch._dynamo.config.recompile_limit == before


_NO_HOST_READ = {
    "defaults": {}, "fused": dict(fused=True), "int8 fused gap 2": dict(state_dtype="int8", fused=True, update_gap=2),
    "sketch": dict(sketch_rows=8), "int8 gap 2": dict(state_dtype="int8", update_gap=2),
    "int4 gap 2": dict(state_dtype="int4", update_gap=2), "accumulate 2": dict(accumulate=2, weight_decay=0.1),
    "accumulate 2 fused": dict(accumulate=2, fused=True),
    "bf16 weights": dict(dtype=torch.bfloat16, weight_decay=0.1),  # eager updates, stochastic rounding
    "bf16 weights int8 fused": dict(dtype=torch.bfloat16, state_dtype="int8", fused=True, update_gap=2),
    "bf16 weights, eager rounding": dict(dtype=torch.bfloat16, compile_step=False),
    "bf16 weights compile_step": dict(dtype=torch.bfloat16, compile_step=True, update_gap=2),
    "int8 weights": dict(weight_dtype="int8", weight_decay=0.1, update_gap=2),
    "int8 weights fused": dict(weight_dtype="int8", fused=True),
}


@pytest.mark.parametrize("options", list(_NO_HOST_READ.values()), ids=list(_NO_HOST_READ))
def test_a_training_step_never_reads_a_tensor_value_on_the_host(options):
    """Forward, backward (fused updates included), refresh and opt.step() never read a tensor value on the host:
    no .item(), no bool() of a tensor, nothing that would synchronise a GPU (the non-finite guard and the selection
    checks are decided on the device, lr and the step counters are device tensors, stochastic rounding derives its
    bits from the step counter in tensor ops), for fp32, bf16 and int8 weights, quantised states, fused updates and
    accumulated steps, with a learning-rate schedule changing lr between steps. Under torch.amp.GradScaler the
    scaler itself reads found_inf on the host, as it does for torch's AdamW (amp.py); not covered here."""
    from torch.profiler import ProfilerActivity, profile

    options = dict(options)
    dtype = options.pop("dtype", torch.float32)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 1024), nn.GELU(), nn.Linear(1024, 64)).to(dtype)  # (1024, 8) states
    opt = lrc.wrap_model(model, rank=8, **options)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 / (1 + t))
    x = torch.randn(32, 64, dtype=dtype)

    def step():
        for _ in range(opt.accumulate):
            model(x).float().square().mean().backward()
            opt.step()
        opt.zero_grad()
        sched.step()

    for _ in range(3):
        step()
    if options.get("state_dtype") in ("int8", "int4"):
        assert lrc.quant.is_quantized(opt.state[model[0].weight]["exp_avg"])
    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        step()  # an ordinary step where update_gap > 1
        step()  # and a refresh
    assert any(e.name.startswith("lowrank_compile.update") for e in prof.events())  # the updates were profiled
    reads = [e for e in prof.events() if e.name in ("aten::item", "aten::_local_scalar_dense", "aten::is_nonzero")]
    assert [e.name for e in reads if not _in_dynamo_guard(e)] == []
    if not options.get("compile_step"):
        assert reads == []


def _in_dynamo_guard(event) -> bool:
    """Whether a profiler event ran inside dynamo's guard check of a compiled function. Those guards item() 0-d CPU
    fp64 / int64 inputs (lr, a rounding key: torch._subclasses.fake_tensor gives only CPU scalars an item memo): a
    read of host memory, no synchronisation; on a GPU these tensors live on the device and are not read."""
    while event is not None:
        if event.name == "TorchDynamo Cache Lookup":
            return True
        event = event.cpu_parent
    return False


def test_compiled_tests_cover_layers_that_keep_x_D_r():
    """The compile tests above train layers that save x D_r on ordinary steps (projection.keeps_projected_input), a
    left layer that saves x, and count two graphs: the saved-tensor choice is part of the ordinary graph."""
    model = _mlp()
    lrc.wrap_model(model, rank=6)
    assert model[1].keeps_projected_input and model[5].keeps_projected_input
    assert not model[3].lowrank_spec.right and not model[3].keeps_projected_input
