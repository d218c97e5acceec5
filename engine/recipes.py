"""The runs behind `fusealign sft|rm|dpo|ppo`: build models, tokenizer and data from a config, train, evaluate.

With `--model builtin`, RM, DPO and PPO start from the built-in task's SFT policy (trained first, into
`<output_dir>/sft`, unless `--sft-model` names one), as the seed pipeline does; PPO without
`--reward-model` trains its reward model first (into `<output_dir>/rm`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from fusealign.losses import BATCH_LOSSES

from .study import task
from .checkpoint import check_resumable, latest_checkpoint, write_text_atomic
from .config import DPOConfig, PPOConfig, RMConfig, SFTConfig, TrainConfig, resolved_hparams
from .data import DataStream, check_data_file, check_truncation, check_vocab, load_examples, load_prompts, \
    truncation_report
from .errors import CheckpointError, DataError, ModelPathError, OutputDirError
from .loop import note
from .reporting import check_report_to
from .models import RewardModel, disable_dropout, fingerprint, load_causal_lm, model_from_config
from .onpolicy import OnPolicyPairs
from .objectives import dpo_objective, dpo_sequence_logps, pair_batch, rm_objective, sft_objective
from .ppo import PPOTrainer
from .rollout import check_available, check_rollout_device, rollout_engine
from .sampling import sample
from .distributed import DistInfo, check_world_size, init_distributed, rank_slice, run, shard
from .runtime import autocast, bf16_enabled, cpu_has_native_bf16, resolve_device, set_threads
from .trainer import train


def _defaults(cfg: TrainConfig, kind: str) -> TrainConfig:
    """Fill the default output directory, check every path the run needs — before any model loads —, and print the
    resolved hyper-parameters (one block, rank 0)."""
    cfg = replace(cfg, output_dir=cfg.output_dir or f"runs/{kind}")
    preflight(cfg)
    device = resolve_device(cfg.device)
    check_rollout_device(cfg, device)
    bf16 = bf16_enabled(cfg, device)
    note(f"{kind}: " + resolved_hparams(cfg, device.type, bf16))
    if bf16 and device.type == "cpu" and not cpu_has_native_bf16():
        note(f"{kind}: --bf16 on a CPU without AVX-512 BF16 or AMX: bf16 matrix products are emulated, slower than "
             f"fp32 (--no-bf16 to run in fp32)")
    return cfg


def report_data(kind: str, stats) -> None:
    """Before training: refuse a --max-length that cuts most completions, say in one line what it cuts."""
    check_truncation(stats)
    line = truncation_report(stats)
    if line:
        note(f"{kind}: {line}")
    if stats.prompt_boundary:
        note(f"{kind}: data: in {stats.prompt_boundary} of {stats.lines} lines the prompt's own tokens are not a prefix "
             f"of prompt + completion (a template that renders the prompt differently alone, or a token merging "
             f"across the boundary); the completion starts where they part, as in TRL")


def cleans_up(kind: str):
    """A run that fails before it wrote anything leaves no directory behind: the run directory (and parents) it
    created are removed on an exception when they are still empty. A directory that existed, or holds anything —
    metrics, a checkpoint, a cached reference —, stays."""
    def wrap(fn):
        @functools.wraps(fn)
        def run_fn(cfg):
            path = Path(cfg.output_dir or f"runs/{kind}").absolute()
            created = []
            p = path
            while not p.exists() and p != p.parent:
                created.append(p)
                p = p.parent
            try:
                return fn(cfg)
            except BaseException:
                for d in created:  # deepest first
                    try:
                        d.rmdir()  # only if empty
                    except OSError:
                        break
                raise
        return run_fn
    return wrap


def check_output_dir(path: str) -> None:
    """`path` can be created and written (OutputDirError naming the fix if not)."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputDirError(f"--output-dir {path!r}: cannot create or write it ({e.strerror or e}); choose a "
                             f"writable directory") from None


def check_model_dir(path: str, flag: str, *, reward_model: bool = False) -> None:
    """A local model directory (config.json; a reward model also value_head.safetensors)."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise ModelPathError(f"{flag} {path!r}: no config.json there (expected a local model directory"
                             f"{'' if flag != '--model' else ', or builtin'})")
    if reward_model and not (p / "value_head.safetensors").is_file():
        raise ModelPathError(f"{flag} {path!r}: no value_head.safetensors there (expected a reward model written "
                             f"by `fusealign rm`)")


def preflight(cfg: TrainConfig) -> None:
    """Paths first: output writable, data readable and UTF-8, model directories present, a checkpoint to resume
    from resumable; vLLM importable with --rollout vllm."""
    check_output_dir(cfg.output_dir)
    check_report_to(cfg.report_to)
    check_available(cfg)
    if cfg.resume:
        check_resumable(latest_checkpoint(Path(cfg.output_dir)), trust=cfg.trust_checkpoint)
    if cfg.data == "onpolicy" and hasattr(cfg, "prompts"):  # DPO on pairs sampled from the policy
        check_data_file(cfg.prompts)
    else:
        check_data_file(cfg.data)
    if cfg.model != "builtin":
        check_model_dir(cfg.model, "--model")
    if getattr(cfg, "sft_model", ""):
        check_model_dir(cfg.sft_model, "--sft-model")
    if getattr(cfg, "reward_model", ""):
        check_model_dir(cfg.reward_model, "--reward-model", reward_model=True)


def load_tokenizer(path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tok.pad_token is None:  # common for Llama tokenizers; padding positions are never targets
        tok.pad_token = tok.eos_token
    return tok


def start_tokenizer(cfg: TrainConfig):
    """The tokenizer of the model a run starts from, read without loading (or training) any model: data
    errors surface before minutes of work."""
    ckpt = latest_checkpoint(Path(cfg.output_dir)) if cfg.resume else None
    source = ckpt or getattr(cfg, "sft_model", "") or cfg.model
    return task.tokenizer() if source == "builtin" else load_tokenizer(source)


def load_policy(cfg: TrainConfig, *, init: str):
    """(model, tokenizer) from a checkpoint being resumed, the built-in preset, or a local directory."""
    device = resolve_device(cfg.device)
    ckpt = latest_checkpoint(Path(cfg.output_dir)) if cfg.resume else None
    source = ckpt or init
    if source == "builtin":
        model, tok = model_from_config(task.model_config(), seed=cfg.seed), task.tokenizer()
    else:
        model = load_causal_lm(str(source), attn_implementation=cfg.attn_implementation)
        tok = load_tokenizer(source)
    check_vocab(tok, model.config.vocab_size)
    return model.to(device), tok


def builtin_sft_path(cfg: TrainConfig) -> str:
    """The SFT policy RM/DPO start from with --model builtin (trained here when missing)."""
    if getattr(cfg, "sft_model", ""):
        return cfg.sft_model
    run = Path(cfg.output_dir) / "sft"
    if latest_checkpoint(run) is None:
        run_sft(SFTConfig(output_dir=str(run), seed=cfg.seed, device=cfg.device, backend=cfg.backend,
                          threads=cfg.threads))
    return str(latest_checkpoint(run))


def gt_reward(model, tok, *, n: int = 128, seed: int = 0, max_new_tokens: int = 24) -> float:
    """Mean ground-truth reward of sampled completions on held-out prompts of the built-in task (with several
    ranks every rank samples the same prompts: the same number of generate steps on each, as FSDP needs)."""
    prompts = [[tok.bos_token_id] + tok.encode(p, add_special_tokens=False) for p in task.eval_prompts(n, seed)]
    outs = sample(model, tok, prompts, max_new_tokens=max_new_tokens, seed=seed)
    return sum(task.reward(tok.decode(ids), ended) for ids, ended in outs) / len(outs)


def finish(cfg, summary: dict) -> dict:
    """Write final_metrics.json atomically beside the run (rank 0); returns the summary."""
    if int(os.environ.get("RANK", "0")) == 0:
        write_text_atomic(Path(cfg.output_dir) / "final_metrics.json", json.dumps(summary, indent=1))
    return summary


def _bf16_params(cfg: TrainConfig, device: torch.device) -> bool:
    """FSDP2's bf16 parameters with fp32 gradient reduction: on CUDA with bf16, as autocast alone would be."""
    return device.type == "cuda" and bf16_enabled(cfg, device)


@cleans_up("sft")
def run_sft(cfg: SFTConfig) -> dict:
    cfg = _defaults(cfg, "sft")
    set_threads(cfg.threads)
    examples, stats = load_examples(cfg.data, "sft", start_tokenizer(cfg), max_length=cfg.max_length,
                                    skip_bad_lines=cfg.skip_bad_lines)
    report_data("sft", stats)
    info = init_distributed(cfg.device, cfg.fsdp)
    model, tok = load_policy(cfg, init=cfg.model)
    inner = model
    model = shard(model, info, bf16=_bf16_params(cfg, resolve_device(cfg.device)))
    stream = DataStream(examples, cfg.batch_size, cfg.seed)
    last = train(cfg, model, lambda ex: sft_objective(inner, ex, pad_id=tok.pad_token_id, pack=cfg.pack,
                                                  temperature=cfg.temperature, backend=cfg.backend),
                 stream, tokenizer=tok, desc="sft", info=info)
    return finish(cfg, {**last, "data/lines": stats.lines, "data/skipped": stats.skipped,
                         "data/truncated": stats.truncated})


@cleans_up("rm")
def run_rm(cfg: RMConfig) -> dict:
    cfg = _defaults(cfg, "rm")
    set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    kw = dict(max_length=cfg.max_length, skip_bad_lines=cfg.skip_bad_lines)
    examples, stats = load_examples(cfg.data, "pairs", start_tokenizer(cfg), **kw)
    report_data("rm", stats)
    ckpt = latest_checkpoint(Path(cfg.output_dir)) if cfg.resume else None
    if ckpt is not None:
        rm, tok = RewardModel.from_pretrained(str(ckpt)), load_tokenizer(ckpt)
    else:
        lm, tok = load_policy(replace(cfg, resume=False),
                              init=builtin_sft_path(cfg) if cfg.model == "builtin" else cfg.model)
        torch.manual_seed(cfg.seed)
        rm = RewardModel(lm)
    rm.to(device)
    check_vocab(tok, rm.config.vocab_size)
    info = init_distributed(cfg.device, cfg.fsdp)
    inner = rm
    rm = shard(rm, info, bf16=_bf16_params(cfg, device))
    if task.is_builtin_data(cfg.data):
        held = load_examples(cfg.data, "pairs", tok, held_out=True, **kw)[0]
    else:  # the last 10 % are held out and not trained on
        if len(examples) < 2:
            raise DataError(f"--data {cfg.data!r}: the reward model needs at least 2 pairs (one held out)")
        cut = len(examples) - max(1, len(examples) // 10)
        examples, held = examples[:cut], examples[cut:]

    def evaluate() -> dict:
        rm.eval()
        with torch.no_grad():
            margins = []
            for i in range(0, len(held), 64):
                batch = pair_batch(held[i:i + 64], pad_id=tok.pad_token_id, pack=cfg.pack).to(device)
                r = run(rm, RewardModel.rewards, batch)  # every rank scores every held-out pair (FSDP: same steps)
                B = batch.num_sequences // 2
                margins.append((r[:B] - r[B:]).float())
        m = torch.cat(margins)
        return {"eval/accuracy": (m > 0).float().mean().item(), "eval/margin": m.mean().item()}

    last = train(cfg, rm, lambda ex: rm_objective(inner, ex, pad_id=tok.pad_token_id, pack=cfg.pack, margin=cfg.margin,
                                             center_coef=cfg.center_coef),
                 DataStream(examples, cfg.batch_size, cfg.seed), tokenizer=tok, eval_fn=evaluate, desc="rm",
                 info=info)
    return finish(cfg, {**last, **evaluate(), "data/lines": stats.lines, "data/skipped": stats.skipped,
                         "data/truncated": stats.truncated})


def reference_logps(ref, examples, batches, *, pad_id, pack: bool, options, temperature: float, backend: str,
                    cache_dir: Optional[Path], key_extra: str = "", cfg: TrainConfig = None,
                    ref_key: Optional[str] = None, info: DistInfo = DistInfo()) -> torch.Tensor:
    """(n, 2) reference (chosen, rejected) log-probs of `examples` (row = uid) in one no-grad pass, cached on disk
    keyed by data, batches and model.

    Scored in the training batches' composition: `batches` are the micro-batches of the first epoch, in order
    (`DataStream.epoch_batches`), each collated as training collates it (`pack`), each rank scoring its
    `rank_slice` as it trains on it, with the loss's own fused outputs (`dpo_sequence_logps`) under the same
    autocast — so at step 0, where the policy is the reference, every log-ratio is exactly 0 (margins 0,
    accuracies 0): CPU kernels are not batch invariant (a row's result can depend on the other rows of its
    matrix product), and a pass in another composition would leave float noise in the ratios. Every pair is
    scored by exactly one rank and the tables are summed over ranks (x + 0 is exact): every rank holds the whole
    table, for the later epochs' other slices. The cache is a safetensors file (a plain tensor: reading it
    cannot execute code). `ref_key`: the reference weights' fingerprint when `ref` is FSDP-sharded (taken before
    sharding)."""
    h = hashlib.sha256(key_extra.encode())
    for e in examples:
        h.update(repr((e.prompt, e.completions)).encode())
    h.update(repr([[e.uid for e in b] for b in batches]).encode())
    device = next(ref.parameters()).device
    amp = autocast(cfg, device) if cfg is not None else contextlib.nullcontext()
    mode = "bf16" if (cfg is not None and bf16_enabled(cfg, device)) else "fp"
    key = (f"{h.hexdigest()[:16]}-{ref_key or fingerprint(ref)}-{'avg' if options.per_token_means else 'sum'}"
           f"-T{temperature}-{mode}-{'pack' if pack else 'pad'}-w{info.world_size}")
    path = cache_dir / f"ref_logps-{key}.safetensors" if cache_dir is not None else None
    if path is not None and path.is_file():
        return load_file(str(path))["ref_logps"]
    table = torch.zeros(len(examples), 2)
    ref.eval()
    with torch.no_grad(), amp:  # the same precision as the policy's forward in training
        for chunk in batches:
            local = rank_slice(chunk, info)
            batch = pair_batch(local or chunk[:1], pad_id=pad_id, pack=pack).to(device)  # a rank without pairs
            s = run(ref, dpo_sequence_logps, batch, options=options, temperature=temperature,  # still runs FSDP's
                    backend=backend).float().cpu()                                            # collectives
            if local:
                table[[e.uid for e in local]] = torch.stack([s[: len(local)], s[len(local):]], 1)
    if info.active:
        table = table.to(device)
        torch.distributed.all_reduce(table)
        table = table.cpu()
    if path is None:  # cache_dir=None: not cached (on-policy pairs are new every round)
        return table
    if info.main:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file({"ref_logps": table.contiguous()}, str(tmp))
        os.replace(tmp, path)
    return table


def builtin_rm_path(cfg, init: str) -> str:
    """--reward-model, or (with --model builtin) the reward model trained into <output_dir>/rm from the SFT policy."""
    if cfg.reward_model:
        return cfg.reward_model
    rm_dir = Path(cfg.output_dir) / "rm"
    if latest_checkpoint(rm_dir) is None:
        run_rm(RMConfig(output_dir=str(rm_dir), sft_model=init, seed=cfg.seed, device=cfg.device, backend=cfg.backend,
                        threads=cfg.threads, center_coef=0.01))
    return str(latest_checkpoint(rm_dir))


@cleans_up("dpo")
def run_dpo(cfg: DPOConfig) -> dict:
    cfg = _defaults(cfg, "dpo")
    set_threads(cfg.threads)
    onpolicy = cfg.data == "onpolicy"
    examples, stats = None, None
    if not onpolicy:  # data errors before any model is trained or loaded
        examples, stats = load_examples(cfg.data, "pairs", start_tokenizer(cfg), max_length=cfg.max_length,
                                        skip_bad_lines=cfg.skip_bad_lines)
        report_data("dpo", stats)
    info = init_distributed(cfg.device, cfg.fsdp)
    check_world_size("dpo --data onpolicy", info, not onpolicy, "on-policy pairs are sampled in one process for now")
    batch_wide = sorted(set(cfg.loss.loss_type) & set(BATCH_LOSSES)) + (["--nll-coef"] if cfg.loss.nll_coef else [])
    check_world_size(f"dpo with {', '.join(batch_wide)}", info, not batch_wide or info.world_size == 1,
                     "these terms depend on the whole batch (sorted across it, or a token mean over it) and each "
                     "rank holds a slice of it")
    init = builtin_sft_path(cfg) if cfg.model == "builtin" else cfg.model
    policy, tok = load_policy(cfg, init=init)
    disable_dropout(policy)
    bf16 = _bf16_params(cfg, next(policy.parameters()).device)
    inner_policy, policy = policy, shard(policy, info, bf16=bf16)
    ref_model, ref_key = None, None
    if cfg.needs_reference:
        ref_model, _ = load_policy(replace(cfg, resume=False), init=init)  # the frozen reference: π_ref = π_init
        disable_dropout(ref_model.requires_grad_(False).eval())
        ref_key = fingerprint(ref_model) if info.active else None  # before sharding splits its weights
        ref_model = shard(ref_model, info, bf16=bf16)
    precompute = ref_model is not None and cfg.ref_mode == "precompute"
    ref_kw = dict(pad_id=tok.pad_token_id, pack=cfg.pack, options=cfg.loss, temperature=cfg.temperature,
                  backend=cfg.backend, cfg=cfg, ref_key=ref_key, info=info)
    lookup, engine = None, None
    if onpolicy:  # pairs sampled from the policy (again every K steps with --resample-every), labelled by an RM
        reward_model = RewardModel.from_pretrained(builtin_rm_path(cfg, init)).to(next(policy.parameters()).device)
        disable_dropout(reward_model.requires_grad_(False).eval())
        prompts = load_prompts(cfg.prompts, tok, max_prompt_tokens=cfg.max_length - cfg.max_new_tokens, seed=cfg.seed)
        engine = rollout_engine(cfg, policy, tok, info, seed=cfg.seed)  # --rollout: HF generate or vLLM
        stream = OnPolicyPairs(policy, reward_model, tok, prompts, batch_size=cfg.batch_size, seed=cfg.seed,
                               prompts_per_round=cfg.onpolicy_prompts, resample_every=cfg.resample_every,
                               grad_accum=cfg.grad_accum, max_new_tokens=cfg.max_new_tokens,
                               missing_eos_penalty=cfg.missing_eos_penalty, temperature=cfg.temperature, engine=engine,
                               reference=(lambda exs, batches: reference_logps(ref_model, exs, batches, cache_dir=None,
                                                                               **ref_kw))
                               if precompute else None)
        lookup = stream.ref_logps if precompute else None
    else:
        stream = DataStream(examples, cfg.batch_size, cfg.seed)
        if precompute:
            table = reference_logps(ref_model, examples, stream.epoch_batches(0), cache_dir=Path(cfg.output_dir),
                                    key_extra=str(init), **ref_kw)
            lookup = lambda ex: table[[e.uid for e in ex]]  # noqa: E731
            ref_model = None  # not needed any more: free it
    online_ref = None if precompute else ref_model  # the frozen reference scored on the fly (--ref-mode online)
    builtin = cfg.prompts == "builtin" if onpolicy else task.is_builtin_data(cfg.data)
    before = gt_reward(policy, tok, n=cfg.eval_samples, seed=cfg.seed) if builtin else None

    def loss_fn(ex):
        return dpo_objective(inner_policy, ex, pad_id=tok.pad_token_id, pack=cfg.pack, options=cfg.loss,
                             ref_logps=lookup(ex) if lookup is not None else None, ref_model=online_ref,
                             temperature=cfg.temperature, backend=cfg.backend)

    try:
        last = train(cfg, policy, loss_fn, stream, tokenizer=tok, desc="dpo", info=info)
    finally:
        if engine is not None:
            engine.close()
    summary = dict(last)
    if stats is not None:
        summary.update({"data/lines": stats.lines, "data/skipped": stats.skipped, "data/truncated": stats.truncated})
    else:
        summary.update({"data/rounds": stream.round + 1, "data/pairs": len(stream.examples)})
    if builtin:
        summary["eval/gt_reward_init"] = before
        summary["eval/gt_reward"] = gt_reward(policy, tok, n=cfg.eval_samples, seed=cfg.seed)
    return finish(cfg, summary)


@cleans_up("ppo")
def run_ppo(cfg: PPOConfig) -> dict:
    """`fusealign ppo`: defaults to the built-in task, its SFT policy and the reward model trained on it."""
    cfg = _defaults(cfg, "ppo")
    set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    load_prompts(cfg.data, start_tokenizer(cfg), max_prompt_tokens=cfg.max_length - cfg.max_new_tokens,
                 seed=cfg.seed)  # data errors before any model is trained or loaded
    info = init_distributed(cfg.device, cfg.fsdp)
    init = builtin_sft_path(cfg) if cfg.model == "builtin" else cfg.model
    policy, tok = load_policy(cfg, init=init)
    ref, _ = load_policy(replace(cfg, resume=False), init=init)
    reward_model, reward_fn, rm_path = None, None, cfg.reward_model
    if cfg.reward_fn == "builtin":
        reward_fn = task.reward
    else:
        rm_path = builtin_rm_path(cfg, init)
        reward_model = RewardModel.from_pretrained(rm_path).to(device)
    critic = None
    if cfg.advantage == "gae" and cfg.critic == "separate":
        ckpt = latest_checkpoint(Path(cfg.output_dir)) if cfg.resume else None
        if ckpt is not None:
            if not (ckpt / "critic").is_dir():
                raise CheckpointError(f"{ckpt} has no critic/ to resume the separate critic from: resume needs the "
                                      f"checkpoint written with the same --critic separate")
            critic = RewardModel.from_pretrained(str(ckpt / "critic"))
        elif reward_model is not None:  # initialise the critic from the reward model (Huang et al. 2024)
            critic = RewardModel.from_pretrained(rm_path)
        else:
            torch.manual_seed(cfg.seed)
            critic = RewardModel(load_policy(replace(cfg, resume=False), init=init)[0])
        critic = critic.to(device)
    prompts = load_prompts(cfg.data, tok, max_prompt_tokens=cfg.max_length - cfg.max_new_tokens, seed=cfg.seed)
    trainer = PPOTrainer(cfg, policy, ref, tok, critic=critic, reward_model=reward_model, reward_fn=reward_fn,
                         prompts=prompts, info=info)
    try:  # evaluation samples with HF generate whatever --rollout: the same measurement for every engine
        before = gt_reward(trainer.policy, tok, seed=cfg.seed) if task.is_builtin_data(cfg.data) else None
        summary = dict(trainer.train())
        if before is not None:
            summary["eval/gt_reward_init"] = before
            summary["eval/gt_reward"] = gt_reward(trainer.policy, tok, seed=cfg.seed)
    finally:
        trainer.close()
    return finish(cfg, summary)


RUNS = {"sft": run_sft, "rm": run_rm, "dpo": run_dpo, "ppo": run_ppo}
