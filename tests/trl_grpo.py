"""TRL 1.16's own GRPO loss code, driven on a tiny model, beside fusealign's: the parity harness.

`trl_run` runs, unmodified, the two `GRPOTrainer` methods every loss number comes from, on a stub trainer (one
CPU process; only the attributes those methods read):
  1. `_generate_and_score_completions` with a stub sampler (`_generate`: fixed prompts and completions, some
     ending in EOS, some truncated, and the "vLLM" per-token log-probs, one of them missing) and a stub reward:
     TRL pads the batch, masks truncated completions, counts `num_items_in_batch`, scores the old policy and the
     reference, computes the vLLM importance-sampling ratio of every mode and its `sampling/*` metrics, and
     the group-normalised advantages;
  2. `_compute_loss` on that batch with the *current* policy (a perturbed copy of the old one, so ratios
     move and clip): every loss type, GSPO, clipping, KL, masks, entropy bonus, aggregation, metrics, backward.
Models are tiny Llamas patched with TRL's own fused LM head (`add_fused_lm_head`, log-probs and entropy).
`ours_tensor` runs `fa.grpo_loss` on TRL's own per-token log-probs and entropies of the same forward (so the only
difference left is the loss); `ours_linear` runs the same backbone and `fa.linear_grpo_loss` on its hidden states
and `lm_head.weight`. Each returns (loss, metrics, gradients of every model parameter).
Used by tests/losses/test_grpo_trl_parity.py and scripts/grpo_parity.py (the parity table).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections import defaultdict
from types import SimpleNamespace

import torch

import fusealign as fa

VOCAB, EOS, PAD = 97, 2, 0
NUM_GENERATIONS = 4
# The batch geometry TRL's normalisers read: current_gradient_accumulation_steps, steps_per_generation (≠ GA, so
# dapo's num_items_in_batch rescaling is exercised), num_iterations = 2 (so TRL keeps the old log-probs).
GA, STEPS_PER_GENERATION, NUM_ITERATIONS = 3, 2, 2
MAX_COMPLETION_LENGTH = 16

# GRPOConfig fields the two methods read, with TRL 1.16's defaults (checked against GRPOConfig in the test).
TRL_DEFAULTS = dict(
    loss_type="dapo", epsilon=0.2, epsilon_high=None, delta=None, importance_sampling_level="token", beta=0.0,
    use_bias_correction_kl=True, sapo_temperature_neg=1.05, sapo_temperature_pos=1.0, vespo_k_pos=2.0,
    vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0, top_entropy_quantile=1.0, entropy_coef=0.0,
    off_policy_mask_threshold=None, vllm_importance_sampling_correction=True,
    vllm_importance_sampling_mode="sequence_mask", vllm_importance_sampling_clip_min=None,
    vllm_importance_sampling_clip_max=3.0, mask_truncated_completions=False)
# Harness-only knobs: use_vllm (the sampler's log-probs exist), temperature (of the fused heads).
HARNESS = ("use_vllm", "temperature")

CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
LOSS_TYPES = CLIPPED + ("cispo", "sapo", "vespo")
CLIPPING = {"ε": {}, "ε_h=0.28": dict(epsilon_high=0.28), "δ=1.3": dict(delta=1.3)}
IS_MODES = {"no vLLM": dict(use_vllm=False),
            "token_truncate": dict(use_vllm=True, vllm_importance_sampling_mode="token_truncate",
                                   vllm_importance_sampling_clip_min=0.5),
            "token_mask": dict(use_vllm=True, vllm_importance_sampling_mode="token_mask",
                               vllm_importance_sampling_clip_min=0.5),
            "sequence_truncate": dict(use_vllm=True, vllm_importance_sampling_mode="sequence_truncate"),
            "sequence_mask": dict(use_vllm=True, vllm_importance_sampling_mode="sequence_mask",
                                  vllm_importance_sampling_clip_min=0.2)}


def _grid():
    """Every loss type × importance-sampling level × clipping option × KL on/off × vLLM IS mode. The clipping
    options only exist for the clipped types (cispo reads ε_h alone, as its cap; sapo and vespo none)."""
    cases = {}
    for loss_type, level, kl, mode in itertools.product(LOSS_TYPES, ("token", "sequence"), (False, True), IS_MODES):
        if loss_type in CLIPPED:
            clippings = CLIPPING
        elif loss_type == "cispo":
            clippings = {"ε_h=ε": {}, "ε_h=5": dict(epsilon_high=5.0), "ε_h=1.1": dict(epsilon_high=1.1)}
        else:
            clippings = {"–": {}}
        if loss_type == "vespo" and mode.startswith("sequence"):
            continue  # TRL's __init__ refuses it (VESPO takes per-token ratios); so do we (test_grpo_trl_parity.py)
        for clip_name, clip in clippings.items():
            name = f"{loss_type} {level} {clip_name} {'β=0.05' if kl else 'β=0'} {mode}"
            cases[name] = dict(loss_type=loss_type, importance_sampling_level=level, **clip,
                               **(dict(beta=0.05) if kl else {}), **IS_MODES[mode])
    return cases


GRID = _grid()
# Options beyond the grid: masks, entropy bonus, bias correction off, SAPO / VESPO parameters, temperature.
EXTRA = {
    "dapo entropy mask ρ=0.3": dict(top_entropy_quantile=0.3),
    "grpo entropy mask ρ=0 + entropy_coef": dict(loss_type="grpo", top_entropy_quantile=0.0, entropy_coef=0.01),
    "dapo off-policy mask 0.05": dict(off_policy_mask_threshold=0.05),
    "dapo off-policy mask, vLLM": dict(off_policy_mask_threshold=0.05, **IS_MODES["token_truncate"]),
    "bnpo entropy_coef=0.02": dict(loss_type="bnpo", entropy_coef=0.02),
    "dapo β=0.05 no bias correction": dict(beta=0.05, use_bias_correction_kl=False),
    "grpo sequence β=0.05 no bias corr.": dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.05,
                                               use_bias_correction_kl=False),
    "sapo τ=(0.5, 2)": dict(loss_type="sapo", sapo_temperature_pos=0.5, sapo_temperature_neg=2.0),
    "vespo k,λ=(1,1,4,0.5)": dict(loss_type="vespo", vespo_k_pos=1.0, vespo_lambda_pos=1.0, vespo_k_neg=4.0,
                                  vespo_lambda_neg=0.5),
    "dapo mask truncated": dict(mask_truncated_completions=True),
    "grpo mask truncated, vLLM token_mask": dict(loss_type="grpo", mask_truncated_completions=True,
                                                 **IS_MODES["token_mask"]),
    "dapo temperature 0.7": dict(temperature=0.7),
    "vLLM correction off": dict(use_vllm=True, vllm_importance_sampling_correction=False,
                                off_policy_mask_threshold=0.05),
    "grpo sequence δ=1.05": dict(loss_type="grpo", importance_sampling_level="sequence", delta=1.05),
    "everything": dict(loss_type="grpo", importance_sampling_level="sequence", epsilon_high=0.28, delta=1.3,
                       beta=0.05, top_entropy_quantile=0.5, entropy_coef=0.01, off_policy_mask_threshold=0.1,
                       **IS_MODES["sequence_truncate"], vllm_importance_sampling_clip_min=0.3),
}
CASES = {**GRID, **EXTRA}


def implementations(case: str) -> tuple:
    """Which of ours a row runs: the tensor twin everywhere; the fused twin too on the rows with default clipping
    and on the extras (a clipping option changes only the loss epilogue the tensor twin shares, not the head)."""
    default_clip = not {"epsilon_high", "delta"} & set(CASES[case])
    return ("linear_grpo_loss", "grpo_loss") if case in EXTRA or default_clip else ("grpo_loss",)


# --- models and the rollout -------------------------------------------------------------------------------------
def tiny_model(seed=0, temperature=1.0, noise=0.0, base=None):
    """A tiny Llama with TRL's fused head; `base` + N(0, noise²) per weight when given (a nearby policy)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD,
                      eos_token_id=EOS)
    model = LlamaForCausalLM(cfg).float()
    with torch.no_grad():
        if base is None:
            model.lm_head.weight.mul_(4.0)  # some spread: log-probs, ratios and entropies vary
        else:
            for p, q in zip(model.parameters(), base.parameters()):
                p.copy_(q + noise * torch.randn_like(q) * q.std().clamp(min=1e-3))
    add_fused_lm_head(model, temperature=temperature, outputs=("log_probs", "entropy"))
    return model


@functools.lru_cache(maxsize=4)
def models(temperature=1.0, seed=0):
    """(old policy — the sampler's training-side twin —, current policy, reference), built once."""
    old = tiny_model(seed, temperature)
    return old, tiny_model(seed + 1, temperature, 0.4, old), tiny_model(seed + 2, temperature, 0.3, old)


@functools.lru_cache(maxsize=4)
def rollout(temperature=1.0, seed=0):
    """Two prompts × NUM_GENERATIONS completions of 3–9 tokens (five end in EOS, three are truncated), the
    "vLLM" per-token log-probs (the old policy's plus N(0, 0.4²), one missing: None, as vLLM reports it), and
    the rewards."""
    g = torch.Generator().manual_seed(seed)
    old, _, _ = models(temperature, seed)
    prompts, completions = [], []
    for i in range(2 * NUM_GENERATIONS):
        prompts.append(torch.randint(3, VOCAB, (2 + (i // NUM_GENERATIONS) * 2,), generator=g).tolist())
        ids = torch.randint(3, VOCAB, (3 + (i * 5) % 7,), generator=g).tolist()
        if i % 3 != 2:
            ids[-1] = EOS
        completions.append(ids)
    sampling = []
    for p, c in zip(prompts, completions):
        ids = torch.tensor([p + c])
        with torch.no_grad():
            out = old(input_ids=ids, labels=ids, fused_lm_head=True)
        lp = out.log_probs[0, -len(c):].double() + 0.4 * torch.randn(len(c), generator=g, dtype=torch.float64)
        sampling.append(lp.tolist())
    sampling[1][2] = None  # a token vLLM could not score
    rewards = torch.randn(2 * NUM_GENERATIONS, 1, generator=g)
    return prompts, completions, sampling, rewards


class _OneProcess:
    """The slice of `accelerate.Accelerator` the two methods use, for a single CPU process."""

    device = torch.device("cpu")
    num_processes, process_index, is_main_process, sync_gradients = 1, 0, True, True

    @staticmethod
    def gather(t):
        return t

    gather_for_metrics = gather

    @staticmethod
    def reduce(t, reduction="sum"):
        return t

    @staticmethod
    def pad_across_processes(t, dim=0, pad_index=0):
        return t

    @staticmethod
    def autocast():
        return contextlib.nullcontext()

    @staticmethod
    def unwrap_model(m):
        return m


def _stub_trainer(o, temperature):
    from trl import GRPOTrainer

    old, model, ref = models(temperature)
    prompts, completions, sampling, rewards = rollout(temperature)
    use_vllm = o["use_vllm"]
    trainer = GRPOTrainer.__new__(GRPOTrainer)  # the two methods and the state they read; no Trainer set-up
    trainer.__dict__.update(
        model=old, ref_model=ref if o["beta"] != 0.0 else None, accelerator=_OneProcess(),
        state=SimpleNamespace(global_step=0, num_input_tokens_seen=0),
        args=SimpleNamespace(
            report_to=[], gradient_checkpointing_kwargs=None, per_device_train_batch_size=len(prompts),
            per_device_eval_batch_size=len(prompts), steps_per_generation=STEPS_PER_GENERATION,
            gradient_accumulation_steps=GA, delta=o["delta"], use_bias_correction_kl=o["use_bias_correction_kl"],
            sapo_temperature_pos=o["sapo_temperature_pos"], sapo_temperature_neg=o["sapo_temperature_neg"],
            vespo_k_pos=o["vespo_k_pos"], vespo_lambda_pos=o["vespo_lambda_pos"], vespo_k_neg=o["vespo_k_neg"],
            vespo_lambda_neg=o["vespo_lambda_neg"], entropy_target=0.2),
        environment_factories=None, environments=None, tools=None, _is_vlm=False, processing_class=None,
        _tokenizer=SimpleNamespace(pad_token_id=PAD), eos_token_ids=[EOS], pad_to_multiple_of=None,
        mask_truncated_completions=o["mask_truncated_completions"], num_iterations=NUM_ITERATIONS,
        use_vllm=use_vllm, vllm_importance_sampling_correction=o["vllm_importance_sampling_correction"],
        vllm_importance_sampling_mode=o["vllm_importance_sampling_mode"],
        vllm_importance_sampling_clip_min=o["vllm_importance_sampling_clip_min"],
        vllm_importance_sampling_clip_max=o["vllm_importance_sampling_clip_max"],
        beta=o["beta"], num_generations=NUM_GENERATIONS, num_generations_eval=NUM_GENERATIONS,
        multi_objective_aggregation="sum_then_normalize", reward_weights=torch.ones(1), scale_rewards="group",
        reward_func_names=["r"], reward_funcs=[None],
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _logs={"prompt": [], "completion": [], "rewards": defaultdict(list), "advantages": [],
               "extra": defaultdict(list), "images": []},
        _pending_extra_logs={}, _pending_metrics={}, log_multimodal=False,
        _generate=lambda ps: ([list(p) for p in prompts], [list(c) for c in completions], None,
                              ["" for _ in completions], [list(s) for s in sampling] if use_vllm else None, {},
                              None, None),
        _calculate_rewards=lambda inputs, ps, cs, ids: rewards.clone(),
        # _compute_loss
        top_entropy_quantile=o["top_entropy_quantile"], aux_loss_enabled=False, loss_type=o["loss_type"],
        importance_sampling_level=o["importance_sampling_level"], epsilon_low=o["epsilon"],
        epsilon_high=o["epsilon"] if o["epsilon_high"] is None else o["epsilon_high"],
        off_policy_mask_threshold=o["off_policy_mask_threshold"], current_gradient_accumulation_steps=GA,
        max_completion_length=MAX_COMPLETION_LENGTH, entropy_coef=o["entropy_coef"], use_adaptive_entropy=False,
        _entropy_bonus_enabled=o["entropy_coef"] != 0.0, _last_world_entropy=float("inf"),
        _entropy_window_stats=None)
    return trainer, model


def _grads(model):
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _split(options):
    o = {**TRL_DEFAULTS, "use_vllm": False, "temperature": 1.0, **options}
    unknown = set(o) - set(TRL_DEFAULTS) - set(HARNESS)
    assert not unknown, unknown
    return o


# What `_generate_and_score_completions` reads of the options (its output is cached on these).
GENERATION_KEYS = ("use_vllm", "vllm_importance_sampling_correction", "vllm_importance_sampling_mode",
                   "vllm_importance_sampling_clip_min", "vllm_importance_sampling_clip_max",
                   "mask_truncated_completions", "temperature")


@functools.lru_cache(maxsize=64)
def _generation(key):
    """TRL's `_generate_and_score_completions` (unmodified) for one generation-side option set: (batch, its
    `sampling/*` metrics). Cached: the loss options do not enter it (β only decides whether the reference is
    scored, which is part of the key)."""
    o = _split(dict(zip(GENERATION_KEYS + ("beta",), key)))
    trainer, _ = _stub_trainer(o, o["temperature"])
    trainer.model.train()
    batch = trainer._generate_and_score_completions([{"prompt": ""} for _ in rollout(o["temperature"])[0]])
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("sampling/")}
    return batch, metrics


def trl_run(options, backward=True):
    """TRL 1.16's `_generate_and_score_completions` then `_compute_loss` (both unmodified):
    (loss, metrics, grads, batch) — batch is the generation output the loss read."""
    o = _split(options)
    batch, gen_metrics = _generation(tuple(o[k] for k in GENERATION_KEYS) + (float(o["beta"] != 0.0),))
    trainer, model = _stub_trainer(o, o["temperature"])
    trainer.model = model  # the policy has moved since the rollout: ratios ≠ 1
    model.train()
    loss = trainer._compute_loss(model, dict(batch))
    if backward:
        loss.backward()
    metrics = {**gen_metrics, **{k: v[-1] for k, v in trainer._metrics["train"].items()}}
    return loss.detach(), metrics, _grads(model), batch


def _our_options(o):
    fields = {f for f in fa.GRPOOptions.__dataclass_fields__}
    mine = {k: v for k, v in o.items() if k in fields}
    return dict(mine, gradient_accumulation_steps=GA, steps_per_generation=STEPS_PER_GENERATION,
                max_completion_length=MAX_COMPLETION_LENGTH)


def _sequences(batch):
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    labels = ids.masked_fill(attention == 0, -100)
    T = batch["completion_ids"].shape[1]
    labels[:, :-T] = -100
    return ids, attention, labels, T


def _per_call(batch, o):
    return dict(ref_logps=batch.get("ref_per_token_logps"),
                sampling_logps=batch.get("sampling_per_token_logps") if o["use_vllm"] else None,
                num_items_in_batch=batch["num_items_in_batch"])


def ours_tensor(options, batch):
    """`fa.grpo_loss` on TRL's own per-token log-probs and entropies (its fused head): (loss, metrics, grads)."""
    o = _split(options)
    _, model, _ = models(o["temperature"])
    model.train()
    ids, attention, labels, T = _sequences(batch)
    out = model(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True)
    loss, metrics = fa.grpo_loss(out.log_probs[:, -T:], batch.get("old_per_token_logps"), batch["advantages"],
                                 batch["completion_mask"], entropy=out.entropy[:, -T:], **_per_call(batch, o),
                                 **_our_options(o))
    loss.backward()
    return loss.detach(), {k: v.item() for k, v in metrics.items()}, _grads(model)


def ours_linear(options, batch, backend="torch"):
    """`fa.linear_grpo_loss` on the same backbone's hidden states and `lm_head.weight`: (loss, metrics, grads)."""
    o = _split(options)
    _, model, _ = models(o["temperature"])
    model.train()
    ids, attention, labels, T = _sequences(batch)
    hidden = model.model(input_ids=ids, attention_mask=attention, use_cache=False).last_hidden_state
    loss, metrics = fa.linear_grpo_loss(hidden[:, :-1][:, -T:], model.lm_head.weight, labels[:, 1:][:, -T:],
                                        batch.get("old_per_token_logps"), batch["advantages"], backend=backend,
                                        temperature=o["temperature"], **_per_call(batch, o), **_our_options(o))
    loss.backward()
    return loss.detach(), {k: v.item() for k, v in metrics.items()}, _grads(model)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 (0 when both are 0)."""
    a, b = a.double(), b.double()
    d, n = (a - b).norm().item(), b.norm().item()
    return d if n == 0 else d / n


def _metric_rel(ours: dict, trl: dict) -> float:
    worst = 0.0
    for k, v in trl.items():
        a = ours[k]
        if v != v:  # NaN (e.g. nanmin over nothing) must be NaN on our side too
            worst = max(worst, 0.0 if a != a else float("inf"))
        else:
            worst = max(worst, abs(a - v) / max(abs(v), 1e-6))
    return worst


LOSS_RTOL = 1e-5  # tests/losses/test_grpo_trl_parity.py's RTOL


def float64_loss(options, batch) -> float:
    """The loss of `linear_grpo_loss`'s row in float64: float64 log-probs of the same backbone's hidden states and
    head (fusealign.kernels.reference), through `fa.grpo_loss` in float64 — the independent judge when TRL's fp32
    loss and ours differ by more than the parity tolerance (a loss that nearly cancels: its terms are O(1), their
    fp32 rounding ~1e-8, the loss ~1e-3)."""
    from fusealign.kernels.reference import linear_logps_reference

    o = _split(options)
    _, model, _ = models(o["temperature"])
    ids, attention, labels, T = _sequences(batch)
    with torch.no_grad():
        hidden = model.model(input_ids=ids, attention_mask=attention, use_cache=False).last_hidden_state
        lp = linear_logps_reference(hidden[:, :-1][:, -T:].double(), model.lm_head.weight.double(),
                                    labels[:, 1:][:, -T:], temperature=o["temperature"], dtype=torch.float64)
    f64 = lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
    old = batch.get("old_per_token_logps")
    loss, _ = fa.grpo_loss(lp, f64(old), f64(batch["advantages"]), batch["completion_mask"],
                           **{k: f64(v) for k, v in _per_call(batch, o).items()}, **_our_options(o))
    return loss.item()


def compare(case: str, backend="torch", options=None, implementations=("linear_grpo_loss", "grpo_loss")):
    """One row of the parity table: TRL's loss and ours (fused and tensor twin), relative differences of the
    loss, of every parameter gradient (the worst), and of every metric TRL logs (the worst)."""
    options = CASES[case] if options is None else options
    trl_loss, trl_metrics, trl_grads, batch = trl_run(options)
    runs = {"linear_grpo_loss": lambda: ours_linear(options, batch, backend=backend),
            "grpo_loss": lambda: ours_tensor(options, batch)}
    rows = {}
    for name in implementations:
        loss, metrics, grads = runs[name]()
        assert grads.keys() == trl_grads.keys(), (sorted(grads), sorted(trl_grads))
        missing = sorted(set(trl_metrics) - set(metrics))
        rows[name] = dict(
            loss=loss.item(), loss_rel=abs(loss.item() - trl_loss.item()) / max(abs(trl_loss.item()), 1e-30),
            grad_rel=max(rel(grads[k], trl_grads[k]) for k in trl_grads),
            metric_rel=_metric_rel(metrics, {k: v for k, v in trl_metrics.items() if k not in missing}),
            metrics_missing=missing)
        if name == "linear_grpo_loss" and not rows[name]["loss_rel"] < LOSS_RTOL:
            # Our own fused head's log-probs round differently from TRL's: which one is nearer the float64 loss?
            exact = float64_loss(options, batch)
            rows[name].update(loss_err64=abs(loss.item() - exact), trl_err64=abs(trl_loss.item() - exact))
    return dict(case=case, trl=trl_loss.item(), metrics=sorted(trl_metrics), **rows)


def table(results) -> str:
    """case × TRL value × ours × max relative difference (loss, gradients, metrics)."""
    head = (f"{'loss type, IS level, clipping, KL, vLLM IS mode':<52} {'TRL 1.16':>11} {'fa.linear_grpo':>14} "
            f"{'fa.grpo_loss':>12} {'max rel diff: loss':>18} {'grads':>8} {'metrics':>8}")
    lines = [head, "-" * len(head)]
    for r in results:
        impls = [r[k] for k in ("linear_grpo_loss", "grpo_loss") if k in r]
        lin = r.get("linear_grpo_loss", {}).get("loss", float("nan"))
        ten = r.get("grpo_loss", {}).get("loss", float("nan"))
        lines.append(f"{r['case']:<52} {r['trl']:>11.7f} {lin:>14.7f} {ten:>12.7f} "
                     f"{max(i['loss_rel'] for i in impls):>18.1e} {max(i['grad_rel'] for i in impls):>8.1e} "
                     f"{max(i['metric_rel'] for i in impls):>8.1e}")
    return "\n".join(lines)
