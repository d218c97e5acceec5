"""Tokens/s and peak memory of one DPO training step: fused heads vs the model's own materialised logits.

    python benchmarks/bench_train.py         # GPU: Llama-3 1B-class config (random weights, V = 128,256), seq 2,048
                                             # CPU: a tiny config (smoke)

A step = [chosen; rejected] backbone forward, DPO loss (precomputed reference log-probs), backward,
AdamW step. `fusealign` projects only completion positions through the fused head; `materialised`
calls the model (full (2B, T, V) logits), log-softmax, gather — what TRL's DPOTrainer does without Liger.
On the GPU it also finds the longest sequence that fits at batch 1 for each (doubling until OOM).
`trl` / `trl_liger`: TRL's DPOTrainer on the same model config and the same token counts (a synthetic
word-level tokenizer over the vocabulary), with and without `use_liger_kernel`, when `trl` imports
(carried wheels on the GPU); the median step time comes from a callback at each step end.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, emit, header, write  # noqa: E402

import fusealign as fa  # noqa: E402
from fusealign.engine.data import Example  # noqa: E402
from fusealign.engine.objectives import dpo_objective, pair_batch  # noqa: E402
from fusealign.losses import DPOOptions  # noqa: E402


def llama_1b(vocab=128256):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                       tie_word_embeddings=True, rope_theta=500000.0)


def tiny(vocab=1024):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)


def examples(B, seq, prompt, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(1, V, (n,), generator=g).tolist()  # noqa: E731
    return [Example(ids(prompt), [ids(seq - prompt), ids(seq - prompt)], f"synthetic:{i}") for i in range(B)]


def materialised_loss(model, exs, ref):
    batch = pair_batch(exs, pad_id=0, pack=False).to(next(model.parameters()).device)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (2B, T, V)
    keep = batch.targets != -100
    lp = torch.log_softmax(logits.float(), -1).gather(-1, batch.targets.clamp_min(0)[..., None]).squeeze(-1)
    seq = (lp * keep).sum(-1)
    B = len(exs)
    return fa.dpo_loss(seq[:B], seq[B:], ref[:, 0], ref[:, 1])[0].mean()


def trl_step_ms(cfg, dtype, device, pairs, seq, reps, liger: bool) -> float:
    """Median step time of TRL's DPOTrainer on random word sequences of the same lengths."""
    import tempfile

    from datasets import Dataset
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    vocab = {f"w{i}": i for i in range(cfg.vocab_size)}
    core = Tokenizer(WordLevel(vocab, unk_token="w0"))
    core.pre_tokenizer = WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="w0", eos_token="w1", bos_token="w2")
    g = torch.Generator().manual_seed(0)
    words = lambda n: " ".join(f"w{i}" for i in torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist())  # noqa
    prompt = seq // 8
    rows = [{"prompt": words(prompt), "chosen": words(seq - prompt - 1), "rejected": words(seq - prompt - 1)}
            for _ in range(pairs * (reps + 2))]
    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if device == "cuda":
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(output_dir=tmp, per_device_train_batch_size=pairs, max_steps=reps + 1, max_length=seq,
                         learning_rate=1e-6, logging_steps=1000, save_strategy="no", report_to=[], bf16=device == "cuda",
                         gradient_checkpointing=True, use_liger_kernel=liger, use_cpu=device != "cuda",
                         precompute_ref_log_probs=True)  # as our step: reference log-probs precomputed
        import pyarrow as pa

        # A fixed fingerprint: datasets' content hashing fails to pickle some pyarrow types in some installs.
        data = Dataset(pa.Table.from_pylist(rows), fingerprint="bench-train")
        trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[Clock()])
        trainer.train()
    steady = sorted(times[1:]) or times
    return steady[len(steady) // 2] * 1e3


def step_fn(impl, model, opt, exs, ref):
    def step():
        opt.zero_grad(set_to_none=True)
        if impl == "fusealign":
            loss = dpo_objective(model, exs, pad_id=0, pack=False, options=DPOOptions(beta=0.1), ref_logps=ref)[0]
        else:
            loss = materialised_loss(model, exs, ref)
        loss.backward()
        opt.step()
    return step


def timed(step, device, reps):
    step()  # warm-up (kernels compile, allocator settles)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return times[len(times) // 2], peak


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--pairs", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", type=Path)
    p.add_argument("--skip-trl", action="store_true", help="no TRL DPOTrainer runs (the suite's CPU dry run)")
    p.add_argument("--no-max-seq", action="store_true", help="skip the longest-sequence search on the GPU")
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    cfg = llama_1b() if gpu else tiny()
    seq = args.seq or (2048 if gpu else 128)
    dtype = torch.bfloat16 if gpu else torch.float32
    out = args.out or RESULTS / ("train-" + ("cuda" if gpu else "cpu-smoke") + ".json")
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(args.device)
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    head, records = header("benchmarks/bench_train.py", args.device), []
    for impl in ("fusealign", "materialised"):
        exs = examples(args.pairs, seq, seq // 8, cfg.vocab_size)
        ref = torch.randn(args.pairs, 2, device=args.device) - 100
        rec = dict(op="dpo_step", impl=impl, mode="train_step", N=2 * args.pairs * seq, H=cfg.hidden_size,
                   V=cfg.vocab_size, dtype=str(dtype).replace("torch.", ""), seq=seq, pairs=args.pairs)
        try:
            sec, peak = timed(step_fn(impl, model, opt, exs, ref), args.device, args.reps)
            rec.update(median_ms=sec * 1e3, tokens_per_s=rec["N"] / sec, peak_mem_bytes=peak)
        except Exception as e:  # OOM on the GPU is a result, not a crash
            rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        if gpu and not args.no_max_seq:  # the longest sequence that fits at batch 1
            longest, L = None, 1024
            while L <= 131072:
                try:
                    timed(step_fn(impl, model, opt, examples(1, L, 64, cfg.vocab_size),
                                  torch.zeros(1, 2, device=args.device)), args.device, 1)
                    longest, L = L, 2 * L
                except torch.OutOfMemoryError:
                    break
                finally:
                    torch.cuda.empty_cache()
            rec["max_seq_batch1"] = longest
        records.append(rec)
        print(rec, flush=True)
        emit(dict(kind="bench", **rec))
        write(out, head, records)
    del model, opt
    for impl, liger in () if args.skip_trl else (("trl", False), ("trl_liger", True)):
        rec = dict(op="dpo_step", impl=impl, mode="train_step", N=2 * args.pairs * seq, H=cfg.hidden_size,
                   V=cfg.vocab_size, dtype=str(dtype).replace("torch.", ""), seq=seq, pairs=args.pairs)
        try:
            ms = trl_step_ms(cfg, dtype, args.device, args.pairs, seq, args.reps, liger)
            rec.update(median_ms=ms, tokens_per_s=rec["N"] / (ms / 1e3))
        except Exception as e:  # trl / liger missing, or unsupported here
            rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        records.append(rec)
        print(rec, flush=True)
        emit(dict(kind="bench", **rec))
        write(out, head, records)
    ok = [r for r in records if "tokens_per_s" in r]
    if len(ok) == 2:
        print(f"fused / materialised tokens/s: {ok[0]['tokens_per_s'] / ok[1]['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
