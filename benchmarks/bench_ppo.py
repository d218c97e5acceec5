"""Time per PPO iteration — rollout, scoring, update separately — and peak memory, fused heads vs
materialised logits, on a Llama-3 1B-class config with random weights (GPU) or a tiny one (CPU smoke).

    python benchmarks/bench_ppo.py

rollout  sampling with a KV cache (identical in both: the head forms one full-vocabulary row per step)
scoring  old-policy and reference log-probs of the sampled completions, no grad
         fused: backbone + fa.linear_logps on completion positions; materialised: model(...).logits → log-softmax
update   one PPO minibatch pass (clipped surrogate, backward, AdamW step)
         fused: the engine's score_tokens + fa.ppo_policy_loss (as PPOTrainer); materialised: full logits,
         log-softmax, gather, the same clipped loss
Not yet here: TRL's PPO trainer in the same run (needs the carried wheels and a GPU session).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import llama_1b, tiny  # noqa: E402
from common import RESULTS, header, write  # noqa: E402

import fusealign as fa  # noqa: E402
from fusealign.engine.data import collate  # noqa: E402
from fusealign.engine.models import score_tokens  # noqa: E402


def clock(fn, device):
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return out, (time.perf_counter() - t0) * 1e3, (torch.cuda.max_memory_allocated() if device == "cuda" else None)


def token_logps(model, batch, fused: bool, entropy: bool = False):
    """Completion-token log-probs (N_c,): the engine's one head path (fused), or the model's own logits."""
    if fused:
        s = score_tokens(model, batch, entropy=entropy)
        return (s.logps, s.entropy) if entropy else s.logps
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (R, L, V)
    keep = batch.targets != -100
    return torch.log_softmax(logits.float(), -1)[keep].gather(1, batch.targets[keep][:, None]).squeeze(1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prompts", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    cfg = llama_1b() if gpu else tiny()
    P, new, plen = args.prompts or (64 if gpu else 8), args.new_tokens or (512 if gpu else 16), 128 if gpu else 8
    dtype = torch.bfloat16 if gpu else torch.float32
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(args.device)
    ref = AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(args.device).requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, cfg.vocab_size, (P, plen), generator=g).to(args.device)
    out = args.out or RESULTS / ("ppo-" + ("cuda" if gpu else "cpu-smoke") + ".json")
    head, records = header("benchmarks/bench_ppo.py", args.device), []

    seqs, t_roll, m_roll = clock(lambda: policy.generate(input_ids=prompts, do_sample=True, max_new_tokens=new,
                                                         min_new_tokens=new, pad_token_id=0), args.device)
    batch = collate([(s[:plen].tolist(), s[plen:].tolist()) for s in seqs], pad_id=0, pack=False).to(args.device)
    adv = torch.randn(int((batch.targets != -100).sum()), device=args.device)
    for impl, fused in (("fusealign", True), ("materialised", False)):
        rec = dict(op="ppo_iteration", impl=impl, N=int((batch.targets != -100).sum()), H=cfg.hidden_size,
                   V=cfg.vocab_size, dtype=str(dtype).replace("torch.", ""), rollout_ms=t_roll,
                   rollout_peak_mem_bytes=m_roll)
        try:
            def score():
                with torch.no_grad():
                    return token_logps(policy, batch, fused), token_logps(ref, batch, fused)
            (old, _), rec["score_ms"], rec["score_peak_mem_bytes"] = clock(score, args.device)

            def update():
                opt.zero_grad(set_to_none=True)
                if fused:
                    logps, entropy = token_logps(policy, batch, True, entropy=True)
                    loss = fa.ppo_policy_loss(logps, entropy, old, adv, torch.ones_like(adv, dtype=torch.bool))[0]
                else:
                    ratio = (token_logps(policy, batch, False) - old).exp()
                    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)).mean()
                loss.backward()
                opt.step()
            update()  # warm-up (kernel compilation)
            _, rec["update_ms"], rec["update_peak_mem_bytes"] = clock(update, args.device)
            rec["median_ms"] = rec["rollout_ms"] + rec["score_ms"] + rec["update_ms"]
            rec["tokens_per_s"] = rec["N"] / (rec["median_ms"] / 1e3)
        except Exception as e:  # OOM is a result
            rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        records.append(rec)
        print(rec, flush=True)
        write(out, head, records)


if __name__ == "__main__":
    main()
