"""Fault injection for save_optimizer / load_optimizer (issue 17 items 3, 4, 7).

Every case hands load_optimizer (or save_optimizer) a broken input and asserts two things: it is rejected with
the library's error naming the problem (CheckpointError for a file, TypeError for the wrong object, RuntimeError
mid-accumulation), and nothing changed — every state tensor (each part of a quantised one), every param-group
value, the global and micro step, each projected layer's selection() and the model's weights are bitwise as
before. The optimizer that a rejected load targets has trained on other data than the file's, so a partial
load would show.

Most faults are semantic (a negative second moment, lr a string): the file's checksum covers the metadata and
the tensors, so those files are re-signed (`resign`) and only the injected fault is wrong. Header faults are
written byte by byte (`raw_file`). The last cases are about the temporary files of killed saves.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import tracemalloc

import pytest
import safetensors
import safetensors.torch
import torch
from torch import nn

import lowrank_compile as lrc
from lowrank_compile import checkpoint, quant
from lowrank_compile.checkpoint import CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny ops are far slower on 2 busy threads


# -- models, training, snapshots ---------------------------------------------------------------------------------
def make(quantised: bool = False, **kw):
    """Two projected layers (16 -> 32: right, 32 -> 16: left) at rank 4, their biases plain. `quantised`: int8
    states and a filtered-out 16 -> 256 Linear, whose 4096-element weight state really is quantised."""
    torch.manual_seed(0)
    layers = [nn.Linear(16, 32), nn.Linear(32, 16)] + ([nn.Linear(16, 256)] if quantised else [])
    model = nn.Sequential(*layers)
    opt = lrc.wrap_model(model, rank=4, lr=1e-2, weight_decay=0.01, state_dtype="int8" if quantised else "fp32",
                         filter_fn=lambda m, fqn: fqn != "2", **kw)
    return model, opt


def train(model, opt, steps: int, seed: int = 0) -> None:
    for t in range(steps):
        g = torch.Generator().manual_seed(seed * 1000 + t)
        model(torch.randn(8, 16, generator=g)).square().mean().backward()
        opt.step()
        opt.zero_grad()


def snapshot(model, opt) -> dict:
    """Everything a load could change, as clones (and the state tensors' addresses)."""
    out = {"global_step": opt.global_step, "micro_step": opt.micro_step,
           "groups": [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in g.items() if k != "params"}
                      for g in opt.param_groups],
           "params": [[id(p) for p in g["params"]] for g in opt.param_groups]}
    for i, p in enumerate(q for g in opt.param_groups for q in g["params"]):
        state = opt.state.get(p, {})
        out[f"state.{i}.keys"] = sorted(state)
        for key, value in state.items():
            for part, t in quant.state_parts(value).items():
                out[f"state.{i}.{key}.{part}"] = t.clone()
                out[f"state.{i}.{key}.{part}.ptr"] = t.data_ptr()
    for j, layer in enumerate(opt.layers.values()):
        out[f"selection.{j}"] = layer.selection().clone()
    for k, v in model.state_dict().items():
        out[f"model.{k}"] = v.clone()
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def assert_same(a: dict, b: dict) -> None:
    """Bitwise equal (NaN too), the same dtypes and shapes, the same tensors (addresses), the same values."""
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
            assert torch.equal(_bits(a[k]), _bits(b[k])), k
        elif k == "groups":
            assert len(a[k]) == len(b[k])
            for ga, gb in zip(a[k], b[k]):
                assert ga.keys() == gb.keys()
                for key in ga:
                    if isinstance(ga[key], torch.Tensor):
                        assert torch.equal(_bits(ga[key]), _bits(gb[key])), key
                    else:
                        assert type(ga[key]) is type(gb[key]) and ga[key] == gb[key], key
        else:
            assert a[k] == b[k], k


def target(quantised: bool = False, **kw):
    """The optimizer a rejected load must leave alone: trained on other data, so its states differ from the file's."""
    model, opt = make(quantised, **kw)
    train(model, opt, 1, seed=7)
    return model, opt


def rejected(path, *patterns, error=CheckpointError, quantised: bool = False, model_opt=None) -> str:
    """Load `path` into a trained optimizer: `error` naming every pattern, and nothing changed."""
    model, opt = model_opt or target(quantised)
    before = snapshot(model, opt)
    with pytest.raises(error) as info:
        lrc.load_optimizer(opt, path)
    message = str(info.value)
    for pattern in patterns:
        assert pattern in message, message
    assert_same(snapshot(model, opt), before)
    return message


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A good checkpoint of each kind (fp32 and int8 states) after 3 steps, and its model's weights."""
    directory = tmp_path_factory.mktemp("source")
    out = {}
    for quantised in (False, True):
        model, opt = make(quantised)
        train(model, opt, 3)
        path = directory / f"{'int8' if quantised else 'fp32'}.safetensors"
        lrc.save_optimizer(opt, path)
        out[quantised] = path
    return out


# -- writing faulty files ----------------------------------------------------------------------------------------
def read(path):
    with safetensors.safe_open(str(path), "pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def resign(src, out, change_meta=None, change_tensors=None, metadata_change=None):
    """A copy of checkpoint `src` with its 'meta' JSON and/or tensors changed and a valid checksum."""
    metadata, tensors = read(src)
    meta = json.loads(metadata["meta"])
    if change_meta:
        change_meta(meta)
    if change_tensors:
        change_tensors(tensors)
    metadata["meta"] = json.dumps(meta)
    if metadata_change:
        metadata_change(metadata)
    metadata["checksum"] = checkpoint._checksum(metadata, tensors)
    safetensors.torch.save_file(tensors, str(out), metadata=metadata)
    return out


def raw_file(path, header, data: bytes = b"", length: int | None = None):
    """A file made by hand: 8-byte little-endian header length, the header (JSON or bytes), the data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write((len(raw) if length is None else length).to_bytes(8, "little"))
        f.write(raw)
        f.write(data)
    return path


def header_of(path) -> tuple[dict, bytes]:
    data = open(path, "rb").read()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


# -- the good path first -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("quantised", [False, True])
def test_a_good_load_copies_into_the_existing_state_tensors(source, quantised):
    model, opt = target(quantised)
    ptrs = {(i, key, part): t.data_ptr()
            for i, p in enumerate(q for g in opt.param_groups for q in g["params"])
            for key, value in opt.state[p].items() for part, t in quant.state_parts(value).items()}
    lrc.load_optimizer(opt, source[quantised])
    after = {(i, key, part): t.data_ptr()
             for i, p in enumerate(q for g in opt.param_groups for q in g["params"])
             for key, value in opt.state[p].items() for part, t in quant.state_parts(value).items()}
    assert after == ptrs  # same tensors, new contents
    _, tensors = read(source[quantised])
    p0 = next(iter(opt.layers))
    assert torch.equal(opt.state[p0]["exp_avg"], tensors["0.weight.exp_avg"])
    assert torch.equal(opt.layers[p0].selection(), tensors["0.weight.indices"].long())
    assert opt.global_step == 3
    if quantised:
        big = model[2].weight
        assert quant.kind_of(opt.state[big]["exp_avg"]) == "int8"
        assert torch.equal(opt.state[big]["exp_avg"].codes, tensors["2.weight.exp_avg.codes"])


def test_a_good_load_into_a_fresh_optimizer_builds_the_states(source):
    model, opt = make()
    lrc.load_optimizer(opt, source[False])
    assert opt.global_step == 3 and all(opt.state[p] for g in opt.param_groups for p in g["params"])
    train(model, opt, 1)


# -- file damage ---------------------------------------------------------------------------------------------------
def test_corrupt_tensor_bytes_fail_the_checksum(source, tmp_path):
    header, data = header_of(source[False])
    start, end = header["0.weight.exp_avg_sq"]["data_offsets"]
    data = bytearray(data)
    data[(start + end) // 2] ^= 0x04
    raw_file(tmp_path / "bad.safetensors", header, bytes(data))
    rejected(tmp_path / "bad.safetensors", "fails its checksum", "corrupted")


def test_a_truncated_file(source, tmp_path):
    full = source[False].read_bytes()
    cut = tmp_path / "cut.safetensors"
    for keep in (len(full) - 1, len(full) // 2, 100, 7):
        cut.write_bytes(full[:keep])
        rejected(cut, "truncated")


def test_bytes_after_the_last_tensor(source, tmp_path):
    padded = tmp_path / "padded.safetensors"
    padded.write_bytes(source[False].read_bytes() + b"\0" * 16)
    rejected(padded, "16 bytes after its last tensor")


def test_an_absurd_header_length(tmp_path):
    path = raw_file(tmp_path / "absurd.safetensors", b"{}", length=1 << 62)
    rejected(path, "truncated or not a safetensors file")
    # a length the file does hold, far beyond what this optimizer's checkpoint can need: refused before reading
    big = tmp_path / "big.safetensors"
    with open(big, "wb") as f:
        f.write((64 << 20).to_bytes(8, "little"))
        f.truncate(8 + (64 << 20))  # sparse: 64 MiB of header that must never be read
    t0 = time.perf_counter()
    rejected(big, "more than the", "can need")
    assert time.perf_counter() - t0 < 1.0


def test_a_million_entry_header_is_refused_in_well_under_a_second(tmp_path):
    n = 1_000_000
    entries = ",".join(f'"t{i}":{{"dtype":"U8","shape":[1],"data_offsets":[{i},{i + 1}]}}' for i in range(n))
    meta = {"format": checkpoint.FORMAT, "format_version": "1", "checksum": "sha256:0", "meta": "{}"}
    raw = ('{"__metadata__":' + json.dumps(meta) + "," + entries + "}").encode()
    path = raw_file(tmp_path / "million.safetensors", raw, b"\0" * n)
    model, opt = target()
    tracemalloc.start()
    t0 = time.perf_counter()
    rejected(path, "more than the", model_opt=(model, opt))
    elapsed = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert elapsed < 1.0, elapsed
    assert peak < 8 << 20, peak  # a few MiB at most (the snapshot's clones included)


def test_too_many_entries_within_the_size_bound(tmp_path):
    n = 3000  # about 190 KB of header: within the byte bound, far more tensors than 4 parameters can have
    header = {"__metadata__": {"format": checkpoint.FORMAT, "format_version": "1", "checksum": "x", "meta": "{}"}}
    header.update({f"t{i}": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]} for i in range(n)})
    rejected(raw_file(tmp_path / "many.safetensors", header, b"\0" * n), "declares 3000 tensors", "can hold")
    # the same count spelt so that the cheap pre-parse count misses it is still counted after parsing
    raw = json.dumps(header).replace('"data_offsets"', '"data_\\u006ffsets"').encode()
    rejected(raw_file(tmp_path / "hidden.safetensors", raw, b"\0" * n), "lists 3000 tensors", "can hold")


def test_deeply_nested_json(source, tmp_path):
    deep = 200_000
    raw = b'{"__metadata__":{},"x":' + b"[" * deep + b"]" * deep + b"}"
    rejected(raw_file(tmp_path / "deep.safetensors", raw), "nests too deeply")
    # inside the metadata's own 'meta' JSON, re-signed
    path = resign(source[False], tmp_path / "deep-meta.safetensors",
                  metadata_change=lambda m: m.update(meta="[" * deep + "]" * deep))
    rejected(path, "'meta' metadata is not JSON")


@pytest.mark.parametrize("metadata", ["a string", ["a", "list"], 3, {"format": 1}])
def test_metadata_that_is_not_an_object_of_strings(source, tmp_path, metadata):
    header, data = header_of(source[False])
    header["__metadata__"] = metadata
    rejected(raw_file(tmp_path / "m.safetensors", header, data), "__metadata__")


@pytest.mark.parametrize("field,value,pattern", [
    ("dtype", 7, "has dtype 7"),
    ("dtype", "F64", "tensor 0.weight.exp_avg: (32, 4) F64, expected (32, 4) torch.float32"),
    ("shape", "32x4", "not a list of at most"),
    ("shape", [32, -4], "not a list of at most"),
    ("data_offsets", [5], "not two ints"),
    ("data_offsets", [10, 2], "not two ints"),
    (None, ["not", "an", "object"], "is a list, not an object"),
])
def test_malformed_tensor_entries(source, tmp_path, field, value, pattern):
    header, data = header_of(source[False])
    if field is None:
        header["0.weight.exp_avg"] = value
    else:
        header["0.weight.exp_avg"][field] = value
        if field == "dtype" and value == "F64":  # sizes consistent, so only the dtype is wrong
            header["0.weight.exp_avg"]["shape"] = [32, 2]
            pattern = "tensor 0.weight.exp_avg: (32, 2) F64, expected (32, 4) torch.float32"
    rejected(raw_file(tmp_path / "e.safetensors", header, data), pattern)


def test_a_re_signed_tensor_of_the_wrong_dtype(source, tmp_path):
    def to_double(t):
        t["0.weight.exp_avg"] = t["0.weight.exp_avg"].double()
    path = resign(source[False], tmp_path / "d.safetensors", change_tensors=to_double)
    rejected(path, "tensor 0.weight.exp_avg: (32, 4) F64, expected (32, 4) torch.float32")


def test_meta_of_the_wrong_structure(source, tmp_path):
    cases = [
        (lambda m: m.update(layers="all of them"), "'layers' is 'all of them', not a list"),
        (lambda m: m["layers"].append(m["layers"][0]), "listed twice"),
        (lambda m: m["layers"][0].update(has_state="yes"), "has_state 'yes'"),
        (lambda m: m.update(param_groups=[1, 2]), "'param_groups'"),
        (lambda m: m.update(config=[]), "'config'"),
    ]
    for change, pattern in cases:
        rejected(resign(source[False], tmp_path / "s.safetensors", change_meta=change), pattern)
    rejected(resign(source[False], tmp_path / "l.safetensors",
                    metadata_change=lambda m: m.update(meta="[1, 2]")), "a list, not an object")


# -- semantic faults in a correctly signed file ----------------------------------------------------------------------
@pytest.mark.parametrize("value", [-1, 2.5, 3.0, "3", True, None])
def test_a_bad_global_step(source, tmp_path, value):
    path = resign(source[False], tmp_path / "g.safetensors", change_meta=lambda m: m.update(global_step=value))
    rejected(path, "global_step")


def _set(name, fill):
    def change(t):
        t[name] = t[name].clone()
        fill(t[name])
    return change


@pytest.mark.parametrize("name,fill,pattern", [
    ("0.weight.exp_avg_sq", lambda t: t.view(-1)[3].fill_(-1e-3), "negative values in Adam's second moment"),
    ("0.bias.exp_avg_sq", lambda t: t.view(-1)[0].fill_(float("nan")), "NaN or infinite"),
    ("1.weight.exp_avg", lambda t: t.view(-1)[5].fill_(float("nan")), "NaN or infinite"),
    ("1.weight.exp_avg", lambda t: t.view(-1)[5].fill_(float("inf")), "NaN or infinite"),
    ("0.weight.step", lambda t: t.fill_(2.5), "step 2.5 is not a count"),
    ("1.bias.step", lambda t: t.fill_(-1.0), "step -1.0 is not a count"),
    ("1.bias.step", lambda t: t.fill_(float("nan")), "is not a count"),
    ("0.weight.indices", lambda t: t[1].fill_(t[0].item()), "indices must be distinct"),
])
def test_impossible_state_values(source, tmp_path, name, fill, pattern):
    path = resign(source[False], tmp_path / "v.safetensors", change_tensors=_set(name, fill))
    rejected(path, f"tensor {name}", pattern)


@pytest.mark.parametrize("name,value,pattern", [
    ("2.weight.exp_avg_sq.scale", -0.5, "negative values in a quantisation scale"),
    ("2.weight.exp_avg.scale", float("nan"), "NaN or infinite"),
])
def test_impossible_quantised_state_values(source, tmp_path, name, value, pattern):
    path = resign(source[True], tmp_path / "q.safetensors", change_tensors=_set(name, lambda t: t[0].fill_(value)))
    rejected(path, f"tensor {name}", pattern, quantised=True)


@pytest.mark.parametrize("key,value,pattern", [
    ("lr", "0.01", "'0.01' is not a finite number"),
    ("lr", -0.1, "lr must be a"),
    ("lr", float("nan"), "nan is not a finite number"),
    ("lr", float("inf"), "inf is not a finite number"),
    ("lr", True, "True is not a finite number"),
    ("lr", {"tensor": "x"}, "not a value save_optimizer writes"),
    ("betas", [1.5, 0.999], "betas must be two numbers in [0, 1)"),
    ("betas", [0.9], "betas must be two numbers in [0, 1)"),
    ("betas", [[0.9], 0.99], "nests lists"),
    ("eps", -1e-8, "eps must be a"),
    ("weight_decay", "none", "is not a finite number"),
    ("scale", float("nan"), "is not a finite number"),
    ("seed", 1.5, "seed must be an int"),
    ("seed", True, "seed must be an int"),
    ("stochastic_round", "yes", "stochastic_round must be True or False"),
    ("params", [], "never holds the parameters"),
    ("initial_lr", {"nested": 1}, "not a value save_optimizer writes"),
])
def test_bad_hyper_parameters(source, tmp_path, key, value, pattern):
    def change(m):
        m["param_groups"][1][key] = value
    path = resign(source[False], tmp_path / "h.safetensors", change_meta=change)
    rejected(path, f"param_groups[1][{key!r}]", pattern)


def test_unknown_group_keys_are_restored_as_torch_does(source, tmp_path):
    """A scheduler's entries (LambdaLR's initial_lr) are plain values: restored, not refused."""
    path = resign(source[False], tmp_path / "k.safetensors",
                  change_meta=lambda m: [g.update(initial_lr=0.02) for g in m["param_groups"]])
    model, opt = target()
    lrc.load_optimizer(opt, path)
    assert all(g["initial_lr"] == 0.02 for g in opt.param_groups)


def test_every_fault_at_once_is_listed(source, tmp_path):
    def change(m):
        m["param_groups"][0]["lr"] = -1
        m["param_groups"][1]["betas"] = [0.9, 1.0]
        m["param_groups"][1]["seed"] = "7"
    message = rejected(resign(source[False], tmp_path / "all.safetensors", change_meta=change),
                       "param_groups[0]['lr']", "param_groups[1]['betas']", "param_groups[1]['seed']")
    assert "optimizer is unchanged" in message


# -- the wrong moment, the wrong object ----------------------------------------------------------------------------
def test_load_between_micro_batches_is_refused(source):
    model, opt = make(accumulate=2)
    train(model, opt, 2, seed=3)  # one full step (two micro-batches)
    model(torch.randn(8, 16)).square().mean().backward()
    opt.step()  # the first micro-batch of the next step: no update yet
    assert opt.micro_step == 1
    rejected(source[False], "between the micro-batches", "accumulate=2", error=RuntimeError, model_opt=(model, opt))


def test_the_wrong_object(source, tmp_path):
    model, opt = target()
    before = snapshot(model, opt)
    adamw = torch.optim.AdamW(model.parameters())
    for bad, what in ((adamw, "torch.optim.adamw.AdamW"), (model, "torch.nn.modules.container.Sequential"),
                      (None, "NoneType")):
        for fn, args in ((lrc.load_optimizer, (bad, source[False])), (lrc.save_optimizer, (bad, tmp_path / "w"))):
            with pytest.raises(TypeError) as info:
                fn(*args)
            message = str(info.value)
            assert what in message and "wrap_model" in message and "LowRankAdamW" in message, message
    with pytest.raises(TypeError, match="that is a model"):
        lrc.load_optimizer(model, source[False])
    assert not (tmp_path / "w").exists() and os.listdir(tmp_path) == []
    assert_same(snapshot(model, opt), before)


# -- temporaries of killed saves -------------------------------------------------------------------------------------
_KILLED_SAVE = r"""
import os, signal, sys
import safetensors.torch, torch
from torch import nn
import lowrank_compile as lrc

def partial_then_killed(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
        f.write(b"\0" * 4096)  # part of the file written ...
        f.flush()
    os.kill(os.getpid(), signal.SIGKILL)  # ... and the process killed (OOM killer, scheduler, kill -9)

safetensors.torch.save_file = partial_then_killed
model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 16))
opt = lrc.wrap_model(model, rank=4)
model(torch.randn(2, 16)).sum().backward()
opt.step()
lrc.save_optimizer(opt, sys.argv[1])
"""


def test_a_killed_save_leaves_a_temporary_that_the_next_save_removes(tmp_path):
    target_path = tmp_path / "opt.safetensors"
    child = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, str(target_path)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    _, err = child.communicate(timeout=120)
    assert child.returncode == -signal.SIGKILL, err[-2000:]
    left = [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert left == [left[0]] and left[0].startswith(checkpoint._temp_prefix("opt.safetensors", pid=child.pid))
    assert os.path.getsize(tmp_path / left[0]) == 4096 and not target_path.exists()

    # what must survive: a live save's fresh temporary (this process), another host's fresh one, another
    # target's abandoned one, files that only look similar
    me = checkpoint._temp_prefix("opt.safetensors") + "abcd1234.tmp"
    other_host = checkpoint._temp_prefix("opt.safetensors", pid=1, host="elsewhere") + "abcd1234.tmp"
    other_target = checkpoint._temp_prefix("other.safetensors", pid=2 ** 22 + 1) + "abcd1234.tmp"
    lookalikes = [".opt.safetensors.abcd1234.tmp", "opt.safetensors.tmp", ".opt.safetensors.x-1.a.tmp", "notes.txt"]
    # what must go as well: a temporary of a live pid (this one) untouched for an hour, another host's old one
    stale = checkpoint._temp_prefix("opt.safetensors") + "old00000.tmp"
    stale_other_host = checkpoint._temp_prefix("opt.safetensors", pid=1, host="elsewhere") + "old00000.tmp"
    for name in [me, other_host, other_target, *lookalikes, stale, stale_other_host]:
        (tmp_path / name).write_bytes(b"x")
    hour_ago = time.time() - 3600
    for name in (stale, stale_other_host):
        os.utime(tmp_path / name, (hour_ago, hour_ago))

    model, opt = make()
    train(model, opt, 1)
    lrc.save_optimizer(opt, target_path)
    remaining = set(os.listdir(tmp_path))
    assert left[0] not in remaining, "the killed save's temporary is still there"
    assert stale not in remaining and stale_other_host not in remaining
    assert remaining == {"opt.safetensors", me, other_host, other_target, *lookalikes}
    lrc.load_optimizer(make()[1], target_path)  # and the new file is good


def test_temporaries_carry_the_target_host_and_pid(tmp_path, monkeypatch):
    seen = []
    original = safetensors.torch.save_file

    def spy(tensors, filename, metadata=None):
        seen.append(os.path.basename(filename))
        original(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", spy)
    model, opt = make()
    lrc.save_optimizer(opt, tmp_path / "o.safetensors")
    assert len(seen) == 1 and seen[0].startswith(checkpoint._temp_prefix("o.safetensors")) and seen[0].endswith(".tmp")
    assert f"-{os.getpid()}." in seen[0] and checkpoint._host_tag() == checkpoint._host_tag(socket.gethostname())
    assert os.listdir(tmp_path) == ["o.safetensors"]
