"""`fusealign compare`: reward-based (SFT → RM → PPO) versus reward-free (DPO) on the built-in task.

Pipeline, one command: SFT → preference pairs labelled by the hidden ground-truth reward → reward
model → PPO; and DPO from the same SFT policy on the same pairs. Every policy is then evaluated on
held-out prompts: ground-truth reward of its samples, exact KL to the SFT reference (sum over the
sampled completion of the full-vocabulary KL, `fa.linear_kl`), win rate against SFT samples under
the ground-truth preference (ties count ½), wall time, tokens/s and peak memory. A sweep over β (DPO)
and the KL coefficient (PPO) traces the reward-versus-KL frontier (Rafailov et al. 2023, Fig. 2). A
second setting trains the RM and DPO on out-of-distribution pairs (Xu et al. 2024 claim DPO suffers
more there). The numbers are whatever the runs give.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from fusealign.kernels import linear_kl, segment_sum

from . import task
from .checkpoint import latest_checkpoint, write_text_atomic
from .config import CompareConfig, DPOConfig, PPOConfig, RMConfig, SFTConfig
from .data import collate
from .models import completion_inputs, load_causal_lm
from .recipes import check_output_dir, load_tokenizer, run_dpo, run_ppo, run_rm, run_sft
from .sampling import sample
from .trainer import resolve_device

PRESETS = {
    # name: stage sizes
    "smoke": dict(sft_steps=40, rm_steps=40, dpo_steps=30, ppo_steps=6, ppo_batch=16, eval_prompts=48,
                  betas=(0.5,), kl_coefs=(0.05,)),
    "default": dict(sft_steps=200, rm_steps=200, dpo_steps=200, ppo_steps=60, ppo_batch=32, eval_prompts=256,  # ~1 min
                    betas=(0.1, 0.5, 2.0), kl_coefs=(0.01, 0.05, 0.2)),
    "gpu": dict(sft_steps=500, rm_steps=500, dpo_steps=500, ppo_steps=200, ppo_batch=64, eval_prompts=1024,
                betas=(0.05, 0.1, 0.3, 0.5, 1.0, 2.0), kl_coefs=(0.005, 0.01, 0.03, 0.05, 0.1, 0.2)),
}


def _floats(text, default):
    return tuple(float(x) for x in text.split(",")) if text else tuple(default)


def kl_to_reference(policy, ref, batch, *, backend: str = "auto") -> torch.Tensor:
    """Exact KL(π‖π_ref) summed over each sequence's completion positions: (S,) — the whole vocabulary at
    every position (`fa.linear_kl`), each head with its own bias and the family's softcap / temperature."""
    p = completion_inputs(policy, batch)
    r = completion_inputs(ref, batch)
    tok_kl = linear_kl(p.hidden, p.head.weight, r.hidden, r.head.weight, bias=p.head.bias, ref_bias=r.head.bias,
                       softcap=p.head.softcap, temperature=p.head.temperature, backend=backend)  # (N_c,)
    return segment_sum(tok_kl, p.seq_ids, batch.num_sequences)


@torch.no_grad()
def evaluate(policy_dir: str, sft, tok, prompts, sft_samples, *, seed: int, backend: str) -> dict:
    """Ground-truth reward, exact KL to SFT, win rate vs SFT for one policy."""
    policy = load_causal_lm(policy_dir).to(next(sft.parameters()).device).eval()
    outs = sample(policy, tok, prompts, max_new_tokens=24, seed=seed + 1)
    rewards = [task.reward(tok.decode(ids), ended) for ids, ended in outs]
    sft_rewards = [task.reward(tok.decode(ids), ended) for ids, ended in sft_samples]
    wins = [1.0 if r > s else 0.5 if r == s else 0.0 for r, s in zip(rewards, sft_rewards)]
    kls = []
    for i in range(0, len(prompts), 64):
        seqs = [(p, ids + ([tok.eos_token_id] if e else [])) for p, (ids, e) in zip(prompts[i:i + 64], outs[i:i + 64])]
        seqs = [s for s in seqs if s[1]] or [(prompts[i], [tok.eos_token_id])]
        batch = collate(seqs, pad_id=tok.pad_token_id, pack=True).to(next(sft.parameters()).device)
        kls.append(kl_to_reference(policy, sft, batch, backend=backend))
    n = len(rewards)
    mean = sum(rewards) / n
    sd = (sum((r - mean) ** 2 for r in rewards) / max(1, n - 1)) ** 0.5
    return {"gt_reward": mean, "gt_reward_se": sd / n ** 0.5, "kl_to_sft": torch.cat(kls).mean().item(),
            "win_rate_vs_sft": sum(wins) / n, "eos_rate": sum(e for _, e in outs) / n}


def _stage(name, fn, cfg, results: dict):
    t0 = time.perf_counter()
    summary = fn(cfg)
    wall = time.perf_counter() - t0
    tps = summary.get("tokens_per_s") or summary.get("train_tokens_per_s")
    results[name] = {"wall_s": wall, "tokens_per_s": tps, "peak_mem_bytes": summary.get("peak_mem_bytes"),
                     "dir": str(latest_checkpoint(Path(cfg.output_dir)))}
    return results[name]["dir"]


def plot(rows: list, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # a declared dependency; say so rather than skip the plot silently
        print("fusealign compare: matplotlib is not installed (pip install matplotlib): no frontier plot",
              file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for method, marker in (("PPO", "o"), ("DPO", "s"), ("SFT", "*")):
        for setting, fill in (("in", True), ("ood", False)):
            pts = sorted((r["kl_to_sft"], r["gt_reward"]) for r in rows if r["method"] == method and r["setting"] == setting)
            if not pts:
                continue
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker=marker, linestyle="-" if len(pts) > 1 else "", markersize=8,
                    fillstyle="full" if fill else "none", label=f"{method} ({setting}-distribution pairs)")
    ax.set_xlabel("KL(π ‖ π_SFT) per completion (exact, nats)")
    ax.set_ylabel("ground-truth reward of samples")
    ax.set_title("Reward vs KL frontier, built-in task")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run_compare(cfg: CompareConfig) -> dict:
    p = PRESETS[cfg.preset]
    check_output_dir(cfg.output_dir)
    out = Path(cfg.output_dir)
    # resume=True: a finished stage is reused, an interrupted one continues — the study can be re-run in place.
    common = dict(seed=cfg.seed, device=cfg.device, backend=cfg.backend, resume=True)
    stages: dict = {}
    sft_dir = _stage("sft", run_sft, SFTConfig(output_dir=str(out / "sft"), max_steps=p["sft_steps"], **common),
                     stages)
    policies = [("SFT", "in", None, sft_dir)]
    settings = [("in", "builtin:pairs")] + ([("ood", "builtin:pairs-ood")] if cfg.ood else [])
    for setting, data in settings:
        rm_dir = _stage(f"rm-{setting}", run_rm, RMConfig(output_dir=str(out / f"rm-{setting}"), data=data,
                                                          sft_model=sft_dir, max_steps=p["rm_steps"], center_coef=0.01,
                                                          **common), stages)
        kl_coefs = _floats(cfg.kl_coefs, p["kl_coefs"]) if setting == "in" else (0.05,)
        betas = _floats(cfg.betas, p["betas"]) if setting == "in" else (0.5,)
        for kc in kl_coefs:
            name = f"ppo-{setting}-kl{kc:g}"
            d = _stage(name, run_ppo, PPOConfig(output_dir=str(out / name), sft_model=sft_dir, reward_model=rm_dir,
                                                max_steps=p["ppo_steps"], batch_size=p["ppo_batch"], kl_coef=kc,
                                                **common), stages)
            policies.append(("PPO", setting, kc, d))
        for b in betas:
            name = f"dpo-{setting}-b{b:g}"
            d = _stage(name, run_dpo, DPOConfig(output_dir=str(out / name), data=data, sft_model=sft_dir, beta=b,
                                                max_steps=p["dpo_steps"], eval_samples=8, **common), stages)
            policies.append(("DPO", setting, b, d))

    device = resolve_device(cfg.device)
    tok = load_tokenizer(sft_dir)
    sft = load_causal_lm(sft_dir).to(device).eval()
    prompts = [[tok.bos_token_id] + tok.encode(x, add_special_tokens=False)
               for x in task.eval_prompts(p["eval_prompts"], seed=cfg.seed + 7)]
    sft_samples = sample(sft, tok, prompts, max_new_tokens=24, seed=cfg.seed + 2)
    rows = []
    for method, setting, knob, d in policies:
        ev = evaluate(d, sft, tok, prompts, sft_samples, seed=cfg.seed, backend=cfg.backend)
        stage = next((v for k, v in stages.items() if v["dir"] == d), {})
        rows.append({"method": method, "setting": setting, "knob": knob, **ev,
                     "wall_s": stage.get("wall_s"), "tokens_per_s": stage.get("tokens_per_s"),
                     "peak_mem_bytes": stage.get("peak_mem_bytes")})
    report = {"config": asdict(cfg), "preset": p, "device": str(device), "rows": rows, "stages": stages,
              "knob": "PPO: KL coefficient; DPO: β"}
    write_text_atomic(out / "compare.json", json.dumps(report, indent=1, default=str))
    report["plot"] = str(out / "frontier.png") if plot(rows, out / "frontier.png") else None
    print(table(rows))
    return report


def table(rows: list) -> str:
    head = f"{'method':6} {'pairs':5} {'knob':>6} {'gt reward':>14} {'KL→SFT':>8} {'win vs SFT':>10} {'EOS':>5} {'wall s':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        knob = "-" if r["knob"] is None else f"{r['knob']:g}"
        wall = "-" if r["wall_s"] is None else f"{r['wall_s']:.1f}"
        lines.append(f"{r['method']:6} {r['setting']:5} {knob:>6} {r['gt_reward']:>7.3f} ±{r['gt_reward_se']:.3f} "
                     f"{r['kl_to_sft']:>8.2f} {r['win_rate_vs_sft']:>10.3f} {r['eos_rate']:>5.2f} {wall:>7}")
    return "\n".join(lines)
