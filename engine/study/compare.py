"""`fusealign compare`: reward-based (SFT → RM → PPO / GRPO) versus reward-free (DPO) on the built-in task.

Per seed, one command runs the whole pipeline: SFT → preference pairs labelled by the hidden ground-truth
reward → reward model → PPO (critic, GAE) and GRPO (group-normalised advantages, no critic); and DPO from
the same SFT policy — on the same labelled pairs (offline), on pairs sampled from the SFT policy and
labelled by the reward model (on-policy), and on pairs re-sampled from the current DPO policy every K steps
(iterative), the mitigation Xu et al. 2024 report. A second setting trains the RM and offline DPO on
out-of-distribution pairs. Every policy is evaluated on held-out prompts: ground-truth reward of its samples,
exact KL to the SFT reference (`fa.linear_kl` over the full vocabulary, summed over the sampled completion),
win rate against SFT samples under the ground-truth reward (ties ½).

Across seeds (`--seeds`, each re-running SFT, RM, PPO, GRPO and DPO) every number is a mean with a 95 %
Student-t interval, and "PPO or DPO?" is answered by paired differences at matched KL (`report.py`).

Every stage of every seed is a task on a pool of worker processes (`--jobs`): per seed, SFT and the reward
models first, then each PPO / GRPO / DPO stage, trained and evaluated. Determinism: each task runs with a fixed
thread count (`--threads`, default 1: more threads change the order of floating-point reductions and do not
speed up a 0.1 M-parameter model) and re-seeds every global generator from its seed; every random draw derives
from the seed (model and value-head initialisation, data order, rollouts and minibatch order, on-policy pairs,
evaluation prompts and samples). So the results depend neither on --jobs nor on the order tasks finish in, and
the same command twice on one machine writes a byte-identical `compare.json` apart from its last key, `timing`.
The numbers are whatever the runs give.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from fusealign.kernels import linear_kl, segment_sum

from fusealign.losses import DPOOptions, GRPOOptions

from ..checkpoint import latest_checkpoint, write_text_atomic
from ..config import DPOConfig, PPOConfig, RMConfig, SFTConfig
from ..data import collate
from ..errors import UserError
from ..models import completion_inputs, load_causal_lm
from ..recipes import check_output_dir, load_tokenizer, run_dpo, run_ppo, run_rm, run_sft
from ..rollout import RolloutConfig, check_available
from ..runtime import resolve_device, set_threads
from ..sampling import sample
from . import task
from .claims import claims_markdown, judge
from .config import CompareConfig, parse_seeds
from .presets import DPO_DATA, PRESETS, SETTINGS  # noqa: F401  (DPO_DATA re-exported)
from .report import (MATCHED_KL, aggregate, diff_table, headline, matched_differences, plot, report_markdown, sentences,
                     table)

# The GRPO rows' loss (TRL 1.16's name, stated in the row): bnpo = PPO's clipped surrogate as a token mean over each
# minibatch, the loss the committed GRPO results were run with (TRL's default, dapo, divides by the rollout's
# tokens per minibatch instead).
GRPO_LOSS_TYPE = "bnpo"
RECIPES = {"ppo": run_ppo, "dpo": run_dpo}
MAX_NEW_TOKENS = 24  # evaluation samples: longer than any SFT completion (≤ 11 tokens), so EOS can be missed


def _floats(text, default):
    return tuple(float(x) for x in text.split(",")) if text else tuple(default)


def seeds_of(cfg: CompareConfig) -> tuple:
    return parse_seeds(cfg.seeds) or tuple(PRESETS[cfg.preset]["seeds"])


def make_deterministic(threads: int) -> None:
    """Fixed intra-op threads; deterministic kernels where torch has a choice (warn where it has none)."""
    set_threads(threads)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS reductions on CUDA
    torch.use_deterministic_algorithms(True, warn_only=True)


# --- evaluation --------------------------------------------------------------------------------------------
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
    """Ground-truth reward, exact KL to SFT, win rate vs SFT, EOS rate of one policy on held-out prompts."""
    device = next(sft.parameters()).device
    policy = load_causal_lm(policy_dir).to(device).eval()
    outs = sample(policy, tok, prompts, max_new_tokens=MAX_NEW_TOKENS, seed=seed + 1)
    rewards = [task.reward(tok.decode(ids), ended) for ids, ended in outs]
    sft_rewards = [task.reward(tok.decode(ids), ended) for ids, ended in sft_samples]
    wins = [1.0 if r > s else 0.5 if r == s else 0.0 for r, s in zip(rewards, sft_rewards)]
    kls = []
    for i in range(0, len(prompts), 64):
        seqs = [(p, ids + ([tok.eos_token_id] if e else [])) for p, (ids, e) in zip(prompts[i:i + 64], outs[i:i + 64])]
        seqs = [s for s in seqs if s[1]] or [(prompts[i], [tok.eos_token_id])]
        batch = collate(seqs, pad_id=tok.pad_token_id, pack=True).to(device)
        kls.append(kl_to_reference(policy, sft, batch, backend=backend))
    n = len(rewards)
    return {"gt_reward": sum(rewards) / n, "kl_to_sft": torch.cat(kls).mean().item(),
            "win_rate_vs_sft": sum(wins) / n, "eos_rate": sum(e for _, e in outs) / n}


# --- the pipeline as tasks: per seed SFT → RMs, then every policy stage (trained, then evaluated) ----------
@dataclass
class Stage:
    """One policy of one seed: how to train it (a recipe and its config) and where its row goes."""

    seed: int
    method: str  # SFT, PPO, GRPO, DPO, DPO-onpolicy, DPO-iterative
    setting: str  # in / ood: the pairs the reward model (and offline DPO) trained on
    knob: Optional[float]  # KL coefficient (PPO, GRPO) or β (DPO)
    name: str  # run directory under seed<k>/
    recipe: Optional[str]  # "ppo" or "dpo" (None: the SFT policy itself)
    cfg: object = None


def seed_everything(seed: int) -> None:
    """Every global generator, explicitly (the stages seed their own generators too; this makes a worker
    process's earlier tasks irrelevant to the next one)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _timed(fn, cfg) -> dict:
    t0 = time.perf_counter()
    summary = fn(cfg)
    return {"wall_s": time.perf_counter() - t0,
            "tokens_per_s": summary.get("tokens_per_s") or summary.get("train_tokens_per_s"),
            "peak_mem_bytes": summary.get("peak_mem_bytes")}


def prepare_seed(cfg: CompareConfig, p: dict, seed: int) -> dict:
    """SFT, then the reward model of each setting. -> {"dirs": {stage: checkpoint}, "timing": {stage: …}}."""
    seed_everything(seed)
    out = Path(cfg.output_dir) / f"seed{seed}"
    common = dict(seed=seed, device=cfg.device, backend=cfg.backend, threads=cfg.threads, resume=True)
    sft = SFTConfig(output_dir=str(out / "sft"), max_steps=p["sft_steps"], **common)
    timing = {"sft": _timed(run_sft, sft)}
    dirs = {"sft": str(latest_checkpoint(Path(sft.output_dir)))}
    for setting, data in SETTINGS[: 2 if cfg.ood else 1]:
        rm = RMConfig(output_dir=str(out / f"rm-{setting}"), data=data, sft_model=dirs["sft"], max_steps=p["rm_steps"],
                      center_coef=0.01, **common)
        timing[f"rm-{setting}"] = _timed(run_rm, rm)
        dirs[f"rm-{setting}"] = str(latest_checkpoint(Path(rm.output_dir)))
    return {"dirs": dirs, "timing": timing}


def policy_stages(cfg: CompareConfig, p: dict, seed: int, dirs: dict) -> list:
    """Every policy of one seed, in table order: SFT; per setting PPO sweep, GRPO, DPO offline / on-policy / iterative."""
    out = Path(cfg.output_dir) / f"seed{seed}"
    common = dict(seed=seed, device=cfg.device, backend=cfg.backend, threads=cfg.threads, resume=True)
    dpo_data = [x for x in cfg.dpo_data.split(",") if x]
    stages = [Stage(seed, "SFT", "in", None, "sft", None)]
    # --rollout and its --vllm-* options: for every stage that samples while it trains (PPO, GRPO, on-policy and
    # iterative DPO); evaluation samples with HF generate whatever the engine (one measurement for every row)
    rollout = {f.name: getattr(cfg, f.name) for f in fields(RolloutConfig)}
    for setting, data in SETTINGS[: 2 if cfg.ood else 1]:
        rl = dict(sft_model=dirs["sft"], reward_model=dirs[f"rm-{setting}"], max_steps=p["ppo_steps"], **common,
                  **rollout)
        kl_coefs = _floats(cfg.kl_coefs, p["ppo_kl_coefs"]["in"]) if setting == "in" else p["ppo_kl_coefs"][setting]
        for kc in kl_coefs:
            name = f"ppo-{setting}-kl{kc:g}"
            stages.append(Stage(seed, "PPO", setting, kc, name, "ppo", PPOConfig(
                output_dir=str(out / name), batch_size=p["ppo_batch"], kl_coef=kc, **rl)))
        for kc in p["grpo_kl_coefs"][setting] if cfg.grpo else ():
            name, k = f"grpo-{setting}-kl{kc:g}", p["grpo_generations"]
            stages.append(Stage(seed, "GRPO", setting, kc, name, "ppo", PPOConfig(
                output_dir=str(out / name), advantage="grpo", num_generations=k, batch_size=p["ppo_batch"] // k,
                kl_coef=kc, grpo=GRPOOptions(loss_type=GRPO_LOSS_TYPE), **rl)))
        dpo = dict(sft_model=dirs["sft"], max_steps=p["dpo_steps"], eval_samples=8, **common)
        betas = _floats(cfg.betas, p["dpo_betas"]["in"]) if setting == "in" else p["dpo_betas"][setting]
        for b in betas if "offline" in dpo_data else ():
            name = f"dpo-{setting}-b{b:g}"
            stages.append(Stage(seed, "DPO", setting, b, name, "dpo", DPOConfig(
                output_dir=str(out / name), data=data, loss=DPOOptions(beta=b), **dpo)))
        b = p["main_beta"]
        K = p["resample_every"]
        for kind, every, n in (("onpolicy", 0, p["onpolicy_prompts"]), ("iterative", K, K * DPOConfig.batch_size)):
            if kind in dpo_data:
                name = f"dpo-{kind}-{setting}-b{b:g}"
                stages.append(Stage(seed, f"DPO-{kind}", setting, b, name, "dpo", DPOConfig(
                    output_dir=str(out / name), data="onpolicy", reward_model=dirs[f"rm-{setting}"],
                    loss=DPOOptions(beta=b),
                    onpolicy_prompts=n, resample_every=every, **dpo, **rollout)))
    return stages


def train_and_evaluate(cfg: CompareConfig, p: dict, stage: Stage, sft_dir: str) -> tuple:
    """Train one stage (resumed or reused if its run directory has it), then evaluate it. -> (row, timing)."""
    seed_everything(stage.seed)
    timing = {}
    policy_dir = sft_dir
    if stage.recipe is not None:
        timing[stage.name] = _timed(RECIPES[stage.recipe], stage.cfg)
        policy_dir = str(latest_checkpoint(Path(stage.cfg.output_dir)))
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    tok = load_tokenizer(sft_dir)
    sft = load_causal_lm(sft_dir).to(device).eval()
    prompts = [[tok.bos_token_id] + tok.encode(x, add_special_tokens=False)
               for x in task.eval_prompts(p["eval_prompts"], seed=stage.seed + 7)]
    sft_samples = sample(sft, tok, prompts, max_new_tokens=MAX_NEW_TOKENS, seed=stage.seed + 2)
    ev = evaluate(policy_dir, sft, tok, prompts, sft_samples, seed=stage.seed, backend=cfg.backend)
    timing[f"eval-{stage.name}"] = {"wall_s": time.perf_counter() - t0}
    grpo = isinstance(stage.cfg, PPOConfig) and stage.cfg.advantage != "gae"
    row = {"method": stage.method, "setting": stage.setting, "knob": stage.knob, "stage": stage.name,
           "loss_type": stage.cfg.grpo.loss_type if grpo else None, **ev}
    return row, timing


def _worker_init(threads: int) -> None:
    from transformers.utils import logging as hf_logging

    from .. import loop

    loop.SHOW_PROGRESS = False  # the parent prints one line per finished task instead of interleaved bars
    loop.PLOT = False  # the study draws its own plots
    hf_logging.disable_progress_bar()
    make_deterministic(threads)


def run_graph(tasks: list, jobs: int, threads: int) -> dict:
    """Tasks (key, fn, args, then): fn(*args) runs on one of `jobs` worker processes (in this process when jobs
    = 1), then(result) gives follow-up tasks. -> {key: result}. Every task is seeded by its own seed and runs with
    the same thread count, so the results depend neither on `jobs` nor on the order the tasks finish in."""
    results, t0 = {}, time.perf_counter()

    def done(key, result):
        results[key] = result
        print(f"[{time.perf_counter() - t0:6.1f} s] seed {key[0]}: {key[1]}", flush=True)

    if jobs == 1:
        queue = list(tasks)
        while queue:
            key, fn, args, then = queue.pop(0)
            done(key, fn(*args))
            queue.extend(then(results[key]) if then else ())
        return results
    ctx = multiprocessing.get_context("spawn")  # never fork a process that holds torch's thread pool
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init, initargs=(threads,)) as pool:
        pending = {}

        def submit(new):
            for key, fn, args, then in new:
                pending[pool.submit(fn, *args)] = (key, then)

        submit(tasks)
        try:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for f in finished:
                    key, then = pending.pop(f)
                    done(key, f.result())
                    submit(then(results[key]) if then else ())
        except BaseException:
            for f in pending:
                f.cancel()
            raise
    return results


def run_compare(cfg: CompareConfig) -> dict:
    t_start = time.perf_counter()
    make_deterministic(cfg.threads)
    p = PRESETS[cfg.preset]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("fusealign compare runs in one process (its stages run in worker processes of their own); "
                        "launch it without torchrun")
    check_output_dir(cfg.output_dir)
    check_available(cfg)  # --rollout vllm: before any stage runs
    out = Path(cfg.output_dir)
    seeds = seeds_of(cfg)
    jobs = cfg.jobs or len(os.sched_getaffinity(0))
    stages = {}

    def then_policies(seed):  # once a seed's SFT policy and reward models exist, its policy stages can start
        def follow(prep):
            stages[seed] = policy_stages(cfg, p, seed, prep["dirs"])
            return [((seed, st.name), train_and_evaluate, (cfg, p, st, prep["dirs"]["sft"]), None)
                    for st in stages[seed]]
        return follow

    # resume=True in every stage: a finished stage is reused, an interrupted one continues — re-run in place.
    results = run_graph([((s, "sft, reward models"), prepare_seed, (cfg, p, s), then_policies(s)) for s in seeds],
                        jobs, cfg.threads)
    per_seed, timing = {}, {}
    for s in seeds:  # assembled in table order, whatever order the tasks finished in
        timing[str(s)] = dict(results[(s, "sft, reward models")]["timing"])
        per_seed[s] = []
        for st in stages[s]:
            row, t = results[(s, st.name)]
            per_seed[s].append(row)
            timing[str(s)].update(t)
    rows = aggregate(per_seed)
    diffs = matched_differences(per_seed)
    report = {"config": asdict(cfg), "preset": p, "seeds": list(seeds), "device": str(resolve_device(cfg.device)),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "interval": "95 % Student-t interval across seeds: mean ± t(0.975, n−1)·s/√n",
              "matched_kl": MATCHED_KL, "rows": rows, "differences": diffs, "headline": headline(diffs, p["main_beta"]),
              "per_seed": {str(s): v for s, v in per_seed.items()}}
    report["claims"] = judge(report)  # the seed document's claims (claims.py), from the numbers above
    # the one key that differs between two runs of the same command, last in the file
    report["timing"] = {"total_wall_s": time.perf_counter() - t_start, "jobs": jobs, "stages": timing}
    write_text_atomic(out / "compare.json", json.dumps(report, indent=1, default=str))
    report["plot"] = str(out / "frontier.png") if plot(rows, out / "frontier.png") else None
    write_text_atomic(out / "report.md", report_markdown(report))
    print(table(rows, timing))
    print()
    print(diff_table(diffs, rows))
    print()
    print("\n".join(sentences(report["headline"])))
    print()
    print("\n".join(claims_markdown(report["claims"])))
    print(f"\n{out / 'report.md'}; {time.perf_counter() - t_start:.0f} s on {jobs} worker(s) × {cfg.threads} thread(s)")
    return report
