"""Hugging Face: Trainer (accumulation, schedules, safetensors checkpoints and exact resume), accelerate, and
save_pretrained of a wrapped model. Tiny random-init models on CPU, no downloads."""
from __future__ import annotations

import os
import runpy
import shutil

import pytest
import torch

import transformers  # noqa: E402  (a test dependency)
import accelerate  # noqa: E402  (a test dependency)
from accelerate import Accelerator  # noqa: E402
from accelerate.optimizer import AcceleratedOptimizer  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Trainer,  # noqa: E402
                          TrainerCallback, TrainingArguments, default_data_collator, get_scheduler)

import lowrank_compile as lrc  # noqa: E402
import lowrank_compile.hf as lrc_hf  # noqa: E402
from lowrank_compile.hf import LowRankCheckpointCallback, lowrank_optimizer, make_trainer_optimizers  # noqa: E402
from reference import column_scores, dct_basis, project, top_r  # noqa: E402

VOCAB = 64
RANK = 6


@pytest.fixture(autouse=True)
def one_thread_and_fresh_accelerate():
    """Tiny matmuls: intra-op threads only add contention. accelerate's state is process-wide: reset it after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    yield
    torch.set_num_threads(n)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """2 blocks, hidden 32: q/o (32, 32), k/v (16, 32), gate/up (64, 32), down (32, 64) projected at rank 6."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=32, bos_token_id=0,
                      eos_token_id=1, pad_token_id=2)
    return LlamaForCausalLM(cfg).to(dtype)


def gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


class Tokens(torch.utils.data.Dataset):
    """Causal-LM examples of fixed length from a repetitive token stream (learnable in a few steps)."""

    def __init__(self, n: int = 32, seq: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        stream = torch.arange(4 * VOCAB) % 23 + 3  # a period-23 pattern the model can learn
        starts = torch.randint(0, len(stream) - seq, (n,), generator=g)
        self.items = [stream[s:s + seq] for s in starts.tolist()]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {"input_ids": self.items[i], "labels": self.items[i]}


def training_args(out, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                learning_rate=1e-2, lr_scheduler_type="cosine", warmup_steps=1, logging_steps=1,
                save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
                remove_unused_columns=False)
    base.update(kw)
    return TrainingArguments(**base)


def lowrank_layers(model) -> dict:
    return {name: m for name, m in model.named_modules() if isinstance(m, lrc.LowRankLinear)}


def assert_same_optimizer(a: lrc.LowRankAdamW, b: lrc.LowRankAdamW) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["global_step"] == sb["global_step"]
    assert sa["state"].keys() == sb["state"].keys()
    for i, state in sa["state"].items():
        assert state.keys() == sb["state"][i].keys()
        for key, value in state.items():
            assert torch.equal(value, sb["state"][i][key]), (i, key)
    for ga, gb in zip(sa["param_groups"], sb["param_groups"]):
        assert ga == gb


def assert_same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# -- Trainer ------------------------------------------------------------------------------------------------
class RecordStep(TrainerCallback):
    """Before each optimizer step: the weights, selections, rank-r and plain gradients Trainer hands over."""

    def __init__(self, model):
        self.model, self.records = model, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        layers = lowrank_layers(self.model)
        self.records.append(dict(
            weights={k: v.clone() for k, v in self.model.state_dict().items()},
            idx={n: m.lowrank_idx.clone() for n, m in layers.items()},
            low={n: m.lowrank_grad.grad.clone() for n, m in layers.items()},
            plain={n: p.grad.clone() for n, p in self.model.named_parameters()
                   if p.grad is not None and not n.endswith("lowrank_grad")}))


def test_trainer_accumulated_step_is_the_projected_full_batch_gradient(tmp_path):
    """float64, gradient_accumulation_steps=2: at each optimizer step the carriers hold the dense gradient of
    both micro-batches together, projected on the columns selected from the first one (refresh at step 1 and
    every 2nd step), plain gradients are the dense ones, and the optimizer steps once per 2 micro-batches."""
    model = llama(dtype=torch.float64)
    batches = []
    args = training_args(tmp_path, max_steps=3, max_grad_norm=0.0)
    opt, sched = make_trainer_optimizers(model, args, rank=RANK, update_gap=2)
    recorder = RecordStep(model)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), optimizers=(opt, sched), callbacks=[recorder],
                      data_collator=lambda feats: batches.append(default_data_collator(feats)) or batches[-1])
    trainer.train()
    assert opt.global_step == 3 and len(recorder.records) == 3 and len(batches) >= 6  # the loader prefetches
    for step, rec in enumerate(recorder.records):
        dense = llama(dtype=torch.float64)
        dense.load_state_dict(rec["weights"])
        first, second = batches[2 * step], batches[2 * step + 1]
        both = {k: torch.cat([first[k], second[k]]) for k in first}
        dense(**first).loss.backward()  # the refresh selects from the first micro-batch
        g_first = {n: p.grad.clone() for n, p in dense.named_parameters()}
        dense.zero_grad()
        dense(**both).loss.backward()  # equal lengths, no padding: Trainer's loss over the 2 micro-batches
        grads = dict(dense.named_parameters())
        for name, g in rec["plain"].items():
            torch.testing.assert_close(g, grads[name].grad, rtol=1e-9, atol=1e-12)
        for name, idx in rec["idx"].items():
            g = grads[name + ".weight"].grad
            right = g.shape[0] >= g.shape[1]
            d = dct_basis(min(g.shape))
            if step + 1 in (1, 2):  # refresh steps
                assert torch.equal(idx, top_r(column_scores(g_first[name + ".weight"], d, right, 1), RANK)), name
            else:
                assert torch.equal(idx, recorder.records[step - 1]["idx"][name]), name
            torch.testing.assert_close(rec["low"][name], project(g, d[:, idx], right), rtol=1e-9, atol=1e-12)


def test_trainer_with_accumulation_lowers_the_loss_on_the_schedule(tmp_path):
    model = llama()
    args = training_args(tmp_path, max_steps=12, warmup_steps=2)
    opt, sched = make_trainer_optimizers(model, args, rank=RANK, update_gap=4)
    reference = get_scheduler("cosine", torch.optim.SGD([torch.zeros(1)], lr=args.learning_rate),
                              num_warmup_steps=2, num_training_steps=12)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(n=48), optimizers=(opt, sched))
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 12 and opt.global_step == 12
    assert logs[-1]["loss"] < 0.85 * logs[0]["loss"]
    for log in logs:  # Trainer logs the lr of the step it just took
        assert log["learning_rate"] == pytest.approx(reference.get_last_lr()[0])
        reference.optimizer.step()
        reference.step()


def test_trainer_builds_the_schedule_when_the_run_length_is_unknown(tmp_path):
    """No max_steps: make_trainer_optimizers returns (opt, None) and Trainer builds the schedule from args."""
    model = llama()
    args = training_args(tmp_path, num_train_epochs=1, lr_scheduler_type="linear", warmup_steps=0)
    opt, sched = make_trainer_optimizers(model, args, rank=RANK)
    assert sched is None
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(n=12), optimizers=(opt, sched))
    trainer.train()
    assert opt.global_step == trainer.state.global_step == 3  # 12 examples / (2 x 2)
    assert opt.param_groups[0]["lr"] == 0.0  # linear decay to zero at the end of the run
    assert isinstance(trainer.optimizer, AcceleratedOptimizer) and lowrank_optimizer(trainer.optimizer) is opt


def run_trainer(out, max_steps, resume=None, save_steps=3):
    model = llama()
    args = training_args(out, max_steps=max_steps, save_strategy="steps", save_steps=save_steps)
    optimizers = make_trainer_optimizers(model, args, rank=RANK, update_gap=2)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), optimizers=optimizers,
                      callbacks=[LowRankCheckpointCallback()])
    trainer.train(resume_from_checkpoint=resume)
    return model, optimizers[0], trainer


def test_trainer_resume_restores_the_optimizer_exactly(tmp_path, monkeypatch):
    """6 steps straight through vs 3 steps, checkpoint, resume in a fresh process state for 3 more: the same
    weights, Adam states, indices, step counters and learning rate; the safetensors file is what was loaded."""
    model_a, opt_a, _ = run_trainer(tmp_path / "a", 6)
    ckpt = tmp_path / "a" / "checkpoint-3"
    assert {"optimizer.safetensors", "optimizer.pt", "model.safetensors", "scheduler.pt"} <= set(os.listdir(ckpt))
    shutil.copytree(ckpt, tmp_path / "b" / "checkpoint-3")

    loaded = []
    monkeypatch.setattr(lrc_hf, "load_optimizer",
                        lambda opt, path: loaded.append(path) or lrc.load_optimizer(opt, path))
    model_b, opt_b, trainer_b = run_trainer(tmp_path / "b", 6, resume=str(tmp_path / "b" / "checkpoint-3"))
    assert loaded == [str(tmp_path / "b" / "checkpoint-3" / "optimizer.safetensors")]
    assert trainer_b.state.global_step == 6
    assert_same_weights(model_a, model_b)
    assert_same_optimizer(opt_a, opt_b)
    for (name, a), b in zip(lowrank_layers(model_a).items(), lowrank_layers(model_b).values()):
        assert torch.equal(a.lowrank_idx, b.lowrank_idx), name


def test_trainer_checkpoint_files_hold_the_same_state(tmp_path):
    """Trainer's own optimizer.pt (opt.state_dict(), loaded weights_only) and our optimizer.safetensors restore
    the same state into a fresh wrapped model's optimizer; both name the step the checkpoint was taken at."""
    run_trainer(tmp_path, 4, save_steps=4)
    ckpt = tmp_path / "checkpoint-4"
    fresh = []
    for _ in range(2):
        model = llama()
        fresh.append(make_trainer_optimizers(model, training_args(tmp_path, max_steps=4), rank=RANK, update_gap=2)[0])
    fresh[0].load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    lrc.load_optimizer(fresh[1], ckpt / "optimizer.safetensors")
    assert fresh[0].global_step == 4
    assert_same_optimizer(fresh[0], fresh[1])


def test_no_safetensors_file_with_save_only_model(tmp_path):
    model = llama()
    args = training_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2, save_only_model=True)
    Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[LowRankCheckpointCallback()],
            optimizers=make_trainer_optimizers(model, args, rank=RANK)).train()
    assert "model.safetensors" in os.listdir(tmp_path / "checkpoint-2")
    assert not {"optimizer.safetensors", "optimizer.pt"} & set(os.listdir(tmp_path / "checkpoint-2"))


def test_callback_refuses_another_optimizer(tmp_path):
    model = llama()
    args = training_args(tmp_path, max_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[LowRankCheckpointCallback()])
    with pytest.raises(TypeError, match="wrap_model"):
        trainer.train()


@pytest.mark.parametrize("args_kw, wrap_kw, pattern", [
    ({}, {"lr": 1e-3}, "learning_rate"),
    ({}, {"betas": (0.9, 0.95)}, "adam_beta1"),
    ({}, {"accumulate": 2}, "gradient_accumulation_steps"),
    ({"gradient_accumulation_steps": 2}, {"fused": True}, "fused=True"),
    ({"fp16": True, "gradient_accumulation_steps": 1}, {"fused": True}, "fp16=True with fused=True"),
])
def test_make_trainer_optimizers_rejects_what_cannot_work(tmp_path, args_kw, wrap_kw, pattern):
    model = llama()
    with pytest.raises(ValueError, match=pattern):
        make_trainer_optimizers(model, training_args(tmp_path, max_steps=2, **args_kw), rank=RANK, **wrap_kw)
    assert not lrc.is_wrapped(model)


def test_make_trainer_optimizers_takes_hyper_parameters_from_args(tmp_path):
    model = llama()
    args = training_args(tmp_path, max_steps=10, learning_rate=3e-3, adam_beta1=0.8, adam_beta2=0.95,
                         adam_epsilon=1e-6, weight_decay=0.1, warmup_steps=0)
    opt, sched = make_trainer_optimizers(model, args, rank=RANK, update_gap=3)
    groups = opt.param_groups
    assert all(g["lr"] == 3e-3 and g["betas"] == (0.8, 0.95) and g["eps"] == 1e-6 for g in groups)
    assert {g["weight_decay"] for g in groups} == {0.1, 0.0}  # norms and biases without decay
    assert opt.refresh_control.update_gap == 3 and isinstance(sched, torch.optim.lr_scheduler.LambdaLR)


def test_trainer_fused(tmp_path):
    """fused=True (updates inside backward) under Trainer with gradient_accumulation_steps=1."""
    model = llama()
    args = training_args(tmp_path, max_steps=6, gradient_accumulation_steps=1, per_device_train_batch_size=4,
                         max_grad_norm=0.0)
    opt, sched = make_trainer_optimizers(model, args, rank=RANK, fused=True)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), optimizers=(opt, sched))
    trainer.train()
    logs = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert opt.global_step == 6 and logs[-1] < logs[0]


def test_trainer_bf16_autocast(tmp_path):
    """bf16=True (autocast, no GradScaler): fp32 weights and carriers, the loss goes down."""
    model = llama()
    args = training_args(tmp_path, max_steps=8, bf16=True)
    opt, sched = make_trainer_optimizers(model, args, rank=RANK)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), optimizers=(opt, sched))
    trainer.train()
    logs = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert opt.global_step == 8 and logs[-1] < 0.9 * logs[0]
    assert {m.lowrank_grad.dtype for m in lowrank_layers(model).values()} == {torch.float32}


# -- accelerate ---------------------------------------------------------------------------------------------
def batches_of(n: int, size: int = 2, seed: int = 0) -> list[dict]:
    data = Tokens(n=n * size, seed=seed)
    return [default_data_collator([data[i * size + j] for j in range(size)]) for i in range(n)]


def test_accelerate_prepare_steps_like_the_plain_loop():
    """Accelerator.prepare(model, opt): the AcceleratedOptimizer passes step / zero_grad / state_dict through,
    accelerator.clip_grad_norm_ clips the rank-r gradients with the rest; weights equal the unprepared run's."""
    plain, model = llama(), llama()
    opt_plain = lrc.wrap_model(plain, rank=RANK, lr=1e-2, update_gap=2)
    opt = lrc.wrap_model(model, rank=RANK, lr=1e-2, update_gap=2)
    accelerator = Accelerator(cpu=True)
    model, opt = accelerator.prepare(model, opt)
    assert isinstance(opt, AcceleratedOptimizer) and lowrank_optimizer(opt) is opt.optimizer
    for batch in batches_of(4):
        plain(**batch).loss.backward()
        norm_plain = torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.5)
        opt_plain.step()
        opt_plain.zero_grad()
        accelerator.backward(model(**batch).loss)
        norm = accelerator.clip_grad_norm_(model.parameters(), 0.5)
        assert norm == norm_plain and norm > 0.5  # so the clip did act
        opt.step()
        opt.zero_grad()
        assert all(p.grad is None for p in model.parameters())
    assert opt.state_dict()["global_step"] == 4
    assert_same_weights(plain, accelerator.unwrap_model(model))
    assert_same_optimizer(opt_plain, opt.optimizer)


def test_accelerate_gradient_accumulation_and_save_state(tmp_path):
    """accelerator.accumulate with gradient_accumulation_steps=2 equals wrap_model(accumulate=2) on loss / 2;
    accelerator.save_state / load_state restore the optimizer exactly."""
    plain, model = llama(), llama()
    opt_plain = lrc.wrap_model(plain, rank=RANK, lr=1e-2, update_gap=2, accumulate=2)
    opt = lrc.wrap_model(model, rank=RANK, lr=1e-2, update_gap=2)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model, opt = accelerator.prepare(model, opt)
    for batch in batches_of(6):
        (plain(**batch).loss / 2).backward()
        opt_plain.step()
        opt_plain.zero_grad()
        with accelerator.accumulate(model):
            accelerator.backward(model(**batch).loss)
            opt.step()
            opt.zero_grad()
    assert opt_plain.global_step == opt.optimizer.global_step == 3
    torch.testing.assert_close(dict(accelerator.unwrap_model(model).state_dict()), dict(plain.state_dict()),
                               rtol=1e-6, atol=1e-7)
    accelerator.save_state(str(tmp_path))

    restored = llama()
    opt_restored = lrc.wrap_model(restored, rank=RANK, lr=1e-2, update_gap=2)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)  # a new run: one model, one optimizer
    restored, opt_restored = accelerator.prepare(restored, opt_restored)
    accelerator.load_state(str(tmp_path))
    assert_same_optimizer(opt.optimizer, opt_restored.optimizer)
    assert_same_weights(model, restored)
    for a, b in zip(lowrank_layers(model).values(), lowrank_layers(restored).values()):
        assert torch.equal(a.lowrank_idx, b.lowrank_idx)


# -- save_pretrained ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [llama, gpt2], ids=["llama", "gpt2-conv1d"])
def test_save_pretrained_of_a_wrapped_model_loads_into_a_fresh_model(tmp_path, make):
    model = make()
    make().save_pretrained(tmp_path / "plain")
    opt = lrc.wrap_model(model, rank=RANK, lr=1e-2)
    x = batches_of(1, size=2)[0]
    for _ in range(3):
        model(**x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(tmp_path / "wrapped")
    saved = load_file(tmp_path / "wrapped" / "model.safetensors")
    assert saved.keys() == load_file(tmp_path / "plain" / "model.safetensors").keys()
    assert not any("lowrank" in k for k in saved)
    fresh = type(model).from_pretrained(tmp_path / "wrapped")
    assert not lrc.is_wrapped(fresh)
    assert_same_weights(fresh, model)
    model.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x["input_ids"]).logits, model(x["input_ids"]).logits)
    # and back into a wrapped model, strictly
    other = make(seed=1)
    lrc.wrap_model(other, rank=RANK)
    other.load_state_dict(fresh.state_dict(), strict=True)
    assert_same_weights(other, model)


# -- examples -----------------------------------------------------------------------------------------------
EXAMPLES = os.path.join(os.path.dirname(__file__), os.pardir, "examples")


@pytest.mark.parametrize("script, argv", [
    ("hf_trainer.py", ["--steps", "4", "--rank", "8"]),
    ("hf_trainer.py", ["--steps", "4", "--rank", "8", "--arch", "gpt2"]),
    ("accelerate_example.py", ["--steps", "3"]),
], ids=["hf_trainer-llama", "hf_trainer-gpt2", "accelerate"])
def test_examples_run(tmp_path, monkeypatch, capsys, script, argv):
    path = os.path.join(EXAMPLES, script)
    if script == "hf_trainer.py":
        argv = argv + ["--out", str(tmp_path)]
    monkeypatch.setattr("sys.argv", [path] + argv)
    runpy.run_path(path, run_name="__main__")
    out = capsys.readouterr().out
    assert ("reloaded into a plain" in out) if script == "hf_trainer.py" else ("weights equal True" in out)

