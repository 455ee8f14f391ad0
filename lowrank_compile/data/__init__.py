"""The bundled English corpus: five public-domain documents, byte-level tokens, deterministic batches.

The texts ship inside the package (see README.md in this folder for provenance and licence); nothing is
downloaded. Each document is split once, by position: its first ``1 - held_out`` fraction trains, its last
``held_out`` fraction is held out, so held-out text is never seen in training.

Example::

    from lowrank_compile import data
    train, held = data.splits()                     # uint8 byte tensors
    for x in data.batches(train, batch=8, seq=128, steps=100, seed=0):
        loss = model(input_ids=x, labels=x).loss    # x: (8, 128) int64 byte ids, vocabulary 256
    held_batches = data.eval_batches(held, batch=8, seq=128, count=4)
    texts, labels = data.passages("train", length=256)  # which document a passage comes from
"""
from __future__ import annotations

from importlib import resources
from typing import Iterator

import torch
from torch import Tensor

__all__ = ["DOCUMENTS", "VOCAB_SIZE", "read", "encode", "decode", "splits", "batches", "eval_batches", "passages"]

# File stems, in label order (passages() labels a passage by its document's position here).
DOCUMENTS = ("macbeth", "sonnets", "paradise_regained", "areopagitica", "kjv_mark")
VOCAB_SIZE = 256  # byte-level: token id = byte value
HELD_OUT = 0.1


def read(name: str) -> str:
    """The text of one bundled document (ASCII, "\\n" line ends)."""
    if name not in DOCUMENTS:
        raise ValueError(f"unknown document {name!r}; choose one of {', '.join(DOCUMENTS)}")
    return resources.files(__name__).joinpath(f"{name}.txt").read_text(encoding="ascii")


def encode(text: str) -> Tensor:
    """Bytes of text as a uint8 tensor (token ids 0..255)."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).clone()


def decode(ids: Tensor) -> str:
    return bytes(ids.to(torch.uint8).tolist()).decode("utf-8", errors="replace")


def _split_text(text: str, held_out: float) -> tuple[str, str]:
    if not 0 < held_out < 1:
        raise ValueError(f"held_out must be a fraction in (0, 1), got {held_out!r}")
    cut = int(len(text) * (1 - held_out))
    return text[:cut], text[cut:]


def splits(held_out: float = HELD_OUT) -> tuple[Tensor, Tensor]:
    """(train, held-out) byte tensors of the whole corpus: each document's head trains, its tail is held out."""
    parts = [_split_text(read(name), held_out) for name in DOCUMENTS]
    sep = "\n\n"
    return encode(sep.join(p[0] for p in parts)), encode(sep.join(p[1] for p in parts))


def batches(data: Tensor, batch: int, seq: int, steps: int, seed: int = 0) -> Iterator[Tensor]:
    """`steps` batches of `batch` random windows of `seq` bytes, (batch, seq) int64; the same for a given seed."""
    if data.numel() <= seq:
        raise ValueError(f"a window of {seq} tokens needs more than {data.numel()} tokens of data")
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, data.numel() - seq, (batch,), generator=gen)
        yield torch.stack([data[s:s + seq] for s in starts.tolist()]).long()


def eval_batches(data: Tensor, batch: int, seq: int, count: int) -> list[Tensor]:
    """`count` fixed batches of windows spread evenly over data (the same every call), (batch, seq) int64."""
    n = batch * count
    last = data.numel() - seq
    if last < 0:
        raise ValueError(f"a window of {seq} tokens needs at least {seq} tokens of data, got {data.numel()}")
    starts = torch.linspace(0, last, n).long().tolist()
    windows = torch.stack([data[s:s + seq] for s in starts]).long()
    return list(windows.split(batch))


def passages(split: str, length: int = 256, held_out: float = 0.2) -> tuple[list[str], list[int]]:
    """Non-overlapping passages of `length` characters and their document's index in DOCUMENTS.

    split: "train" (each document's head) or "test" (its last `held_out` fraction). Passages start at a
    line start so they read as text, and every document contributes in proportion to its length.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    texts, labels = [], []
    for label, name in enumerate(DOCUMENTS):
        part = _split_text(read(name), held_out)[0 if split == "train" else 1]
        pos = 0
        while pos + length <= len(part):
            chunk = part[pos:pos + length]
            if chunk.strip():
                texts.append(" ".join(chunk.split()))
                labels.append(label)
            nxt = part.find("\n", pos + length)
            if nxt < 0:
                break
            pos = nxt + 1
    return texts, labels
