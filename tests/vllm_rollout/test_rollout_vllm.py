"""vLLM rollouts (engine/rollout_vllm.py) against the fused scorer and HF generate, on the built-in task's tiny Llama
(random, peaked weights; untied and tied heads). Run in .venv-vllm (scripts/venv-vllm.sh): the main test run skips
them (no vLLM there).

One engine per head kind for the module (an engine start costs seconds; a weight push a tenth of one). The measured
figures are printed (pytest -s) for the README."""

import math
import os
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist

from fusealign.engine.data import collate
from fusealign.engine.distributed import init_distributed, shutdown
from fusealign.engine.errors import UserError
from fusealign.engine.models import model_from_config, score_tokens
from fusealign.engine.ppo import to_padded
from fusealign.engine.sampling import SamplingParams, sampling_logp_difference
from fusealign.engine.study import task

pytestmark = pytest.mark.vllm

TOK = task.tokenizer()
EOS = TOK.eos_token_id
REAL_SET_NUM_THREADS = torch.set_num_threads  # before any engine starts: vLLM's CPU worker replaces it
ENV_BEFORE = dict(os.environ)
TOL = 1e-4  # fp32: vLLM's CPU kernels and ours sum in different orders (measured ~1e-6)


def peaked_model(tied: bool, seed: int = 0):
    """The built-in Llama with weights ~ N(0, 0.35²): peaked next-token distributions, so greedy paths have clear
    top-1 margins (no parity by luck of near-ties) and EOS is sometimes drawn."""
    m = model_from_config(task.model_config(tie_word_embeddings=tied), seed=seed).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" not in n:
                p.normal_(0.0, 0.35)
    return m


def prompts(n: int, seed: int = 0, long: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = [[TOK.bos_token_id] + torch.randint(4, len(task.VOCAB), (int(torch.randint(3, 7, (1,), generator=g)),),
                                              generator=g).tolist() for _ in range(n)]
    if long:  # a prompt spanning prefix-cache blocks (block size 32): a stale cache would show after a push
        out.append([TOK.bos_token_id] + torch.randint(4, len(task.VOCAB), (long,), generator=g).tolist())
    return out


@torch.no_grad()
def hf_greedy(model, ps, max_new: int):
    from transformers import GenerationConfig

    cfg = GenerationConfig(do_sample=False, max_new_tokens=max_new, eos_token_id=EOS, pad_token_id=TOK.pad_token_id)
    out = []
    for p in ps:  # one at a time: no padding question in the reference
        ids = torch.tensor([p])
        row = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg)[0, len(p):]
        row = row.tolist()
        out.append(row[: row.index(EOS)] if EOS in row else row)
    return out


def fused(model, outs, ps, temperature: float = 1.0):
    """(fused scorer log-probs, sampler log-probs, mask), (S, T): the trainer's own scoring of the samples."""
    seqs = [(p, o.ids + ([EOS] if o.ended else [])) for p, o in zip(ps, outs)]
    T = max(len(c) for _, c in seqs)
    mask, samp = torch.zeros(len(seqs), T, dtype=torch.bool), torch.zeros(len(seqs), T)
    for i, (_, c) in enumerate(seqs):
        mask[i, :len(c)] = True
        samp[i, :len(c)] = outs[i].logps
    with torch.no_grad():
        s = score_tokens(model, collate(seqs, pad_id=TOK.pad_token_id, pack=True), temperature=temperature)
    return to_padded(s.logps, mask), samp, mask


def max_diff(model, outs, ps, temperature: float = 1.0) -> float:
    a, b, m = fused(model, outs, ps, temperature)
    return (a - b)[m].abs().max().item()


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def setup(request):
    from fusealign.engine.rollout_vllm import VLLMGenerate

    model = peaked_model(request.param)
    engine = VLLMGenerate(model, TOK, device=torch.device("cpu"), max_model_len=64, kv_cache_gib=1 / 16,
                          block_size=32)
    print(f"\n[{request.param and 'tied' or 'untied'}] engine start {engine.start_s:.1f} s", flush=True)
    yield model, engine
    engine.close()


def test_greedy_after_a_push_equals_hf_and_logps_match_the_fused_scorer(setup):
    """Before and after a policy update (Adam steps on the HF model, pushed in memory): vLLM's greedy tokens equal
    HF generate's of the same weights, its log-probs equal the fused scorer's within fp32 tolerance, the update
    changed the output (so the second comparison is about the new weights), and a long prompt generated before
    the push (its blocks in the prefix cache) gives the new weights' output after it."""
    model, engine = setup
    ps = prompts(8, seed=1, long=40)
    before = engine.greedy(ps, 16)  # pushes the current weights first
    assert [o.ids for o in before] == hf_greedy(model, ps, 16)
    d0 = max_diff(model, before, ps)
    assert d0 < TOL
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    target = torch.randint(4, len(task.VOCAB), (4, 24), generator=torch.Generator().manual_seed(2))
    for _ in range(10):  # the "policy update": the trainer's model changes in place
        opt.zero_grad()
        model(input_ids=target, labels=target).loss.backward()
        opt.step()
    model.eval()
    after = engine.greedy(ps, 16)
    assert [o.ids for o in after] != [o.ids for o in before]
    assert [o.ids for o in after] == hf_greedy(model, ps, 16)
    d1 = max_diff(model, after, ps)
    assert d1 < TOL
    print(f"greedy parity: {sum(len(o.ids) for o in before + after)} tokens equal HF; max |vLLM − fused| "
          f"{d0:.2e} before, {d1:.2e} after the push ({engine.last_sync_s * 1e3:.0f} ms)", flush=True)


def test_sampled_logps_are_the_scorers_distribution(setup):
    """Sampling at T = 0.7: vLLM's log-probs are the fused scorer's at T (TRL's mismatch metric ~0); with top-k /
    top-p they are the truncated, renormalised distribution's (transformers' warpers, float64), not the raw one's."""
    model, engine = setup
    ps = prompts(6, seed=3)
    params = SamplingParams(temperature=0.7, n=4, max_new_tokens=16, seed=5)
    outs = engine.sample(ps, params)
    group_ps = [p for p in ps for _ in range(4)]
    old, samp, mask = fused(model, outs, group_ps, temperature=0.7)
    metric = sampling_logp_difference(old, samp, mask)
    assert metric["sampling/sampling_logp_difference/max"] < TOL
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    trunc = engine.sample(ps, SamplingParams(temperature=0.7, top_k=6, top_p=0.8, n=2, max_new_tokens=12, seed=9))
    d_trunc, d_raw = 0.0, 0.0
    with torch.no_grad():
        for p, o in zip([p for p in ps for _ in range(2)], trunc):
            y = o.ids + ([EOS] if o.ended else [])
            z = model(torch.tensor([p + y])).logits[0, len(p) - 1: len(p) - 1 + len(y)].double() / 0.7
            w = TopPLogitsWarper(top_p=0.8)(None, TopKLogitsWarper(top_k=6)(None, z.clone()))
            idx = torch.arange(len(y)), torch.tensor(y)
            d_trunc = max(d_trunc, (torch.log_softmax(w, -1)[idx] - o.logps.double()).abs().max().item())
            d_raw = max(d_raw, (torch.log_softmax(z, -1)[idx] - o.logps.double()).abs().max().item())
    assert d_trunc < TOL and d_raw > 1e-2
    print(f"sampling at T=0.7: sampling/sampling_logp_difference mean "
          f"{metric['sampling/sampling_logp_difference/mean']:.2e}, max "
          f"{metric['sampling/sampling_logp_difference/max']:.2e}; top-k/top-p: {d_trunc:.2e} to the truncated "
          f"distribution (vs {d_raw:.2f} to the untruncated one)", flush=True)


def test_groups_seeds_and_batch_independence(setup):
    """n samples per prompt come out consecutive, each a continuation of its own prompt (its log-probs are the fused
    scorer's with that prompt, not with its neighbour's); a seeded rerun is identical (tokens and log-probs, bit for
    bit); another seed differs; a prompt's samples do not depend on the rest of the batch."""
    model, engine = setup
    ps = prompts(5, seed=4)
    params = SamplingParams(temperature=1.0, n=4, max_new_tokens=14, seed=11)
    a = engine.sample(ps, params)
    assert len(a) == 20
    group_ps = [p for p in ps for _ in range(4)]
    assert max_diff(model, a, group_ps) < TOL
    shifted = group_ps[4:] + group_ps[:4]  # each group scored with the next prompt: must not match
    assert max_diff(model, a, shifted) > 1e-2
    assert len({tuple(o.ids) for o in a[:4]}) > 1  # the group's samples are not copies of one another
    b = engine.sample(ps, params)
    assert all(x.ids == y.ids and x.ended == y.ended and torch.equal(x.logps, y.logps) for x, y in zip(a, b))
    c = engine.sample(ps, SamplingParams(temperature=1.0, n=4, max_new_tokens=14, seed=12))
    assert [o.ids for o in c] != [o.ids for o in a]
    alone = engine.sample(ps[:1], params)  # the first prompt alone: the same seed stream as in the batch
    assert [o.ids for o in alone] == [o.ids for o in a[:4]]


def test_the_trainer_process_is_left_as_it_was(setup):
    """After the engine started and sampled: torch.set_num_threads is the real one (it works), the global RNGs did not
    move, vLLM's environment variables are gone, and its world-1 default group is not taken for a run
    (init_distributed refuses it, shutdown leaves it to vLLM)."""
    _, engine = setup
    assert torch.set_num_threads is REAL_SET_NUM_THREADS
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    assert torch.get_num_threads() == 2
    torch.set_num_threads(n)
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    engine.sample(prompts(3), SamplingParams(n=2, max_new_tokens=8, seed=1))
    assert torch.equal(states[0], torch.get_rng_state()) and states[1] == random.getstate()
    assert np.array_equal(states[2], np.random.get_state()[1])
    for k in ("LD_PRELOAD", "LD_LIBRARY_PATH", "TORCHINDUCTOR_COMPILE_THREADS", "NUMEXPR_MAX_THREADS"):
        assert os.environ.get(k) == ENV_BEFORE.get(k), k
    assert dist.is_initialized()  # vLLM's own group, while the engine lives
    with pytest.raises(UserError, match="belongs to a vLLM engine"):
        init_distributed("cpu", fsdp=True)
    shutdown(clean=True)
    assert dist.is_initialized()


def test_refused_up_front():
    """Sleep mode on CPU, a head size vLLM's CPU attention lacks, a context longer than the model's: one-line errors
    before any engine starts."""
    from fusealign.engine.rollout_vllm import VLLMGenerate

    kw = dict(device=torch.device("cpu"), max_model_len=64)
    with pytest.raises(UserError, match="no sleep mode on CPU"):
        VLLMGenerate(peaked_model(False), TOK, enable_sleep_mode=True, **kw)
    small_heads = model_from_config(task.model_config(num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(UserError, match="head_dim is 16"):
        VLLMGenerate(small_heads, TOK, **kw)
    with pytest.raises(UserError, match="max_position_embeddings 64"):
        VLLMGenerate(peaked_model(False), TOK, device=torch.device("cpu"), max_model_len=65)


def test_a_prompt_longer_than_the_engine_is_refused(setup):
    _, engine = setup
    with pytest.raises(UserError, match="exceeds the engine's --vllm-max-model-len 64"):
        engine.sample([[TOK.bos_token_id] + [5] * 50], SamplingParams(max_new_tokens=16))
    assert math.isfinite(engine.last_sync_s)
