"""Train a small causal LM with transformers.Trainer and lowrank_compile; checkpoint, interrupt, resume.

    python examples/hf_trainer.py                      # 60 optimizer steps (2 micro-batches each) on CPU
    python examples/hf_trainer.py --stop-at 30         # the same run, stopped after its checkpoint at step 30
    python examples/hf_trainer.py --resume             # ... continued from that checkpoint to step 60
    python examples/hf_trainer.py --arch gpt2          # a GPT-2 (its Conv1D layers are projected too)

The model is a random-init 2-block LLaMA (or GPT-2) with a byte-level vocabulary; the text is the English
corpus bundled with the package (lowrank_compile.data), read byte by byte, so nothing is downloaded. The
Trainer comes from one call, lowrank_trainer: the optimizer and its cosine schedule come from the
TrainingArguments, and its checkpoint callback writes the optimizer as optimizer.safetensors into every
checkpoint and restores it when Trainer resumes. The final model is saved with Trainer.save_model: standard
weights under the usual keys, which load into a plain model with from_pretrained.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback,
                          TrainingArguments)
from transformers.utils import logging as hf_logging

from lowrank_compile import data
from lowrank_compile.hf import lowrank_trainer

SEQ = 64


class ByteBlocks(torch.utils.data.Dataset):
    """Consecutive fixed-length blocks of byte ids; the labels are the inputs (the model shifts them)."""

    def __init__(self, ids: torch.Tensor, max_blocks: int | None = None):
        self.blocks = ids[: ids.numel() // SEQ * SEQ].long().view(-1, SEQ)[:max_blocks]

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def corpus() -> tuple[ByteBlocks, ByteBlocks]:
    train, held_out = data.splits()  # each document's head trains, its tail is held out
    return ByteBlocks(train), ByteBlocks(held_out, max_blocks=64)


def tiny_model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                            max_position_embeddings=SEQ, bos_token_id=0, eos_token_id=0))
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_embd=128, n_layer=2, n_head=4, vocab_size=256, n_positions=SEQ,
                                          bos_token_id=0, eos_token_id=0))
    raise ValueError(f"unknown --arch {arch!r}; use llama or gpt2")


class StopAt(TrainerCallback):
    """Stop (as an interruption would) right after the checkpoint of step n."""

    def __init__(self, n: int):
        self.n = n

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.n:
            control.should_save = control.should_training_stop = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="llama", choices=["llama", "gpt2"])
    parser.add_argument("--out", default="out/hf_trainer")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--stop-at", type=int, default=0, help="stop after this step (0: run to the end)")
    parser.add_argument("--resume", action="store_true", help="resume from the latest checkpoint in --out")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: the model is tiny, more threads mostly add overhead)")
    cli = parser.parse_args()
    torch.set_num_threads(cli.threads)
    hf_logging.set_verbosity_error()
    train, held_out = corpus()

    model = tiny_model(cli.arch)
    args = TrainingArguments(
        output_dir=cli.out, max_steps=cli.steps, per_device_train_batch_size=8, gradient_accumulation_steps=2,
        learning_rate=3e-3, weight_decay=0.01, lr_scheduler_type="cosine", warmup_steps=5, max_grad_norm=1.0,
        logging_steps=10, save_steps=30, per_device_eval_batch_size=32, report_to="none", use_cpu=True,
        disable_tqdm=True, seed=0)
    # The model is wrapped in place; the optimizer gets lr, betas, eps and weight decay from args, and
    # verbose=True prints what was projected (lowrank_compile.summary).
    trainer = lowrank_trainer(model, args, train_dataset=train, eval_dataset=held_out, rank=cli.rank, update_gap=10,
                              verbose=True, callbacks=[StopAt(cli.stop_at)] if cli.stop_at else None)

    start = time.perf_counter()
    if cli.resume:  # Trainer loads weights, optimizer (optimizer.safetensors via the callback), schedule and RNG
        trainer.train(resume_from_checkpoint=True)
        before = "resumed"
    else:
        before = f"{trainer.evaluate()['eval_loss']:.3f}"
        trainer.train()
    after = trainer.evaluate()["eval_loss"]
    print(f"{cli.arch}: held-out loss {before} -> {after:.3f} at step {trainer.state.global_step} "
          f"({time.perf_counter() - start:.1f} s)")
    last = os.path.join(cli.out, f"checkpoint-{trainer.state.global_step}")
    if os.path.isdir(last):
        print(f"checkpoint {last}: {', '.join(sorted(os.listdir(last)))}")
    if trainer.state.global_step < cli.steps:
        print(f"stopped at step {trainer.state.global_step}; continue with --resume")
        return

    final = os.path.join(cli.out, "final")
    trainer.save_model(final)  # standard weights, original keys: no trace of the wrapping
    plain = type(model).from_pretrained(final)
    reloaded = Trainer(model=plain, args=args, eval_dataset=held_out).evaluate()["eval_loss"]
    print(f"saved to {final}; reloaded into a plain {type(plain).__name__}: held-out loss {reloaded:.3f}")


if __name__ == "__main__":
    main()
