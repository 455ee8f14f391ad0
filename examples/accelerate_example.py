"""Train a tiny GPT-2 with accelerate and lowrank_compile: prepare, accumulate, clip, save and load state.

    python examples/accelerate_example.py               # single process, CPU, a few seconds
    accelerate launch examples/accelerate_example.py    # the same script under accelerate's launcher

wrap_model returns an ordinary torch optimizer, so Accelerator.prepare wraps it like any other: the
AcceleratedOptimizer skips step() and zero_grad() between the micro-batches of an accumulated step (so
wrap_model keeps accumulate=1), accelerator.clip_grad_norm_ over model.parameters() clips the rank-r
gradients (the layers' lowrank_grad carriers) with the rest, and save_state / load_state go through
opt.state_dict(). GPT-2's attention and MLP layers are transformers Conv1D modules (weight stored
(in, out)); wrap_model projects them like nn.Linear. The text is the English corpus bundled with the
package (lowrank_compile.data), byte by byte: nothing is downloaded.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import GPT2Config, GPT2LMHeadModel, get_cosine_schedule_with_warmup
from transformers.utils import logging as hf_logging

import lowrank_compile
from lowrank_compile import data

SEQ = 64


def make_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=128, n_layer=2, n_head=4, vocab_size=256, n_positions=SEQ,
                                      bos_token_id=0, eos_token_id=0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps")
    parser.add_argument("--accumulate", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (the model is tiny)")
    cli = parser.parse_args()
    torch.set_num_threads(cli.threads)
    hf_logging.set_verbosity_error()

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=cli.accumulate)
    model = make_model()
    opt = lowrank_compile.wrap_model(model, rank=32, lr=3e-3, weight_decay=0.01, update_gap=10, verbose=True)
    scheduler = get_cosine_schedule_with_warmup(opt, max(1, cli.steps // 10), num_training_steps=cli.steps)
    model, opt, scheduler = accelerator.prepare(model, opt, scheduler)

    model.train()
    train, _ = data.splits()
    for i, ids in enumerate(data.batches(train, batch=8, seq=SEQ, steps=cli.steps * cli.accumulate, seed=0)):
        with accelerator.accumulate(model):
            loss = model(ids, labels=ids).loss
            accelerator.backward(loss)  # divides by the accumulation steps
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()  # a no-op until the last micro-batch of the step
            scheduler.step()
            opt.zero_grad()
        if accelerator.sync_gradients and (i // cli.accumulate) % 10 == 0:
            accelerator.print(f"step {i // cli.accumulate:3d}  loss {loss.item():.3f}")
    inner = opt.optimizer  # the LowRankAdamW inside the AcceleratedOptimizer
    accelerator.print(f"done: {inner.global_step} optimizer steps, final loss {loss.item():.3f}")

    with tempfile.TemporaryDirectory() as folder:
        accelerator.save_state(folder)  # model weights (original keys), opt.state_dict(), scheduler, RNG
        lowrank_compile.save_optimizer(inner, Path(folder) / "optimizer.safetensors")  # the portable copy

        fresh = make_model()
        fresh_opt = lowrank_compile.wrap_model(fresh, rank=32, lr=3e-3, weight_decay=0.01, update_gap=10)
        again = Accelerator(cpu=True, gradient_accumulation_steps=cli.accumulate)
        fresh, fresh_opt = again.prepare(fresh, fresh_opt)
        again.load_state(folder)  # restores opt.state_dict(): states, indices, global step
        lowrank_compile.load_optimizer(fresh_opt.optimizer, Path(folder) / "optimizer.safetensors")  # same state
        same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
        accelerator.print(f"load_state: weights equal {same}, optimizer at step {fresh_opt.optimizer.global_step}")


if __name__ == "__main__":
    main()
