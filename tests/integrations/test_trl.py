"""fusealign.integrations.trl against TRL 1.16 itself (CPU; TRL is a test dependency).

1. `ChunkedLogProb` vs TRL's `ChunkedLogProbFunction` on random inputs: the five outputs and the gradients of
   hidden, weight and bias, with softcap, logit scale, bias and temperature (TRL's own torch tile path on CPU).
2. `DPOTrainer` and `GRPOTrainer` (tiny Llama from a config, the built-in task's tokenizer and prompts, a
   reward function), a few steps with and without `enable()`: every logged metric (losses, rewards, log-probs,
   entropy, logits/*, accuracy, grad norm) and the trained weights agree within 1e-4 relative.
"""

import math

import pytest
import torch

trl = pytest.importorskip("trl")

from fusealign.integrations import trl as fa_trl  # noqa: E402
from trl.kernels import ChunkedLogProbFunction  # noqa: E402

HEADS = [dict(temperature=1.0), dict(temperature=0.7, final_logit_softcapping=3.0),
         dict(temperature=1.3, logit_scale=0.6), dict(temperature=0.9, final_logit_softcapping=2.0, logit_scale=1.7)]


def run_head(fn, h, W, b, y, opts, outputs):
    h, W = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
    b = None if b is None else b.clone().requires_grad_(True)
    out = fn.apply(h, W, b, y, opts.get("temperature", 1.0), 64, opts.get("final_logit_softcapping"),
                   opts.get("logit_scale", 1.0), outputs)
    g = torch.linspace(-1, 1, len(y))
    loss = (out[0] * g).sum() + (0 if out[1] is None else (out[1] * g.flip(0)).sum())
    loss.backward()
    return out, [t.grad for t in (h, W, b) if t is not None]


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("opts", HEADS, ids=["plain", "softcap", "scale", "softcap+scale"])
def test_chunked_logprob_matches_trl(opts, bias):
    g = torch.Generator().manual_seed(0)
    N, H, V = 40, 32, 301  # V: not a multiple of TRL's 64-wide test chunks nor of our tiles
    h = torch.randn(N, H, generator=g) * 2
    W = torch.randn(V, H, generator=g) / H ** 0.5
    b = torch.randn(V, generator=g) if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    y[::3] = (h @ W.T + (0 if b is None else b)).argmax(-1)[::3]  # is_top1 true on a third of the rows
    ref, ref_grads = run_head(ChunkedLogProbFunction, h, W, b, y, opts, fa_trl.TRL_OUTPUTS[1:])
    ours, grads = run_head(fa_trl.ChunkedLogProb, h, W, b, y, opts, fa_trl.TRL_OUTPUTS[1:])
    # float64 final logits: is_top1 is compared where the top two differ by more than fp32 rounding (a
    # saturated softcap makes exact fp32 ties that the two formulas may round either way).
    z = (h.double() @ W.double().T + (0 if b is None else b.double())) * opts.get("logit_scale", 1.0)
    if opts.get("final_logit_softcapping"):
        z = opts["final_logit_softcapping"] * torch.tanh(z / opts["final_logit_softcapping"])
    top2 = z.topk(2, -1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-5 * (1 + top2[:, 0].abs())
    for name, a, e in zip(fa_trl.TRL_OUTPUTS, ours, ref):
        assert a.dtype == e.dtype and a.shape == e.shape, name
        if a.dtype == torch.bool:
            assert torch.equal(a[clear], e[clear]) and clear.float().mean() > 0.5, name
        else:
            assert (a - e).abs().max() < 2e-5, (name, (a - e).abs().max())
    for a, e in zip(grads, ref_grads):
        assert ((a - e).norm() / e.norm()) < 1e-5
    assert ours[4].any()


def test_only_requested_outputs_and_no_grad_through_statistics():
    g = torch.Generator().manual_seed(1)
    h, W = torch.randn(8, 16, generator=g, requires_grad=True), torch.randn(50, 16, generator=g)
    y = torch.randint(0, 50, (8,), generator=g)
    out = fa_trl.ChunkedLogProb.apply(h, W, None, y, 1.0, 64, None, 1.0, ("log_probs", "is_top1"))
    ref = ChunkedLogProbFunction.apply(h, W, None, y, 1.0, 64, None, 1.0, ("log_probs", "is_top1"))
    assert [o is None for o in out] == [o is None for o in ref] == [False, True, True, True, False]
    assert not out[4].requires_grad and out[0].requires_grad


def test_autocast_and_fp32_head():
    """bf16 autocast: both compute from bf16 operands — TRL rounds its logit tiles to bf16, we keep them fp32, so
    against the float64 reference on the same bf16 values ours is the closer; `cast_lm_head_to_fp32`: fp32 states
    and a bf16 weight, computed in fp32 by both."""
    from fusealign.kernels.reference import linear_logps_reference

    g = torch.Generator().manual_seed(2)
    h, W = torch.randn(12, 32, generator=g), (torch.randn(70, 32, generator=g) / 6)
    y = torch.randint(0, 70, (12,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = fa_trl.ChunkedLogProb.apply(h, W, None, y, 1.0, 64, None, 1.0, ("entropy",))
        e = ChunkedLogProbFunction.apply(h, W, None, y, 1.0, 64, None, 1.0, ("entropy",))
    ref = linear_logps_reference(h.bfloat16().double(), W.bfloat16().double(), y, return_entropy=True,
                                 dtype=torch.float64)
    for ours, trls, r in zip(a[:2], e[:2], ref):
        assert ours.dtype == trls.dtype == torch.float32
        assert (ours - r).abs().max() < 1e-5 and (trls - r).abs().max() < 1e-2
    a = fa_trl.ChunkedLogProb.apply(h, W.bfloat16(), None, y, 1.0, 64, None, 1.0, ())
    e = ChunkedLogProbFunction.apply(h, W.bfloat16(), None, y, 1.0, 64, None, 1.0, ())
    assert (a[0] - e[0]).abs().max() < 1e-5


def test_enable_disable_and_version_range(monkeypatch):
    from trl.trainer import utils

    original = utils._ChunkedLogProbFunction
    fa_trl.enable()
    fa_trl.enable()  # idempotent
    assert utils._ChunkedLogProbFunction is fa_trl.ChunkedLogProb
    fa_trl.disable()
    assert utils._ChunkedLogProbFunction is original and not fa_trl.enabled()
    monkeypatch.setattr(trl, "__version__", "1.15.2")
    with pytest.raises(RuntimeError, match=r"trl>=1\.16,<1\.17"):
        fa_trl.enable()
    assert utils._ChunkedLogProbFunction is original


# --- trainers -------------------------------------------------------------------------------------------------
def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    from fusealign.engine.study import task

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(task.VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=2, eos_token_id=3, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def run_trainer(make, enable):
    """Train with TRL's own fused head or fusealign's; -> (log history, trained weights)."""
    if enable:
        fa_trl.enable()
    try:
        trainer = make()
        trainer.train()
    finally:
        fa_trl.disable()
    return trainer.state.log_history, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def assert_same_runs(a, b, *, min_metrics):
    (log_a, w_a), (log_b, w_b) = a, b
    assert len(log_a) == len(log_b)
    compared = set()
    for step_a, step_b in zip(log_a, log_b):
        assert step_a.keys() == step_b.keys()
        for k, va in step_a.items():
            vb = step_b[k]
            if not isinstance(va, float) or k.endswith(("runtime", "per_second", "_time")) or k in ("epoch", "learning_rate"):
                continue
            compared.add(k)
            assert math.isclose(va, vb, rel_tol=1e-4, abs_tol=1e-6), (k, va, vb)
    assert len(compared) >= min_metrics, compared
    for n in w_a:
        assert ((w_a[n] - w_b[n]).norm() / w_a[n].norm()) < 1e-4, n
    return compared


def test_dpo_trainer_with_and_without_fusealign(tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from fusealign.engine.study import task

    # Completions start with a space: TRL joins prompt + completion as strings (a word-level tokenizer).
    pairs = [{"prompt": r["prompt"], "chosen": " " + r["chosen"], "rejected": " " + r["rejected"]}
             for r in task.pair_records(8, seed=0)]

    def make():
        args = DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=3, per_device_train_batch_size=4,
                         learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, seed=0, save_strategy="no",
                         max_length=32, use_weighting=True, disable_tqdm=True, bf16=False)
        return DPOTrainer(model=tiny_model(), ref_model=tiny_model(), args=args, train_dataset=Dataset.from_list(pairs),
                          processing_class=task.tokenizer())

    compared = assert_same_runs(run_trainer(make, False), run_trainer(make, True), min_metrics=8)
    assert {"loss", "rewards/margins", "logps/chosen", "entropy", "grad_norm"} <= compared, compared


def test_grpo_trainer_with_and_without_fusealign(tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from fusealign.engine.study import task

    import random

    rng = random.Random(0)
    prompts = [{"prompt": task.prompt(rng)} for _ in range(8)]

    def reward(completions, **_):  # the built-in task's ground truth
        return [task.reward(c) for c in completions]

    model_dir = tmp_path / "tiny"  # GRPO loads its reference model by path: a local directory, nothing from a hub
    tiny_model().save_pretrained(model_dir)

    def make():
        args = GRPOConfig(output_dir=str(tmp_path / "grpo"), max_steps=2, per_device_train_batch_size=4,
                          num_generations=4, max_completion_length=8, learning_rate=1e-2, logging_steps=1,
                          report_to=[], use_cpu=True, seed=0, save_strategy="no", beta=0.04, disable_tqdm=True, bf16=False)
        return GRPOTrainer(model=str(model_dir), reward_funcs=reward, args=args, train_dataset=Dataset.from_list(prompts),
                           processing_class=task.tokenizer())

    compared = assert_same_runs(run_trainer(make, False), run_trainer(make, True), min_metrics=6)
    assert {"loss", "kl", "entropy", "grad_norm"} <= compared, compared
