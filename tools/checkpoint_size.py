"""Checkpoint size of a LLaMA-shaped model's optimizer: lowrank_compile vs torch AdamW vs torchao AdamW8bit.

    python tools/checkpoint_size.py [--hidden 512] [--layers 4] [--state-dtype int8]

Builds a random-init transformers LlamaForCausalLM (hidden 512, intermediate 1376, 4 layers, 8 heads,
vocab 1000 by default), takes one training step with each optimizer so every state exists, and prints
the bytes on disk of: torch.optim.AdamW's state_dict (torch.save, fp32 states), torchao's AdamW8bit
state_dict (torch.save), and lowrank_compile.save_optimizer at rank = hidden / 4 (plus, for reference,
the same optimizer's state_dict through torch.save, and fp32 states). Model weights are not counted.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

import lowrank_compile as lrc
from lowrank_compile import _torchao


def llama(hidden: int, intermediate: int, layers: int, heads: int, vocab: int):
    with _torchao._captured():  # transformers imports more of torchao, which logs CPU-build noise
        from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                         max_position_embeddings=256)
    return LlamaForCausalLM(config)


def one_step(model, opt, vocab: int) -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 64), generator=g)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()


def size_of_torch_save(obj, directory: str, name: str) -> int:
    path = os.path.join(directory, name)
    torch.save(obj, path)
    return os.path.getsize(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--state-dtype", default="int8")
    args = parser.parse_args()
    shape = (args.hidden, args.intermediate, args.layers, args.heads, args.vocab)
    rank = args.hidden // 4
    rows = []
    with tempfile.TemporaryDirectory() as d:
        model = llama(*shape)
        n_params = sum(p.numel() for p in model.parameters())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        one_step(model, opt, args.vocab)
        adamw = size_of_torch_save(opt.state_dict(), d, "adamw.pt")
        rows.append(("torch AdamW state_dict (torch.save, fp32)", adamw))

        from torchao.optim import AdamW8bit

        model = llama(*shape)
        opt = AdamW8bit(model.parameters(), lr=1e-3)
        with _torchao._captured():  # its compiled step imports more of torchao, which logs CPU-build noise
            one_step(model, opt, args.vocab)
        rows.append(("torchao AdamW8bit state_dict (torch.save)", size_of_torch_save(opt.state_dict(), d, "ao.pt")))

        for state_dtype in dict.fromkeys((args.state_dtype, "fp32")):
            model = llama(*shape)
            opt = lrc.wrap_model(model, rank=rank, lr=1e-3, state_dtype=state_dtype)
            one_step(model, opt, args.vocab)
            path = os.path.join(d, f"lowrank_{state_dtype}.safetensors")
            lrc.save_optimizer(opt, path)
            rows.append((f"lowrank_compile save_optimizer, rank {rank}, {state_dtype} states",
                         os.path.getsize(path)))
            rows.append((f"lowrank_compile state_dict (torch.save), rank {rank}, {state_dtype} states",
                         size_of_torch_save(opt.state_dict(), d, f"lowrank_{state_dtype}.pt")))

    print(f"LlamaForCausalLM hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
          f"{args.heads} heads, vocab {args.vocab}: {n_params / 1e6:.2f}M parameters; torch {torch.__version__}")
    print()
    print(f"| {'optimizer checkpoint':<62} | {'bytes':>11} | {'MiB':>7} | {'AdamW / this':>12} |")
    print(f"|{'-' * 64}|{'-' * 13}|{'-' * 9}|{'-' * 14}|")
    for name, size in rows:
        print(f"| {name:<62} | {size:>11,} | {size / 2 ** 20:>7.2f} | {adamw / size:>11.1f}x |")


if __name__ == "__main__":
    sys.exit(main())
