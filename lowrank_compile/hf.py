"""Hugging Face integration: train a wrapped model with ``transformers.Trainer``, checkpoint it as safetensors.

One call builds the Trainer (as ``optim="galore_adamw"`` does for GaLore):

- :func:`lowrank_trainer` wraps the model and returns a ``transformers.Trainer`` with the optimizer, its LR
  schedule and the checkpoint callback in place.

It is made of two pieces, each usable alone:

- :func:`make_trainer_optimizers` wraps the model and builds the optimizer (and its LR schedule) from a
  ``TrainingArguments``, for ``Trainer(optimizers=...)``.
- :class:`LowRankCheckpointCallback` writes the optimizer as ``optimizer.safetensors``
  (:func:`lowrank_compile.save_optimizer`) into every Trainer checkpoint and loads it back on resume.

Example::

    from lowrank_compile.hf import lowrank_trainer
    trainer = lowrank_trainer(model, args, train_dataset=train, rank=32)   # model wrapped in place
    trainer.train()

The same with the pieces (examples/hf_trainer.py runs this on CPU)::

    from lowrank_compile.hf import LowRankCheckpointCallback, make_trainer_optimizers
    args = TrainingArguments(output_dir="out/tiny", max_steps=60, learning_rate=3e-3,
                             gradient_accumulation_steps=2, lr_scheduler_type="cosine", warmup_steps=5)
    optimizers = make_trainer_optimizers(model, args, rank=16, update_gap=10)
    trainer = Trainer(model=model, args=args, train_dataset=train, optimizers=optimizers,
                      callbacks=[LowRankCheckpointCallback()])
    trainer.train()                               # later: trainer.train(resume_from_checkpoint=True)

Transformers' Conv1D layers (GPT-2 family) are projected by wrap_model like nn.Linear (see conv1d.py), and
``save_pretrained`` / ``Trainer.save_model`` of a wrapped model write the model's usual keys and weights.
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
import os

from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments, get_scheduler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .checkpoint import load_optimizer, save_optimizer
from .optimizer import LowRankAdamW
from .wrap import wrap_model

__all__ = ["lowrank_trainer", "make_trainer_optimizers", "LowRankCheckpointCallback", "lowrank_optimizer",
           "OPTIMIZER_FILE"]

logger = logging.getLogger(__name__)

OPTIMIZER_FILE = "optimizer.safetensors"  # written next to Trainer's optimizer.pt in each checkpoint-<step>

# wrap_model arguments that a Trainer run takes from its TrainingArguments
_FROM_ARGS = {"lr": "learning_rate", "betas": "adam_beta1 and adam_beta2", "eps": "adam_epsilon",
              "weight_decay": "weight_decay"}

# What TrainingArguments.optim holds when the user left it alone: transformers' torch AdamW (its default is
# "adamw_torch_fused" with torch >= 2.8, "adamw_torch" before). Any other value asks for another optimizer.
_DEFAULT_OPTIMS = ("adamw_torch", "adamw_torch_fused")


def lowrank_trainer(model: nn.Module, args: TrainingArguments, *, trainer_class: type = Trainer,
                    num_training_steps: int | None = None, **kwargs) -> Trainer:
    """A ``transformers.Trainer`` that trains `model` with lowrank_compile: one call, as ``optim=`` is for GaLore.

    Wraps `model` in place (:func:`make_trainer_optimizers`) and returns ``trainer_class(model=model,
    args=args, optimizers=(opt, scheduler), callbacks=[LowRankCheckpointCallback(), ...], ...)``.

    Args:
        model, args: as for Trainer; lr, betas, eps and weight decay come from `args`.
        trainer_class: a Trainer subclass to build (default ``transformers.Trainer``).
        num_training_steps: see :func:`make_trainer_optimizers`.
        **kwargs: options of :func:`lowrank_compile.wrap_model` (rank, update_gap, state_dtype, ...) and keyword
            arguments of the Trainer (train_dataset, eval_dataset, data_collator, callbacks, ...), told apart
            by wrap_model's signature. ``optimizers`` is refused: this function makes them.

    Example::

        args = TrainingArguments(output_dir="out/tiny", max_steps=60, learning_rate=3e-3)
        trainer = lowrank_trainer(model, args, train_dataset=train, rank=32)
        trainer.train()                           # later: trainer.train(resume_from_checkpoint=True)
    """
    for name in ("optimizers", "optimizer_cls_and_kwargs"):
        if name in kwargs:
            raise ValueError(f"{name}= is what lowrank_trainer builds; pass wrap_model options (rank=...) instead, "
                             "or call make_trainer_optimizers and build the Trainer yourself")
    wrap_names = set(inspect.signature(wrap_model).parameters) - {"model"}
    wrap_kwargs = {k: v for k, v in kwargs.items() if k in wrap_names}
    trainer_kwargs = {k: v for k, v in kwargs.items() if k not in wrap_names}
    optimizers = make_trainer_optimizers(model, args, num_training_steps, **wrap_kwargs)
    callbacks = list(trainer_kwargs.pop("callbacks", None) or [])
    if not any(isinstance(c, LowRankCheckpointCallback) or c is LowRankCheckpointCallback for c in callbacks):
        callbacks.insert(0, LowRankCheckpointCallback())
    return trainer_class(model=model, args=args, optimizers=optimizers, callbacks=callbacks, **trainer_kwargs)


def check_optim(args: TrainingArguments) -> None:
    """Refuse a TrainingArguments whose ``optim`` asks for an optimizer other than transformers' default AdamW.

    lowrank_compile replaces Trainer's optimizer; ``optim`` is always set (to the default when left alone), so
    only the default is accepted, silently, instead of ignoring a choice the user made.
    """
    optim = getattr(args.optim, "value", args.optim)
    default = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}.get("optim")
    if optim in _DEFAULT_OPTIMS or optim == getattr(default, "value", default):
        return
    raise ValueError(f"TrainingArguments(optim={optim!r}) asks Trainer for another optimizer, but lowrank_compile "
                     "supplies the optimizer itself; leave optim at its default, or train without lowrank_compile")


def make_trainer_optimizers(model: nn.Module, args: TrainingArguments, num_training_steps: int | None = None,
                            **wrap_kwargs) -> tuple[LowRankAdamW, object]:
    """Wrap `model` and return ``(optimizer, scheduler)`` for ``Trainer(optimizers=...)``, built from `args`.

    The AdamW hyper-parameters come from `args` (learning_rate, adam_beta1, adam_beta2, adam_epsilon,
    weight_decay), the schedule from lr_scheduler_type, warmup_steps and lr_scheduler_kwargs, exactly as
    Trainer builds its own; every other option of :func:`lowrank_compile.wrap_model` (rank, update_gap,
    state_dtype, filter_fn, fused, ...) is passed through.

    Args:
        model: the model to wrap, in place; move it to its training device first.
        args: the TrainingArguments the Trainer will get.
        num_training_steps: optimizer steps of the run, which the schedule needs. Default: ``args.max_steps``
            when it is set (> 0). Otherwise the returned scheduler is None, and Trainer builds the same
            schedule itself from `args` once it knows the length of the run (``optimizers=(opt, None)`` is
            how Trainer is told to do that).
        **wrap_kwargs: keyword arguments of wrap_model, except lr, betas, eps and weight_decay.

    Returns:
        ``(optimizer, scheduler)``: a :class:`LowRankAdamW` and a ``torch.optim.lr_scheduler.LambdaLR``
        (or None, see num_training_steps).

    Gradient accumulation: Trainer sums the gradients of ``args.gradient_accumulation_steps`` micro-batches
    (rank-r ones included: they are ordinary ``.grad`` of the layers' ``lowrank_grad`` carriers) and calls
    ``optimizer.step()`` once, so the optimizer is built with ``accumulate=1``. Gradient clipping
    (``args.max_grad_norm``) runs over ``model.parameters()``, carriers included: it clips the rank-r
    gradients together with the plain ones. ``fused=True`` works with ``gradient_accumulation_steps=1``
    only, and its updates run inside backward, before Trainer clips (use wrap_model's clip_per_tensor).
    fp16 mixed precision works as with torch AdamW (its GradScaler unscales and checks the rank-r gradients too,
    see lowrank_compile.amp), except with ``fused=True``, which is refused. ``args.optim`` must stay at its
    default (:func:`check_optim`): this optimizer replaces Trainer's.

    Example::

        args = TrainingArguments(output_dir="out/tiny", max_steps=60, learning_rate=3e-3)
        trainer = Trainer(model=model, args=args, train_dataset=train,
                          optimizers=make_trainer_optimizers(model, args, rank=16))
    """
    check_optim(args)
    for key, field in _FROM_ARGS.items():
        if key in wrap_kwargs:
            raise ValueError(f"{key} comes from TrainingArguments ({field}) when training with Trainer; set it "
                             "there instead of passing it to make_trainer_optimizers")
    if wrap_kwargs.get("accumulate", 1) != 1:
        raise ValueError(f"accumulate={wrap_kwargs['accumulate']!r}: Trainer accumulates gradients itself "
                         "(args.gradient_accumulation_steps) and calls optimizer.step() once per optimizer step; "
                         "leave accumulate at 1")
    fused = wrap_kwargs.get("fused", False)
    if fused and args.gradient_accumulation_steps != 1:
        raise ValueError(f"fused=True updates each layer inside backward, so it cannot wait for Trainer's "
                         f"gradient_accumulation_steps={args.gradient_accumulation_steps} micro-batches; use "
                         "fused=False, or gradient_accumulation_steps=1")
    if args.fp16 and fused:
        raise ValueError("fp16=True with fused=True: Trainer's GradScaler checks and unscales gradients after "
                         "backward, but fused updates already ran inside it; use fused=False, or bf16=True (no "
                         "scaler)")
    if fused and args.max_grad_norm and args.max_grad_norm > 0:
        raise ValueError(f"fused=True updates each layer inside backward, before Trainer clips gradients, so "
                         f"max_grad_norm={args.max_grad_norm} would clip nothing; set max_grad_norm=0 in "
                         "TrainingArguments and pass clip_per_tensor=... to clip each gradient, or use fused=False")
    opt = wrap_model(model, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                     weight_decay=args.weight_decay, **wrap_kwargs)
    if num_training_steps is None and args.max_steps > 0:
        num_training_steps = args.max_steps
    if num_training_steps is None:
        return opt, None
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer=opt,
                              num_warmup_steps=args.get_warmup_steps(num_training_steps),
                              num_training_steps=num_training_steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    return opt, scheduler


def lowrank_optimizer(optimizer) -> LowRankAdamW:
    """The LowRankAdamW inside `optimizer` (Trainer and accelerate wrap it in an AcceleratedOptimizer)."""
    opt = optimizer
    while not isinstance(opt, LowRankAdamW) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    if not isinstance(opt, LowRankAdamW):
        raise TypeError(f"expected the optimizer made by lowrank_compile.wrap_model, got {type(optimizer).__name__}; "
                        "pass Trainer(optimizers=make_trainer_optimizers(model, args, ...))")
    return opt


class LowRankCheckpointCallback(TrainerCallback):
    """Save the optimizer as safetensors in every Trainer checkpoint, and restore it when Trainer resumes.

    On every save it writes ``checkpoint-<step>/optimizer.safetensors`` with
    :func:`lowrank_compile.save_optimizer` (flat tensors and JSON metadata, checksummed, no pickle). When
    ``trainer.train(resume_from_checkpoint=...)`` resumes from a checkpoint of ``args.output_dir``, it loads
    that file with :func:`lowrank_compile.load_optimizer` before the first step, which checks that the model,
    configuration and every tensor match and raises :class:`lowrank_compile.CheckpointError` otherwise.

    Trainer itself also writes ``optimizer.pt`` (``opt.state_dict()``) and loads it on resume, exactly as well;
    this file is the portable, validated copy, and the one the resume ends up using. A resume from a
    checkpoint outside ``args.output_dir`` keeps the state Trainer loaded from ``optimizer.pt``. Nothing is
    written with ``save_only_model=True``, as Trainer then saves no optimizer either.

    Example::

        trainer = Trainer(model=model, args=args, train_dataset=train, optimizers=optimizers,
                          callbacks=[LowRankCheckpointCallback()])
    """

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        opt = lowrank_optimizer(optimizer)  # fail at the start, not at the first save
        if state.global_step == 0:
            return
        path = os.path.join(_checkpoint_dir(args, state), OPTIMIZER_FILE)
        if os.path.isfile(path):
            load_optimizer(opt, path)
            logger.info("lowrank_compile: optimizer state restored from %s (global step %d)", path, opt.global_step)
        else:
            logger.warning("lowrank_compile: resuming at step %d without %s; keeping the optimizer state Trainer "
                           "loaded from its optimizer.pt", state.global_step, path)

    def on_save(self, args, state, control, optimizer=None, **kwargs):
        if args.save_only_model or not state.is_world_process_zero:
            return
        folder = _checkpoint_dir(args, state)
        if not os.path.isdir(folder):
            logger.warning("lowrank_compile: no checkpoint folder %s; optimizer.safetensors not written", folder)
            return
        save_optimizer(lowrank_optimizer(optimizer), os.path.join(folder, OPTIMIZER_FILE))


def _checkpoint_dir(args: TrainingArguments, state) -> str:
    """Where Trainer puts the checkpoint of the current step (outside hyper-parameter search)."""
    return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
