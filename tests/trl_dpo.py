"""TRL 1.16's own DPO loss code, driven on a tiny model, beside fusealign's: the parity harness.

`trl_run` calls `DPOTrainer._compute_loss` — TRL's loss switch, f-divergences, WPO weighting and metrics,
unmodified — on a stub trainer (one process, precomputed reference log-probs) and a tiny Llama patched
with TRL's own fused LM head (`add_fused_lm_head`: TRL's `ChunkedLogProbFunction`, all five per-token
outputs). `ours_linear` runs the same backbone and `fa.linear_dpo_loss` on its hidden states and
`lm_head.weight`; `ours_tensor` runs `fa.dpo_loss` on TRL's own per-token log-probs (sequence sums), so
the only difference left there is the loss itself. Each returns (loss, metrics, gradients of every model
parameter). Used by tests/losses/test_trl_parity.py and scripts/dpo_parity.py (the parity table).
"""

from __future__ import annotations

import functools
from collections import defaultdict
from types import SimpleNamespace

import torch

import fusealign as fa

TRL_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")
# What `_compute_loss` logs for every loss type (besides num_tokens, a trainer counter, and MoE's aux_loss).
TRL_METRICS_LOGGED = ("entropy", "logits/chosen", "logits/rejected", "logps/chosen", "logps/rejected",
                      "mean_token_accuracy", "rewards/accuracies", "rewards/chosen", "rewards/margins",
                      "rewards/rejected")
# DPOConfig fields that `_compute_loss` reads, with TRL's defaults.
TRL_DEFAULTS = dict(beta=0.1, loss_type=["sigmoid"], loss_weights=None, label_smoothing=0.0,
                    f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, use_weighting=False,
                    discopop_tau=0.05)

# loss type × options: every TRL 1.16 loss type, every f-divergence, label smoothing, WPO, multi-loss.
CASES = {
    **{t: dict(loss_type=t) for t in ("sigmoid", "hinge", "ipo", "nca_pair", "bco_pair", "sppo_hard", "aot",
                                      "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")},
    "exo_pair ε=1e-3": dict(loss_type="exo_pair", label_smoothing=1e-3),
    "robust ε=0.1": dict(loss_type="robust", label_smoothing=0.1),
    "exo_pair ε=0.2": dict(loss_type="exo_pair", label_smoothing=0.2),
    "aot ε=0.1": dict(loss_type="aot", label_smoothing=0.1),
    "aot_unpaired ε=0.2": dict(loss_type="aot_unpaired", label_smoothing=0.2),
    "discopop τ=0.5": dict(loss_type="discopop", discopop_tau=0.5),
    **{f"{t} {f}": dict(loss_type=t, f_divergence_type=f) for t in ("sigmoid", "ipo")
       for f in ("forward_kl", "js_divergence", "alpha_divergence")},
    "hinge alpha α=0.3": dict(loss_type="hinge", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
    "sigmoid_norm js_divergence": dict(loss_type="sigmoid_norm", f_divergence_type="js_divergence"),
    "robust ε=0.1 forward_kl": dict(loss_type="robust", label_smoothing=0.1, f_divergence_type="forward_kl"),
    "sigmoid WPO": dict(loss_type="sigmoid", use_weighting=True),
    "ipo WPO": dict(loss_type="ipo", use_weighting=True),
    "apo_zero WPO": dict(loss_type="apo_zero", use_weighting=True),
    "MPO sigmoid+bco_pair+sft": dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
    "RPO sigmoid+sft": dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
    "ipo+exo_pair js WPO": dict(loss_type=["ipo", "exo_pair"], loss_weights=[0.3, 1.5], label_smoothing=0.05,
                                f_divergence_type="js_divergence", use_weighting=True),
}


def tiny_model(seed=0, vocab=97):
    from transformers import LlamaConfig, LlamaForCausalLM

    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    model = LlamaForCausalLM(cfg).float()
    with torch.no_grad():  # a head with some spread, so that log-probs, margins and top-1 hits vary
        model.lm_head.weight.mul_(4.0)
    add_fused_lm_head(model, outputs=TRL_OUTPUTS)  # TRL's own head, all five per-token outputs
    return model


def make_inputs(B=6, L=14, vocab=97, seed=0):
    """A padded [chosen; rejected] batch as TRL's collator makes it (prompt, completion, right padding), with
    precomputed reference log-probs (the policy's own at init, shifted by N(0, 3²) per sequence)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab, (2 * B, L), generator=g)
    attention_mask = torch.zeros(2 * B, L, dtype=torch.long)
    completion_mask = torch.zeros(2 * B, L, dtype=torch.long)
    for i in range(2 * B):
        prompt = 2 + (i * 3) % 4              # 2–5 prompt tokens
        end = L - (i * 5) % 6                 # 0–5 padding positions, so completions have 4–12 tokens
        attention_mask[i, :end] = 1
        completion_mask[i, prompt:end] = 1
        input_ids[i, end:] = 0
    return dict(input_ids=input_ids, attention_mask=attention_mask, completion_mask=completion_mask,
                ref_shift=3.0 * torch.randn(2 * B, generator=g, dtype=torch.float64))


def with_reference(model, inputs):
    """inputs + ref_chosen_logps / ref_rejected_logps (what TRL's precompute would store)."""
    with torch.no_grad():
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    labels=_labels(inputs), fused_lm_head=True)
    ref = out.log_probs.double().sum(1) + inputs["ref_shift"]
    B = ref.shape[0] // 2
    batch = {k: v for k, v in inputs.items() if k != "ref_shift"}
    return {**batch, "ref_chosen_logps": ref[:B].float(), "ref_rejected_logps": ref[B:].float()}


def _labels(inputs):
    return inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)


def _grads(model):
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


class _OneProcess:
    """The slice of `accelerate.Accelerator` that `_compute_loss` uses, for a single CPU process."""

    device = torch.device("cpu")

    @staticmethod
    def gather(t):
        return t

    gather_for_metrics = gather


def trl_run(model, batch, backward=True, **options):
    """TRL 1.16's `DPOTrainer._compute_loss` (unmodified) on `batch`: (loss, metrics, grads)."""
    from trl import DPOTrainer

    o = {**TRL_DEFAULTS, **options}
    trainer = DPOTrainer.__new__(DPOTrainer)  # the loss method and the state it reads; no Trainer set-up
    trainer.__dict__.update(
        model=model, ref_model=None, accelerator=_OneProcess(), precompute_ref_logps=True, ld_alpha=None,
        aux_loss_enabled=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1, beta=o["beta"],
        loss_types=[o["loss_type"]] if isinstance(o["loss_type"], str) else list(o["loss_type"]),
        f_divergence_type=o["f_divergence_type"], f_alpha_divergence_coef=o["f_alpha_divergence_coef"],
        label_smoothing=o["label_smoothing"], use_weighting=o["use_weighting"],
        args=SimpleNamespace(discopop_tau=o["discopop_tau"], gradient_checkpointing_kwargs=None))
    trainer.loss_weights = o["loss_weights"] or [1.0] * len(trainer.loss_types)
    model.train()
    loss = DPOTrainer._compute_loss(trainer, model, dict(batch), False)
    if backward:
        loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k != "num_tokens"}
    return loss.detach(), metrics, _grads(model)


def _completion_inputs(model, batch):
    """Backbone hidden states at the positions that predict a token, and the shifted labels (−100 elsewhere)."""
    h = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return h[:, :-1], _labels(batch)[:, 1:]


def ours_linear(model, batch, backend="torch", **options):
    """`fa.linear_dpo_loss` on the same backbone's hidden states and head: (loss, metrics, grads)."""
    model.train()
    hidden, targets = _completion_inputs(model, batch)
    loss, metrics = fa.linear_dpo_loss(hidden, model.lm_head.weight, targets, ref_chosen_logps=batch["ref_chosen_logps"],
                                       ref_rejected_logps=batch["ref_rejected_logps"], backend=backend, **options)
    loss.backward()
    return loss.detach(), {k: v.item() for k, v in metrics.items()}, _grads(model)


def ours_tensor(model, batch, **options):
    """`fa.dpo_loss` on TRL's own per-token outputs (sequence sums, counts, WPO log-weights): (loss, {}, grads)."""
    model.train()
    labels = _labels(batch)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                fused_lm_head=True)
    mask = (labels[:, 1:] != -100)
    seq, n = out.log_probs.sum(1), mask.sum(1)
    B = seq.shape[0] // 2
    wpo = {}
    if options.get("use_weighting"):
        a = ((out.log_probs.detach() - out.log_sum_sq_probs) * mask).sum(1) / n
        wpo = dict(chosen_wpo_logps=a[:B], rejected_wpo_logps=a[B:])
    losses, _, _ = fa.dpo_loss(seq[:B], seq[B:], batch["ref_chosen_logps"], batch["ref_rejected_logps"],
                               chosen_lengths=n[:B], rejected_lengths=n[B:], **wpo, **options)
    loss = losses.mean()
    loss.backward()
    return loss.detach(), {}, _grads(model)


@functools.lru_cache(maxsize=2)
def model_and_batch(seed=0):
    """The tiny model and its batch, built once per seed (nothing updates the weights; gradients are cleared)."""
    model = tiny_model(seed)
    return model, with_reference(model, make_inputs(seed=seed))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 (0 when both are 0)."""
    a, b = a.double(), b.double()
    d, n = (a - b).norm().item(), b.norm().item()
    return d if n == 0 else d / n


def compare(case: str, backend="torch", options=None, seed=0):
    """One row of the parity table: TRL's loss and ours (fused and tensor twin), relative differences of the
    loss, of every parameter gradient (the worst), and of every metric TRL logs (the worst)."""
    options = CASES[case] if options is None else options
    model, batch = model_and_batch(seed)
    trl_loss, trl_metrics, trl_grads = trl_run(model, batch, **options)
    rows = {}
    for name, fn in (("linear_dpo_loss", lambda: ours_linear(model, batch, backend=backend, **options)),
                     ("dpo_loss", lambda: ours_tensor(model, batch, **options))):
        loss, metrics, grads = fn()
        assert grads.keys() == trl_grads.keys(), (sorted(grads), sorted(trl_grads))
        rows[name] = dict(
            loss=loss.item(), loss_rel=abs(loss.item() - trl_loss.item()) / max(abs(trl_loss.item()), 1e-30),
            grad_rel=max(rel(grads[k], trl_grads[k]) for k in trl_grads),
            metric_rel=max((abs(metrics[k] - v) / max(abs(v), 1e-6) for k, v in trl_metrics.items()
                            if k in metrics), default=0.0),
            metrics_missing=sorted(set(trl_metrics) - set(metrics)) if metrics else [])
    return dict(case=case, trl=trl_loss.item(), metrics=sorted(trl_metrics), **rows)


def table(results) -> str:
    """loss type × TRL value × ours × max relative difference (loss, gradients, metrics)."""
    head = (f"{'loss type / options':<28} {'TRL 1.16':>12} {'fa.linear_dpo_loss':>19} {'fa.dpo_loss':>12} "
            f"{'max rel diff: loss':>18} {'grads':>8} {'metrics':>8}")
    lines = [head, "-" * len(head)]
    for r in results:
        lin, ten = r["linear_dpo_loss"], r["dpo_loss"]
        lines.append(f"{r['case']:<28} {r['trl']:>12.7f} {lin['loss']:>19.7f} {ten['loss']:>12.7f} "
                     f"{max(lin['loss_rel'], ten['loss_rel']):>18.1e} {max(lin['grad_rel'], ten['grad_rel']):>8.1e} "
                     f"{lin['metric_rel']:>8.1e}")
    return "\n".join(lines)
