"""Rollouts are the policy's own: the sampler draws from exactly the distribution the scorer computes, whatever
the checkpoint's generation_config.json holds; the sampler's log-probs prove it (TRL's
sampling/sampling_logp_difference); dropout is off wherever a model hides it, so PPO's step-0 identities hold."""

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import (LlamaConfig, MinNewTokensLengthLogitsProcessor, NoRepeatNGramLogitsProcessor, OPTConfig,
                          PretrainedConfig, RepetitionPenaltyLogitsProcessor, SuppressTokensLogitsProcessor)

from fusealign.engine import ppo as ppo_module
from fusealign.engine.study import task
from fusealign.engine.config import PPOConfig
from fusealign.engine.data import collate
from fusealign.engine.models import RewardModel, disable_dropout, load_causal_lm, model_from_config, score_tokens
from fusealign.engine.onpolicy import label_pairs
from fusealign.engine.ppo import PPOTrainer, to_padded
from fusealign.engine.recipes import load_tokenizer, run_ppo
from fusealign.engine.sampling import HFGenerate, SamplingParams, sample, sampling_logp_difference

TOK = task.tokenizer()
V = len(task.VOCAB)
SPECIAL = dict(bos_token_id=TOK.bos_token_id, eos_token_id=TOK.eos_token_id, pad_token_id=TOK.pad_token_id)
# The checkpoint's generation config of deliverable 2 (what `generate` would apply unless told otherwise).
DIRTY = dict(repetition_penalty=1.3, no_repeat_ngram_size=2, suppress_tokens=[10, 11, 12], min_new_tokens=4)


def prompts(n: int, seed: int = 0):
    """Built-in prompts of 3–6 words: left padding differs from row to row."""
    return [[TOK.bos_token_id] + TOK.encode(p, add_special_tokens=False) for p in task.eval_prompts(n, seed)]


def opt_config(**kw):
    return OPTConfig(vocab_size=V, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=64, word_embed_proj_dim=64, tie_word_embeddings=False, **SPECIAL, **kw)


def model_dir(path: Path, config, generation: dict = None, seed: int = 0) -> str:
    """A local checkpoint (weights, config, generation_config.json, the built-in tokenizer)."""
    m = model_from_config(config, seed=seed)
    for k, v in (generation or {}).items():
        setattr(m.generation_config, k, v)
    m.save_pretrained(path)
    TOK.save_pretrained(path)
    return str(path)


def scored(model, outs, ps, temperature: float = 1.0, pack: bool = True):
    """(scorer log-probs, sampler log-probs, mask), each (S, T): the fused scoring of the sampled tokens."""
    seqs = [(p, o.ids + ([TOK.eos_token_id] if o.ended else [])) for p, o in zip(ps, outs)]
    T = max(len(c) for _, c in seqs)
    mask, samp = torch.zeros(len(seqs), T, dtype=torch.bool), torch.zeros(len(seqs), T)
    for i, (_, c) in enumerate(seqs):
        mask[i, :len(c)] = True
        samp[i, :len(c)] = outs[i].logps
    with torch.no_grad():
        s = score_tokens(model, collate(seqs, pad_id=TOK.pad_token_id, pack=pack), temperature=temperature)
    return to_padded(s.logps, mask), samp, mask


def naive_logps(model, outs, ps, temperature: float):
    """Per completion, the float64 log-softmax of the full HF logits / T at every sampled token: a list of (n,)
    rows and of (n, V) distributions (independent of the fused scorer)."""
    rows, dists = [], []
    with torch.no_grad():
        for p, o in zip(ps, outs):
            y = o.ids + ([TOK.eos_token_id] if o.ended else [])
            logits = model(torch.tensor([p + y])).logits[0, len(p) - 1: len(p) - 1 + len(y)].double()
            lp = torch.log_softmax(logits / temperature, -1)  # (n, V)
            rows.append(lp[torch.arange(len(y)), torch.tensor(y)])
            dists.append(lp)
    return rows, dists


# --- the metric and the parameters -----------------------------------------------------------------------
def test_sampling_logp_difference_by_hand():
    """Tokens (0,0) (0,1) (1,0) real, the rest padding: |δ| = 0.1, 0, 0.3 → mean 0.4/3, max 0.3; a NaN token is
    left out (as TRL leaves out tokens vLLM could not score); nothing to compare → 0."""
    old = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    samp = torch.tensor([[-1.1, -2.0, 9.0], [-0.2, float("nan"), 7.0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    d = sampling_logp_difference(old, samp, mask)
    assert d["sampling/sampling_logp_difference/mean"] == pytest.approx(0.4 / 3, abs=1e-6)
    assert d["sampling/sampling_logp_difference/max"] == pytest.approx(0.3, abs=1e-6)
    assert set(sampling_logp_difference(old, samp, torch.zeros_like(mask)).values()) == {0.0}


@pytest.mark.parametrize("kw, name", [(dict(temperature=0.0), "temperature"), (dict(top_p=0.0), "top_p"),
                                      (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"), (dict(n=0), "n"),
                                      (dict(max_new_tokens=0), "max_new_tokens")])
def test_sampling_params_refuse_bad_values(kw, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kw)
    assert not SamplingParams().truncated and SamplingParams(top_p=0.9).truncated and SamplingParams(top_k=5).truncated


# --- deliverables 1 and 2: the clean configuration, proven by the sampler's own log-probs ----------------------
def test_a_checkpoints_generation_config_does_not_reach_the_rollouts(tmp_path):
    """fp32 on CPU, a checkpoint whose generation_config.json sets repetition_penalty 1.3, no_repeat_ngram_size 2,
    suppress_tokens and min_new_tokens 4: the sampler's log-probs equal the fused scoring of the same tokens
    (< 1e-4) and a float64 naive log-softmax (< 1e-5). Negative control: the same processors applied on purpose
    (as `generate` applies a checkpoint's) — the metric sees them (> 1e-2), so the assertion above can fail."""
    model = load_causal_lm(model_dir(tmp_path / "m", task.model_config(), DIRTY))
    assert model.generation_config.repetition_penalty == 1.3  # the checkpoint really carries them
    ps = prompts(48)
    params = SamplingParams(temperature=0.8, max_new_tokens=16, seed=3)
    outs = HFGenerate(model, TOK).sample(ps, params)
    assert model.generation_config.suppress_tokens == [10, 11, 12]  # restored after sampling
    assert any(o.ended for o in outs) and not all(o.ended for o in outs)  # EOS inside and at the length limit
    assert all(len(o.logps) == len(o.ids) + o.ended for o in outs)
    assert any(len(o.ids) < 4 and o.ended for o in outs) or any(t in o.ids for o in outs for t in (10, 11, 12))
    d = sampling_logp_difference(*scored(model, outs, ps, temperature=0.8))
    assert d["sampling/sampling_logp_difference/max"] < 1e-4, d
    rows, _ = naive_logps(model, outs, ps, 0.8)
    assert max((r - o.logps.double()).abs().max().item() for r, o in zip(rows, outs)) < 1e-5

    L = max(len(p) for p in ps)
    theirs = [RepetitionPenaltyLogitsProcessor(1.3), NoRepeatNGramLogitsProcessor(2),
              SuppressTokensLogitsProcessor([10, 11, 12]), MinNewTokensLengthLogitsProcessor(L, 4, TOK.eos_token_id)]
    dirty = HFGenerate(model, TOK, batch_size=len(ps), processors=theirs).sample(ps, params)
    d_dirty = sampling_logp_difference(*scored(model, dirty, ps, temperature=0.8))
    assert d_dirty["sampling/sampling_logp_difference/max"] > 1e-2, d_dirty
    assert not any(t in o.ids for o in dirty for t in (10, 11, 12))  # the processors did act


def test_same_tokens_as_before_on_a_plain_checkpoint():
    """Without a generation config to remove, the rollouts are the ones `generate` drew before (same seeds, same
    draws): committed results (compare.json) do not move."""
    model = model_from_config(task.model_config(), seed=0).eval()
    ps = prompts(12)
    gen = torch.Generator().manual_seed(5)
    L = max(len(p) for p in ps)
    ids, mask = torch.full((len(ps), L), TOK.pad_token_id), torch.zeros((len(ps), L), dtype=torch.long)
    for j, p in enumerate(ps):
        ids[j, L - len(p):], mask[j, L - len(p):] = torch.tensor(p), 1
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    before = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.7, top_p=0.9, top_k=0,
                            max_new_tokens=10, eos_token_id=TOK.eos_token_id, pad_token_id=TOK.pad_token_id)
    now = sample(model, TOK, ps, max_new_tokens=10, temperature=0.7, top_p=0.9, seed=5)
    for row, (c, ended) in zip(before[:, L:].tolist(), now):
        assert row[:len(c) + ended] == c + ([TOK.eos_token_id] if ended else [])


@pytest.mark.parametrize("truncation", [dict(top_k=5), dict(top_p=0.7)])
def test_truncated_sampling_shows_its_gap(truncation):
    """top-k / top-p: the sampler's log-prob of each token is the scorer's minus log(kept mass), the kept set
    computed here in float64 (top-k: the k largest; top-p: the most likely tokens until their mass reaches p);
    every sampled token is in it; and the metric reports the gap (mean > 1e-2) instead of hiding it."""
    model = model_from_config(task.model_config(), seed=0).eval()
    ps = prompts(16)
    outs = HFGenerate(model, TOK).sample(ps, SamplingParams(max_new_tokens=8, seed=1, **truncation))
    _, dists = naive_logps(model, outs, ps, 1.0)
    for o, lp in zip(outs, dists):
        y = torch.tensor(o.ids + ([TOK.eos_token_id] if o.ended else []))
        p_sorted, order = lp.exp().sort(-1, descending=True)  # (n, V)
        if "top_k" in truncation:
            keep_n = torch.full((len(y),), truncation["top_k"])
        else:  # the smallest prefix of the sorted tokens whose mass is >= p
            keep_n = (p_sorted.cumsum(-1) < truncation["top_p"]).sum(-1) + 1
        kept = torch.arange(V)[None] < keep_n[:, None]
        mass = (p_sorted * kept).sum(-1)
        rank = (order == y[:, None]).double().argmax(-1)
        assert bool((rank < keep_n).all())  # never a truncated token
        expected = lp[torch.arange(len(y)), y] - mass.log()
        assert (expected - o.logps.double()).abs().max().item() < 1e-5
    d = sampling_logp_difference(*scored(model, outs, ps))
    assert d["sampling/sampling_logp_difference/mean"] > 1e-2


def test_n_samples_per_prompt_are_consecutive_and_differ():
    """n = 4: 4 · len(prompts) completions, the 4 of a prompt consecutive (scored against their own prompt)."""
    model = model_from_config(task.model_config(), seed=0).eval()
    ps = prompts(3)
    outs = HFGenerate(model, TOK).sample(ps, SamplingParams(max_new_tokens=8, n=4, seed=2))
    assert len(outs) == 12 and len({tuple(o.ids) for o in outs[:4]}) > 1
    d = sampling_logp_difference(*scored(model, outs, [p for p in ps for _ in range(4)]))
    assert d["sampling/sampling_logp_difference/max"] < 1e-4


# --- deliverable 3: dropout off wherever it hides ------------------------------------------------------------------
def _dropout_state(model) -> dict:
    """Every dropout-like number left in modules, module attributes and configs (nested ones too)."""
    found = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Dropout) and m.p:
            found[f"{name}.p"] = m.p
        for k, v in vars(m).items():
            if isinstance(v, float) and ("drop" in k) and v:
                found[f"{name}.{k}"] = v
    cfgs = [model.config] + [v for v in vars(model.config).values() if isinstance(v, PretrainedConfig)]
    for c in cfgs:
        for k, v in c.to_diff_dict().items():
            if isinstance(v, float) and "drop" in k and v:
                found[f"config.{k}"] = v
    return found


@pytest.mark.parametrize("config", [task.model_config(attention_dropout=0.1),
                                    opt_config(dropout=0.1, attention_dropout=0.1, activation_dropout=0.1,
                                               layerdrop=0.1)], ids=["llama", "opt"])
def test_disable_dropout_reaches_configs_and_cached_copies(config):
    """Before: the train-mode forward is random (dropout read from the config / cached on modules, not an
    nn.Dropout). After disable_dropout: nothing dropout-like is left, and train mode equals eval mode bit for bit."""
    model = model_from_config(config, seed=0)
    x = torch.tensor([prompts(1)[0] * 3])
    model.train()
    assert _dropout_state(model)
    assert not torch.equal(model(x).logits, model(x).logits)  # dropout is live in train mode
    disable_dropout(model)
    assert _dropout_state(model) == {}
    train_logits = model(x).logits
    assert torch.equal(train_logits, model.eval()(x).logits)


def test_disable_dropout_nested_text_config_and_reward_model():
    """A config nested as text_config (vision-language models) and the critic / reward-model wrapper (whose
    `config` is a property of its LM) are reached too."""
    outer = PretrainedConfig()
    outer.text_config = LlamaConfig(attention_dropout=0.2, hidden_dropout=0.3)
    holder = nn.Module()
    holder.config = outer
    disable_dropout(holder)
    assert outer.text_config.attention_dropout == 0.0 and outer.text_config.hidden_dropout == 0.0
    rm = RewardModel(model_from_config(task.model_config(attention_dropout=0.1), seed=0))
    disable_dropout(rm)
    assert rm.config.attention_dropout == 0.0
    assert all(getattr(m, "attention_dropout", 0.0) == 0.0 for m in rm.modules())


def _trainer(model_path: str, **kw) -> PPOTrainer:
    """PPOTrainer on a local checkpoint with the built-in reward, the policy in train mode (as handed over by a
    caller who just trained it): scoring then runs in train mode too, so dropout would reach old_logps."""
    cfg = PPOConfig(model=model_path, reward_fn="builtin", batch_size=4, max_new_tokens=8, device="cpu",
                    critic="policy_head", num_ppo_epochs=1, **kw)
    policy, ref = load_causal_lm(model_path).train(), load_causal_lm(model_path)
    return PPOTrainer(cfg, policy, ref, load_tokenizer(model_path), reward_fn=task.reward, prompts=prompts(8))


def _old_disable_dropout(model):  # main before this change: nn.Dropout modules only
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_ppo_step0_identities_with_config_dropout(tmp_path, monkeypatch, arch):
    """A Llama with attention_dropout = 0.1 and an OPT with dropout = 0.1 (OPT: padded batches, see the note):
    through `fusealign ppo --model <dir>`, iteration 0 has first/ratio_mean exactly 1 and objective/kl exactly 0;
    the same holds with the policy handed over in train mode. Negative control: with dropout disabled in
    nn.Dropout modules only (as before), the train-mode run misses both identities.

    OPT is scored with --no-pack: it builds its causal mask without position_ids, so packed sequences would attend
    across each other (sampling_logp_difference/max 0.27 packed, 1e-6 padded: scripts/sampling_mismatch.py)."""
    config = task.model_config(attention_dropout=0.1) if arch == "llama" else opt_config(dropout=0.1)
    path = model_dir(tmp_path / "m", config)
    pack = arch == "llama"
    run_ppo(PPOConfig(model=path, output_dir=str(tmp_path / "run"), reward_fn="builtin", max_steps=1, batch_size=4,
                      max_new_tokens=8, device="cpu", critic="policy_head", pack=pack))
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["first/ratio_mean"] == 1.0 and first["objective/kl"] == 0.0, first
    assert first["sampling/sampling_logp_difference/max"] < 1e-4, first

    out = _trainer(path, pack=pack).iteration(prompts(4))
    assert out["first/ratio_mean"] == 1.0 and out["objective/kl"] == 0.0, out
    monkeypatch.setattr(ppo_module, "disable_dropout", _old_disable_dropout)
    out = _trainer(path, pack=pack).iteration(prompts(4))
    assert out["first/ratio_mean"] != 1.0 and out["objective/kl"] != 0.0, out


# --- deliverables 2, 4, 5 in PPO / GRPO ---------------------------------------------------------------------------
def test_ppo_and_grpo_log_the_sampling_difference_and_warn_on_truncation(tmp_path, capsys):
    """On the checkpoint with the dirty generation config, PPO (gae) and GRPO log TRL's
    sampling/sampling_logp_difference below 1e-4; with --top-p 0.8 one line at start says the samples are from
    the truncated distribution and the metric shows the gap; the rollout buffer carries sampler_logps (S, T)."""
    path = model_dir(tmp_path / "m", task.model_config(), DIRTY)
    kw = dict(model=path, reward_fn="builtin", max_steps=1, batch_size=4, max_new_tokens=8, device="cpu",
              critic="policy_head")
    run_ppo(PPOConfig(output_dir=str(tmp_path / "gae"), **kw))
    gae = json.loads((tmp_path / "gae" / "metrics.jsonl").read_text())
    assert gae["sampling/sampling_logp_difference/max"] < 1e-4, gae
    assert "truncated" not in capsys.readouterr().err
    run_ppo(PPOConfig(output_dir=str(tmp_path / "grpo"), advantage="grpo", num_generations=2, top_p=0.8, **kw))
    grpo = json.loads((tmp_path / "grpo" / "metrics.jsonl").read_text())
    err = capsys.readouterr().err
    assert sum("--top-p 0.8: samples come from the truncated" in line for line in err.splitlines()) == 1, err
    assert grpo["sampling/sampling_logp_difference/mean"] > 1e-2, grpo

    trainer = _trainer(path, top_k=5)
    ro = trainer.rollout(prompts(4))
    trainer.score(ro)
    assert ro.sampler_logps.shape == ro.mask.shape == ro.old_logps.shape
    gap = (ro.sampler_logps - ro.old_logps)[ro.mask]
    assert bool((gap > -1e-5).all()) and gap.mean() > 1e-2  # truncation only raises a kept token's probability


def test_objective_entropy_means_what_trls_means(tmp_path):
    """objective/entropy = Σ_t −log π(y_t) of the sampled tokens per sequence, averaged (TRL's PPOTrainer), and
    objective/entropy_exact = Σ_t H(π(·|s_t)), both against a float64 naive forward of the pre-update policy."""
    path = model_dir(tmp_path / "m", task.model_config())
    trainer = _trainer(path, temperature=0.7)
    before = copy.deepcopy(trainer.policy_model).eval()
    kept = {}
    rollout = trainer.rollout
    trainer.rollout = lambda p: kept.setdefault("ro", rollout(p))
    out = trainer.iteration(prompts(4))
    ro = kept["ro"]
    nll, ent = [], []
    with torch.no_grad():
        for p, c in ro.seqs:
            logits = before(torch.tensor([p + c])).logits[0, len(p) - 1: len(p) - 1 + len(c)].double()
            lp = torch.log_softmax(logits / 0.7, -1)
            nll.append(-lp[torch.arange(len(c)), torch.tensor(c)].sum())
            ent.append(-(lp.exp() * lp).sum())
    assert out["objective/entropy"] == pytest.approx(torch.stack(nll).mean().item(), abs=1e-4)
    assert out["objective/entropy_exact"] == pytest.approx(torch.stack(ent).mean().item(), abs=1e-4)
    assert abs(out["objective/entropy"] - out["objective/entropy_exact"]) > 1e-3  # two different quantities


# --- deliverable 5: on-policy / iterative DPO samples at --temperature ------------------------------------------------
def test_onpolicy_pairs_are_sampled_at_the_temperature(monkeypatch):
    """label_pairs draws at its temperature: with a peaked policy (head × 30), at T = 0.05 the two samples of a
    prompt are nearly always the greedy completion twice and carry no preference; at T = 1 they differ. And
    OnPolicyPairs (what `fusealign dpo --data onpolicy` builds with --temperature) hands its temperature over."""
    policy = model_from_config(task.model_config(), seed=0).eval()
    with torch.no_grad():
        policy.lm_head.weight.mul_(30)
    rm = RewardModel(model_from_config(task.model_config(), seed=1)).eval()
    ps = prompts(16)
    kw = dict(seed=0, max_new_tokens=8, missing_eos_penalty=1.0)
    assert len(label_pairs(policy, rm, TOK, ps, temperature=0.05, **kw)) <= 4
    assert len(label_pairs(policy, rm, TOK, ps, temperature=1.0, **kw)) >= 14

    from fusealign.engine import onpolicy

    seen = []
    monkeypatch.setattr(onpolicy, "label_pairs", lambda *a, **k: seen.append(k["temperature"]) or
                        label_pairs(*a, **k))
    stream = onpolicy.OnPolicyPairs(policy, rm, TOK, ps, batch_size=4, seed=0, prompts_per_round=8, resample_every=0,
                                    grad_accum=1, max_new_tokens=8, missing_eos_penalty=1.0,
                                    reference=lambda exs, batches: torch.zeros(len(exs), 2), temperature=0.7)
    stream.next_batch()
    assert seen == [0.7]
