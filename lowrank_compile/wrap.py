"""wrap_model / unwrap_model: rewrite a model's eligible nn.Linear layers in place and build the optimizer."""
from __future__ import annotations

import collections
import fnmatch
import logging
import sys
from typing import Callable, Mapping

import torch
from torch import nn

from . import distributed, quant
from .summary import compiles_updates, record as _record_summary, summary
from .config import LowRankConfig, resolve_rank
from .optimizer import LowRankAdamW
from .projection import LayerSpec, LowRankLinear, RefreshControl

__all__ = ["wrap_model", "unwrap_model", "is_wrapped"]

logger = logging.getLogger(__name__)

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)


_D = LowRankConfig  # the defaults below are the dataclass's own: defined once


def wrap_model(
    model: nn.Module,
    rank: int | float = _D.rank,
    lr: float = _D.lr,
    betas: tuple[float, float] = _D.betas,
    eps: float = _D.eps,
    weight_decay: float = _D.weight_decay,
    update_gap: int = _D.update_gap,
    basis: str = _D.basis,
    norm: str = _D.norm,
    state_policy: str = _D.state_policy,
    state_dtype: str = _D.state_dtype,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    fused: bool = _D.fused,
    *,
    scale: float = _D.scale,
    layer_rank: Mapping[str, int | float] | None = None,
    decay_all: bool = _D.decay_all,
    accumulate: int = _D.accumulate,
    compile_step: bool | None = _D.compile_step,
    sketch_rows: int = _D.sketch_rows,
    seed: int = _D.seed,
    clip_per_tensor: float | None = _D.clip_per_tensor,
    stochastic_round: bool = _D.stochastic_round,
    refresh_sync: str = _D.refresh_sync,
    stagger: bool = _D.stagger,
    score_dtype: torch.dtype | None = _D.score_dtype,
    weight_dtype: str | None = _D.weight_dtype,
    verbose: bool = False,
) -> LowRankAdamW:
    """Project the weight gradients of a model's nn.Linear layers to rank r and return its optimizer.

    Every eligible nn.Linear is rewritten in place (same weight storage, same state_dict keys) so that its
    backward emits the weight gradient already projected on r columns of a fixed DCT basis; the returned
    optimizer keeps Adam's states in that rank-r space and gives every other trainable parameter plain AdamW.

    Args:
        model: any nn.Module. Its nn.Linear layers whose smaller side exceeds the rank are projected, unless
            filter_fn says no, the weight is frozen (left alone) or shared with another module (tied
            embeddings: plain AdamW), or the parent reads the weight directly (nn.MultiheadAttention's
            out_proj: plain AdamW, since a projected weight there would silently stop training).
            transformers' Conv1D layers (GPT-2 family, weight stored (in, out)) count as nn.Linear layers.
        rank: int r, or a float f in (0, 1]: r = max(1, round(f * smaller side)) per layer.
        lr, betas, eps, weight_decay: AdamW hyper-parameters, shared by all parameters. Weight decay is
            decoupled; by default it skips biases and normalisation weights (as transformers' Trainer does).
        update_gap: steps between basis refreshes (step t refreshes when t == 1 or t % update_gap == 0);
            1 (default) refreshes every step as the paper does; see config.DEFAULT_UPDATE_GAP and
            docs/BENCHMARKS.md. sketch_rows=64 makes those refreshes nearly free.
        basis: "dct" (default), "svd" (GaLore: top-r singular vectors, forms the full gradient at refresh
            only) or "random" (a fixed seeded orthonormal basis).
        norm: "l1" (default) or "l2": how basis columns are ranked at a refresh.
        state_policy: "match" (default), "keep" or "reset": what Adam's states do when the basis changes.
        state_dtype: how Adam's states are stored, for projected and plain parameters alike: "fp32"
            (default), "bf16", or torchao's block-quantised "int8", "int4", "fp8". States with fewer than 4096
            elements or not a multiple of the block size (256; 128 for int4) stay fp32 (logged). The update
            math is fp32 in every case.
        filter_fn: (module, fqn) -> bool, which nn.Linear layers to project (default: all eligible).
        fused: run each parameter's update inside backward as soon as its gradient is complete, so no
            gradient (full or rank-r) outlives backward; ``opt.step()`` then only advances the step counter.
            Under torch.compile, compile per block (see ``compile_blocks``) to keep the saving.
        scale: multiplies the low-rank update (the paper's alpha); default 1.
        layer_rank: {fnmatch pattern on the layer's fqn: rank} giving some layers their own rank (first
            matching pattern wins), e.g. {"*.mlp.*": 64, "lm_head": 0.1}.
        decay_all: apply weight decay to every parameter, biases and norms included (the reference code).
        accumulate: micro-batches per optimizer step. Call backward / step / zero_grad once per micro-batch
            as usual: gradients (rank-r too) add up over k micro-batches and the k-th step() (or, fused, the
            k-th backward) applies one update. Scale the loss by 1/k yourself. A refresh selects the basis
            from the first micro-batch of its step; later ones reuse it.
        sketch_rows: 0 (default) ranks basis columns by their exact scores (the reference algorithm); k > 0
            estimates them from a k-row random sketch of the gradient's other side (Cauchy for l1, Gaussian
            for l2), costing T k (in + out) instead of T in out per refresh. 64 is a good start.
        clip_per_tensor: clip each gradient tensor (each layer's rank-r gradient, each plain parameter's
            gradient) to this 2-norm just before its update. Unlike global-norm clipping
            (``clip_grad_norm_(model.parameters(), c)``, which needs every gradient at once and so cannot run
            with fused=True), each tensor is judged alone: a spike in one layer does not shrink the others.
            Works in both modes; with fused=True it is the clipping to use.
        seed: seeds the sketches (and anything else random); the same on every process.
        stochastic_round: write bf16 weights back with stochastic rounding (default True), so updates
            below half a bf16 ulp still count on average; its bits come from (seed, parameter, step), so a
            resume repeats them exactly. False rounds to nearest. No effect on fp32 weights.
        compile_step: True: run the update of each group of same-shape layers as one torch.compile'd graph
            (lr and step counts are tensors: schedules never recompile). Pays on GPUs; compiles once per shape.
            None (default): compile only the updates of torchao-quantised states (int8 / int4 / fp8), whose
            codecs are many times slower and larger in eager mode; False: compile nothing.
        refresh_sync: how the processes of a data-parallel job agree on each refresh's columns (see
            lowrank_compile.distributed): "auto" (default) is "exact" when torch.distributed is initialised
            with more than one process and nothing otherwise; "exact" selects from the gradient summed over
            processes (blockwise all-reduce), "cheap" from the sum of each process's column scores, "local"
            lets each process select from its own gradient (separate models only). With DDP use
            ``lowrank_compile.distributed.prepare_ddp(model, opt)`` (required for fused=True).
        stagger: False (default): every layer refreshes on the same steps. True: layer i (in wrap order)
            refreshes when (t + i) % update_gap == 0, and every layer at t == 1, so each step pays for about
            1/update_gap of the layers' refreshes instead of all of them every update_gap-th step.
        score_dtype: the dtype of a refresh's score products, which only rank the basis columns: None (default)
            each layer's compute dtype (its gradients' dtype); torch.float32 ranks as the reference does;
            torch.bfloat16 runs them on a GPU's tensor cores. The rank-r gradient itself is always formed in the
            compute dtype.
        weight_dtype: None (default) keeps every weight in the model's dtype. "int8" stores each projected layer's
            weight as block-wise int8 codes with fp32 scales (lowrank_compile/int8_weights.py: blocks of 128 along
            the input dim, 1.03 bytes a weight): forward and the input gradient dequantise one layer at a time
            (weight-only: activations stay in the compute dtype, no int8 matmul kernel), and each update is
            written back in fp32 row chunks with stochastic rounding keyed by (seed, parameter, step). Everything
            else keeps the model's dtype and plain AdamW (states in state_dtype): embeddings (a lookup table's rows
            are updated sparsely and its AdamW states are what state_dtype shrinks; at 7B it is 2% of the
            weights), norms and biases (tiny, and sensitive), and an lm_head that is not projected (e.g. tied to
            the embedding). An lm_head that is projected is int8 like any projected layer. ``state_dict()`` shows
            an int8 weight as torchao's Int8Tensor (codes and scales, ``.dequantize()``); ``load_state_dict``
            takes it back bit for bit, or a float tensor (encoded). A model built on the meta device can be
            wrapped and then filled by :func:`lowrank_compile.load_weights`, which encodes layer by layer.
        verbose: print :func:`lowrank_compile.summary` of the result (on rank 0 only when torch.distributed
            is initialised). It is logged at INFO either way.

    Returns:
        a :class:`LowRankAdamW` that owns every trainable parameter of the model.

    Example::

        model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
        opt = lowrank_compile.wrap_model(model, rank=16, lr=1e-3)
        loss = model(torch.randn(8, 64)).square().mean()
        loss.backward(); opt.step(); opt.zero_grad()

    Gradient clipping: the rank-r gradients live in each layer's ``lowrank_grad`` parameter, so
    ``torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)`` clips them together with the plain
    gradients (the norm is that of the projected gradients, which is at most the full gradient's).
    """
    options = {k: v for k, v in locals().items() if k not in ("model", "verbose")}
    config = LowRankConfig(**options)
    if not isinstance(model, nn.Module):
        raise TypeError(f"wrap_model expects an nn.Module, got {type(model).__name__}")
    if is_wrapped(model):
        raise RuntimeError("this model is already wrapped by lowrank_compile; call unwrap_model(model) first "
                           "(wrapping again makes a fresh optimizer)")

    plan = _plan(model, config)
    device = plan[0][1].weight.device
    quant.check_available(config.state_dtype, "cpu" if device.type == "meta" else device)
    control = RefreshControl(config.update_gap, sketch_rows=config.sketch_rows, seed=config.seed,
                             stagger=config.stagger, score_dtype=config.score_dtype)
    layers: dict[torch.Tensor, LowRankLinear] = {}
    try:  # all or nothing: an error anywhere below leaves the model as it was
        opt = _build(model, config, plan, control, layers)
    except BaseException:
        _undo(control)
        raise
    _report(opt, model, verbose)
    return opt


def _build(model: nn.Module, config: LowRankConfig, plan, control: RefreshControl,
           layers: dict[torch.Tensor, LowRankLinear]) -> LowRankAdamW:
    """Swap the planned layers in place (recording each in `layers` as it goes) and make the optimizer."""
    dense_carriers = distributed.is_multiprocess()  # DDP / FSDP2 reduce and shard the carriers: real storage
    for fqn, linear, spec in plan:
        layer = _lowrank_class(linear).wrap(linear, spec, control, dense_carrier=dense_carriers)
        layers[layer.weight] = layer
    if config.weight_dtype == "int8":  # after every swap succeeded: an error above leaves the weights exact
        for layer in layers.values():
            layer.store_int8_()
    projected = set(layers)
    carriers = {id(layer.lowrank_grad) for layer in layers.values()}
    decay, no_decay = [], []
    no_decay_ids = set() if config.decay_all else _no_decay_ids(model)
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in carriers or p in projected:
            continue
        (no_decay if id(p) in no_decay_ids else decay).append(p)
    groups = [dict(params=list(layers), lowrank=True)]
    if decay:
        groups.append(dict(params=decay, lowrank=False))
    if no_decay:
        groups.append(dict(params=no_decay, lowrank=False, weight_decay=0.0))
    names = {p: fqn for fqn, p in model.named_parameters()}  # checkpoints name states by fqn
    opt = LowRankAdamW(groups, layers, control, config, param_names=names)
    distributed.attach(opt, config.refresh_sync)  # a multi-process job: agree on refreshes, guard fused updates
    quant.log_storage(opt)
    return opt


def _undo(control: RefreshControl) -> None:
    """Unwrap every layer a failed wrap_model had already swapped, and remove its hooks."""
    for handle in control.hooks:
        handle.remove()
    control.hooks.clear()
    for layer in list(control.layers):
        layer.unwrap()


def unwrap_model(model: nn.Module) -> nn.Module:
    """Turn every LowRankLinear of a wrapped model back into a plain nn.Linear (trained values, same keys).

    Returns the model. int8 weights (weight_dtype="int8") come back dequantised in the dtype the model had before
    wrapping, which needs that full-precision memory (lowrank_compile.export_weights writes them out a shard at a
    time instead). The optimizer made by wrap_model refuses further steps afterwards, and its
    in-backward updates (fused=True) are removed. After prepare_fsdp the layers stay FSDP2-sharded: their
    weights remain FSDP's sharded parameters (now trainable by any optimizer); the rank-r carriers leave FSDP.
    """
    from . import dcp, fsdp

    for module in list(model.modules()):
        if isinstance(module, LowRankLinear):
            control = module.refresh_control
            for handle in control.hooks:
                handle.remove()
            control.hooks.clear()
            dcp.release_layer(module)
            if hasattr(module.weight, "device_mesh"):  # sharded by prepare_fsdp
                fsdp.release_layer(model, module)
            module.unwrap()
    return model


def is_wrapped(model: nn.Module) -> bool:
    return any(isinstance(m, LowRankLinear) for m in model.modules())


def _plan(model: nn.Module, config: LowRankConfig) -> list[tuple[str, nn.Linear, LayerSpec]]:
    """Which nn.Linear layers to project, and with which spec. Raises if none can be."""
    owners = collections.Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    read_directly = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    plan, too_small, linears = [], [], 0
    conv1d = _conv1d_type()
    for fqn, module in model.named_modules():
        if type(module) is not nn.Linear and type(module) is not conv1d and not (id(module) in read_directly):
            continue
        linears += 1
        w = module.weight
        if id(module) in read_directly or not w.requires_grad or owners[id(w)] > 1:
            continue
        if config.filter_fn is not None and not config.filter_fn(module, fqn):
            continue
        rank = next((r for pattern, r in config.layer_rank if fnmatch.fnmatchcase(fqn, pattern)), config.rank)
        out_f, in_f = w.shape
        n = min(out_f, in_f)
        r = resolve_rank(rank, n)
        if n <= r:
            too_small.append((fqn, tuple(w.shape), r))
            continue
        side = "right" if out_f >= in_f else "left"
        plan.append((fqn, module, LayerSpec(rank=r, side=side, basis=config.basis, norm=config.norm)))
    if not plan:
        if linears == 0:
            raise ValueError(f"nothing to project: {type(model).__name__} has no nn.Linear layer")
        if too_small:
            largest = max(min(s) for _, s, _ in too_small)
            if largest < 2:
                raise ValueError("nothing to project: every eligible nn.Linear has a side of 1, which no rank can "
                                 "reduce; use torch.optim.AdamW for this model")
            given = f"rank={config.rank!r}" + (f" (and layer_rank={dict(config.layer_rank)!r})" if config.layer_rank
                                                else "")
            raise ValueError(f"{given} leaves nothing to project: every eligible nn.Linear has its smaller side <= "
                             f"its rank (largest smaller side: {largest}); choose a rank of at most {largest - 1}, "
                             "or a fraction such as 0.25" + (", in layer_rank too" if config.layer_rank else ""))
        raise ValueError("nothing to project: no nn.Linear is trainable, unshared and accepted by filter_fn")
    for fqn, shape, r in too_small:
        logger.debug("not projected (smaller side <= rank %d): %s %s", r, fqn, shape)
    return plan


def _conv1d_type() -> type | None:
    """transformers' Conv1D (GPT-2 family, weight stored (in, out)) if transformers is loaded, else None.

    A model that holds a Conv1D has imported it, so this never imports transformers itself.
    """
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def _lowrank_class(module: nn.Module) -> type[LowRankLinear]:
    if type(module) is nn.Linear:
        return LowRankLinear
    from .conv1d import LowRankConv1D  # a transformers Conv1D (see _conv1d_type)

    return LowRankConv1D


def _no_decay_ids(model: nn.Module) -> set[int]:
    """Biases and normalisation weights (Trainer's rule), by id."""
    ids = set()
    for module in model.modules():
        is_norm = isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower()
        for name, p in module.named_parameters(recurse=False):
            if is_norm or name == "bias" or name.endswith("_bias"):
                ids.add(id(p))
    return ids


def _report(opt: LowRankAdamW, model: nn.Module, verbose: bool) -> None:
    """Log the summary at INFO (print it too if verbose, on rank 0), and say once that a long compile is coming."""
    global _compile_noted
    _record_summary(opt, model)
    show = verbose and (not torch.distributed.is_available() or not torch.distributed.is_initialized()
                        or torch.distributed.get_rank() == 0)
    if show or logger.isEnabledFor(logging.INFO):
        text = summary(opt)
        logger.info("%s", text)
        if show:
            print(text, flush=True)
    if not _compile_noted and compiles_updates(opt):
        _compile_noted = True
        logger.info("lowrank_compile: compiling the optimizer's state updates at the first step, about 30 s the "
                    "first time")


_compile_noted = False  # the first-compile notice is given once per process
