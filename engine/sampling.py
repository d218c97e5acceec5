"""Sampling completions with a KV cache (Hugging Face `generate`): the one place where the head
produces full-vocabulary logits, one decoding position at a time.

Rollouts must come from exactly the distribution the scorer computes, softmax(z/T) with z the model's
logits (softcap and logit scale included), optionally truncated by top-k / top-p. Two things stand in the
way with Hugging Face checkpoints, and this module removes both:

  - `generate` fills every field the caller leaves unset from the checkpoint's `generation_config.json`
    (repetition_penalty, no_repeat_ngram_size, suppress_tokens, bad_words_ids, min_new_tokens, forced
    BOS/EOS, …; transformers 5 does so even for fields of a `GenerationConfig` passed in that are None).
    `generation_config(params, tok)` sets every field that shapes the distribution to its neutral value,
    and `HFGenerate` hides the model's own config for the duration of the call (`_only_ours`), so nothing
    of the checkpoint's reaches the processors.
  - `generate` runs a caller's logits processors *before* its temperature / top-k / top-p warpers, so a
    processor cannot see the distribution sampled from. `SamplerLogps` is therefore the last (and only)
    processor: it applies temperature, top-k and top-p itself, with transformers' own warper classes in
    generate's order, and records log_softmax of the result at each sampled token. `generate` then draws
    from softmax of exactly those scores.

Memory: one (B, V) fp32 log-softmax is held from one decoding step to the next (to gather the token
drawn from it), plus (B,) per step — never the (steps, B, V) stack that `output_scores=True` keeps.

`SamplingParams` and `Completion` are the engine-independent interface: a rollout engine maps prompts
and params to completions with the sampler's own log-probs (`HFGenerate` here; a vLLM engine takes the
same two types). `sampling_logp_difference` is the metric that proves sampler and scorer agree.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import List, Optional, Protocol, Sequence

import torch

from .distributed import InForward, run


# --- the engine-independent interface -------------------------------------------------------------------
@dataclass(frozen=True)
class SamplingParams:
    """What a rollout engine samples with; nothing else shapes the distribution."""

    temperature: float = 1.0  # z / T, the scorer's temperature
    top_p: float = 1.0  # nucleus threshold (1: off)
    top_k: int = 0  # keep the k largest (0: off)
    max_new_tokens: int = 16
    n: int = 1  # samples per prompt, consecutive in the output (GRPO / RLOO groups)
    seed: int = 0

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if self.max_new_tokens < 1 or self.n < 1:
            raise ValueError(f"max_new_tokens and n must be >= 1, got {self.max_new_tokens} and {self.n}")

    @property
    def truncated(self) -> bool:
        """Samples come from a truncated, renormalised distribution (top-k or top-p), not softmax(z/T)."""
        return self.top_p < 1 or self.top_k > 0


@dataclass
class Completion:
    """One sampled completion."""

    ids: List[int]  # completion token ids, without the EOS
    ended: bool  # stopped on EOS (then EOS is the token after `ids`)
    logps: torch.Tensor  # (len(ids) + ended,) fp32, CPU: the sampler's log-prob of each sampled token, EOS included


class RolloutEngine(Protocol):
    def sample(self, prompts: List[List[int]], params: SamplingParams) -> List[Completion]:
        """prompts: token ids (with bos) -> len(prompts) · params.n completions, the n of a prompt consecutive,
        sampled from the policy's current weights."""

    def close(self) -> None:
        """Free what the engine holds (end of the run)."""


# --- Hugging Face generate --------------------------------------------------------------------------------
def generation_config(params: SamplingParams, tok):
    """The `transformers.GenerationConfig` of a rollout, from our flags alone: multinomial sampling, at most
    `max_new_tokens`, stop on the tokenizer's EOS, pad with its pad token; every processor that would
    reshape the distribution set to its neutral value. Temperature, top-k and top-p are neutral here too
    because `SamplerLogps` applies them (it must be the last processor to see the sampled distribution)."""
    from transformers import GenerationConfig

    # min_length is left to the global default, 0 (setting it beside min_new_tokens draws a warning). Fields whose
    # neutral value is None (suppress_tokens, begin_suppress_tokens, bad_words_ids, sequence_bias, forced_bos/eos_
    # token_id, exponential_decay_length_penalty, min_p, top_h, watermarking_config, guidance_scale, stop_strings)
    # cannot be forced here — `generate` fills a None from the model's config — which is why `_only_ours` hides
    # the model's config while generating (without it suppress_tokens leaks in: tests/engine/test_sampling.py).
    return GenerationConfig(
        do_sample=True, num_beams=1, num_return_sequences=1, max_new_tokens=params.max_new_tokens,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        temperature=1.0, top_k=0, top_p=1.0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
        repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0,
        encoder_no_repeat_ngram_size=0, min_new_tokens=0, length_penalty=1.0,
        renormalize_logits=False, remove_invalid_values=False, use_cache=True,
        output_scores=False, return_dict_in_generate=False)


@contextlib.contextmanager
def _only_ours(model):
    """The model's `generation_config` replaced by a blank one while generating (restored after), so that the
    checkpoint's `generation_config.json` cannot fill any field `generation_config()` leaves None."""
    from transformers import GenerationConfig

    saved = getattr(model, "generation_config", None)
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


class SamplerLogps:
    """The last logits processor of a rollout: `extra` processors (none in training; tests use them as a
    negative control), then temperature, top-k, top-p (transformers' warpers, in `generate`'s order), and the
    log-softmax of the result kept until the next step reveals the token drawn from it.

    `finish(sequences)` -> (B, G) fp32: log-prob of each of the G generated tokens under its step's sampled
    distribution (rows that had stopped carry the pad token's: cut them at the completion's end)."""

    def __init__(self, params: SamplingParams, extra: Sequence = ()):
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        warpers = list(extra)
        if params.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k > 0:
            warpers.append(TopKLogitsWarper(top_k=params.top_k))
        if params.top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p=params.top_p))
        self.warpers = LogitsProcessorList(warpers)
        self.pending: Optional[torch.Tensor] = None  # (B, V) log-softmax of the last step's sampled distribution
        self.steps: List[torch.Tensor] = []  # (B,) per finished step

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.pending is not None:  # input_ids[:, -1] was drawn from `pending`
            self.steps.append(self.pending.gather(1, input_ids[:, -1:]).squeeze(1))
        scores = self.warpers(input_ids, scores)
        self.pending = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        if self.pending is not None:
            self.steps.append(self.pending.gather(1, sequences[:, -1:]).squeeze(1))
            self.pending = None
        return torch.stack(self.steps, 1) if self.steps else sequences.new_zeros((len(sequences), 0), dtype=torch.float)


class HFGenerate:
    """`model.generate` with a KV cache and left padding, under `generation_config(params)` alone.

    An FSDP2-sharded model (distributed.InForward) generates inside its root's forward, with `synced_gpus`:
    every rank runs as many decoding steps as the slowest, as FSDP's collectives require (every rank must pass
    the same number of prompts). `processors` are applied before temperature / top-k / top-p (as generate
    orders a checkpoint's processors): the samples are then *not* the scorer's, and
    `sampling_logp_difference` shows by how much — for tests, never in training."""

    def __init__(self, model, tok, *, batch_size: int = 64, processors: Sequence = ()):
        self.model, self.tok, self.batch_size, self.processors = model, tok, batch_size, tuple(processors)

    def close(self) -> None:
        """Nothing to free: generate runs the trainer's own model (always its current weights)."""

    @torch.no_grad()
    def sample(self, prompts: List[List[int]], params: SamplingParams) -> List[Completion]:
        prompts = [p for p in prompts for _ in range(params.n)]  # groups of n consecutive samples
        if isinstance(self.model, InForward):
            return run(self.model, lambda inner: self._sample(inner, prompts, params, synced=True))
        return self._sample(self.model, prompts, params, synced=False)

    def _sample(self, model, prompts, params: SamplingParams, *, synced: bool) -> List[Completion]:
        tok, device = self.tok, next(model.parameters()).device
        config = generation_config(params, tok)
        was_training = model.training
        model.eval()
        gen = torch.Generator(device="cpu").manual_seed(params.seed)
        out = []
        for i in range(0, len(prompts), self.batch_size):
            chunk = prompts[i: i + self.batch_size]
            L = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), L), tok.pad_token_id)
            mask = torch.zeros((len(chunk), L), dtype=torch.long)
            for j, p in enumerate(chunk):  # left padding: every row's next token is at position L
                ids[j, L - len(p):] = torch.tensor(p)
                mask[j, L - len(p):] = 1
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            recorder = SamplerLogps(params, self.processors)
            with _only_ours(model):
                seqs = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                      generation_config=config, logits_processor=[recorder], synced_gpus=synced)
            logps = recorder.finish(seqs).cpu()  # (B, G), one host copy per chunk
            for row, lp in zip(seqs[:, L:].tolist(), logps):
                ended = tok.eos_token_id in row
                n = row.index(tok.eos_token_id) if ended else len(row)
                out.append(Completion(row[:n], ended, lp[: n + ended].clone()))
        model.train(was_training)
        return out


def sample(model, tok, prompts: List[List[int]], *, max_new_tokens: int = 16, temperature: float = 1.0,
           top_p: float = 1.0, top_k: int = 0, seed: int = 0, batch_size: int = 64) -> List[tuple]:
    """prompts: token ids (with bos) -> [(completion_ids without eos, ended_with_eos)] per prompt, sampled by
    `HFGenerate` from softmax(z / temperature), truncated by top-k / top-p when asked (evaluation samples;
    RL rollouts use `HFGenerate.sample`, which also returns the sampler's log-probs)."""
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
                            seed=seed)
    return [(c.ids, c.ended) for c in HFGenerate(model, tok, batch_size=batch_size).sample(prompts, params)]


# --- the metric that proves it ----------------------------------------------------------------------------
def sampling_logp_difference(old_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor) -> dict:
    """TRL 1.16's train–inference mismatch (GRPOTrainer): δ = |old_logps − sampler_logps| over the completion
    tokens (NaN excluded), its mean and max; 0 for an empty rollout. old_logps, sampler_logps, mask: (S, T).
    Across ranks TRL averages the means and takes the max of the maxima."""
    delta = (old_logps.float() - sampler_logps.float()).abs()
    delta = delta[mask.bool() & ~torch.isnan(delta)]
    empty = delta.numel() == 0
    return {"sampling/sampling_logp_difference/mean": 0.0 if empty else delta.mean().item(),
            "sampling/sampling_logp_difference/max": 0.0 if empty else delta.max().item()}


def truncation_notice(params: SamplingParams, command: str) -> Optional[str]:
    """The line an RL run prints at start when its samples come from a truncated distribution (None if not)."""
    if not params.truncated:
        return None
    knobs = ", ".join(k for k, on in ((f"--top-p {params.top_p}", params.top_p < 1),
                                      (f"--top-k {params.top_k}", params.top_k > 0)) if on)
    return (f"fusealign {command}: {knobs}: samples come from the truncated, renormalised distribution, while "
            f"log-probs, KL and the ratio describe the untruncated policy; the rollouts are off-policy by "
            f"sampling/sampling_logp_difference (−log of the kept probability mass per token)")
