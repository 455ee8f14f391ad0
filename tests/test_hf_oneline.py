"""lowrank_compile.hf.lowrank_trainer: a Trainer in one call, and TrainingArguments.optim checked, not ignored."""
from __future__ import annotations

import os

import pytest
from transformers import Trainer

import lowrank_compile as lrc
from lowrank_compile.hf import LowRankCheckpointCallback, lowrank_trainer, make_trainer_optimizers
from test_hf import Tokens, llama, one_thread_and_fresh_accelerate, training_args  # noqa: F401 (an autouse fixture)


def test_lowrank_trainer_trains_and_saves_the_optimizer_with_each_checkpoint(tmp_path):
    model = llama()
    args = training_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=4)
    trainer = lowrank_trainer(model, args, train_dataset=Tokens(), rank=6, update_gap=2)
    assert type(trainer) is Trainer and lrc.is_wrapped(model)
    assert sum(isinstance(c, LowRankCheckpointCallback) for c in trainer.callback_handler.callbacks) == 1
    trainer.train()
    assert trainer.state.global_step == 4
    assert os.path.isfile(tmp_path / "checkpoint-4" / "optimizer.safetensors")


def test_lowrank_trainer_keeps_the_users_callback_and_refuses_optimizers(tmp_path):
    args = training_args(tmp_path, max_steps=2)
    mine = LowRankCheckpointCallback()
    trainer = lowrank_trainer(llama(), args, train_dataset=Tokens(), rank=6, callbacks=[mine])
    assert [c for c in trainer.callback_handler.callbacks if isinstance(c, LowRankCheckpointCallback)] == [mine]
    with pytest.raises(ValueError, match="optimizers= is what lowrank_trainer builds"):
        lowrank_trainer(llama(), args, train_dataset=Tokens(), rank=6, optimizers=(None, None))


def test_the_default_optim_is_accepted_and_any_other_refused(tmp_path):
    make_trainer_optimizers(llama(), training_args(tmp_path, max_steps=2), rank=6)  # the default: silent
    make_trainer_optimizers(llama(), training_args(tmp_path, max_steps=2, optim="adamw_torch"), rank=6)
    for optim in ("adafactor", "sgd"):
        with pytest.raises(ValueError, match=f"optim='{optim}'.*leave optim at its default"):
            make_trainer_optimizers(llama(), training_args(tmp_path, max_steps=2, optim=optim), rank=6)
