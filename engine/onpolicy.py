"""On-policy preference pairs for DPO: sampled from a policy, labelled by a trained reward model.

Xu et al. 2024 ("Is DPO superior to PPO for LLM alignment?", §4–5) trace DPO's gap to PPO to preference
data that the policy would not generate, and close part of it by sampling the pairs from the policy being
trained and labelling them with the reward model (iterative / online DPO; Xiong et al. 2024, Guo et al. 2024):

    round r:  prompts x_1 … x_n  →  two completions y, y' ~ π per prompt (sampling with a KV cache, at the
              temperature the DPO log-probs use: --temperature)
              →  reward-model scores r(x, y), r(x, y') (minus the missing-EOS penalty, as PPO scores them)
              →  (chosen, rejected) = (the higher, the lower); identical completions carry no preference: dropped
              →  reference log-probs of the new pairs (π_ref = the initial policy, one no-grad pass)

`OnPolicyPairs` is a `DataStream` over those pairs. With `resample_every` = 0 the pairs are drawn once,
from the initial (SFT) policy; with K > 0 they are re-drawn from the current DPO policy every K optimizer
steps (round r uses fresh prompts). Its state (round, order, the pairs themselves and their reference
log-probs) is saved in the checkpoint, so an interrupted run resumes with the pairs it was training on.
"""

from __future__ import annotations

from typing import Callable, List

import torch

from .data import Example, collate
from .models import RewardModel
from .sampling import HFGenerate, SamplingParams


@torch.no_grad()
def label_pairs(policy, reward_model, tok, prompts: List[List[int]], *, seed: int, max_new_tokens: int,
                missing_eos_penalty: float, temperature: float = 1.0, engine=None) -> List[Example]:
    """Two samples of `policy` per prompt from softmax(z / temperature), ordered by the reward model's score
    -> pair Examples (uid = index). `engine`: the rollout engine sampling `policy` (default HF generate; a vLLM
    engine pushes the policy's current weights first)."""
    device = next(reward_model.parameters()).device
    engine = engine if engine is not None else HFGenerate(policy, tok)
    doubled = [p for p in prompts for _ in range(2)]  # y, y' of one prompt are consecutive
    params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, n=2, seed=seed)
    outs = [(c.ids, c.ended) for c in engine.sample(prompts, params)]
    seqs = [(p, ids + ([tok.eos_token_id] if ended else [])) for p, (ids, ended) in zip(doubled, outs)]
    scores = []
    for i in range(0, len(seqs), 128):
        batch = collate(seqs[i:i + 128], pad_id=tok.pad_token_id, pack=True).to(device)
        scores.append(RewardModel.rewards(reward_model, batch).float().cpu())
    ended = torch.tensor([e for _, e in outs])
    score = torch.cat(scores) - missing_eos_penalty * (~ended).float()
    pairs = []
    for j, prompt in enumerate(prompts):
        a, b = seqs[2 * j][1], seqs[2 * j + 1][1]
        if a == b:
            continue
        chosen, rejected = (a, b) if score[2 * j] >= score[2 * j + 1] else (b, a)
        pairs.append(Example(prompt, [chosen, rejected], f"onpolicy:{j}", uid=len(pairs)))
    return pairs


class OnPolicyPairs:
    """A `DataStream` of pairs sampled from `policy` and labelled by `reward_model`, re-sampled every
    `resample_every` optimizer steps (0: once). `reference(examples, batches) -> (n, 2)` gives the pairs' reference
    (chosen, rejected) log-probs, scored in `batches` (the round's first-epoch batches, as they are trained);
    `ref_logps(examples)` looks them up for a batch."""

    def __init__(self, policy, reward_model, tok, prompts: List[List[int]], *, batch_size: int, seed: int,
                 prompts_per_round: int, resample_every: int, grad_accum: int, max_new_tokens: int,
                 missing_eos_penalty: float, reference: Callable[[List[Example], list], torch.Tensor],
                 temperature: float = 1.0, engine=None):
        self.policy, self.reward_model, self.tok, self.prompts = policy, reward_model, tok, prompts
        self.engine = engine  # the rollout engine (None: HF generate on `policy`)
        self.batch_size, self.seed, self.n = batch_size, seed, prompts_per_round
        self.every = resample_every * grad_accum  # in micro-batches: next_batch is called grad_accum times a step
        self.max_new_tokens, self.penalty, self.reference = max_new_tokens, missing_eos_penalty, reference
        self.temperature = temperature  # the DPO log-probs' temperature: the pairs are that policy's samples
        self.calls, self.round, self.epoch, self.index = 0, -1, 0, 0
        self.examples: List[Example] = []
        self.table = torch.zeros(0, 2)
        self._perm = None

    def _resample(self) -> None:
        self.round += 1
        start = self.round * self.n
        prompts = [self.prompts[(start + i) % len(self.prompts)] for i in range(self.n)]
        self.examples = label_pairs(self.policy, self.reward_model, self.tok, prompts,
                                    seed=self.seed * 1_000_003 + 7_919 * self.round, max_new_tokens=self.max_new_tokens,
                                    missing_eos_penalty=self.penalty, temperature=self.temperature,
                                    engine=self.engine)
        if not self.examples:
            raise RuntimeError(f"on-policy round {self.round}: every sampled pair was identical; no preferences")
        self.epoch, self.index, self._perm = 0, 0, None
        order = self._order()  # the round's first epoch, scored by the reference in its training batches
        batches = [[self.examples[i] for i in order[j: j + self.batch_size]]
                   for j in range(0, len(order), self.batch_size)]
        self.table = self.reference(self.examples, batches)

    def _order(self) -> list:
        if self._perm is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + 10_007 * self.round + self.epoch)
            self._perm = torch.randperm(len(self.examples), generator=g).tolist()
        return self._perm

    def next_batch(self) -> List[Example]:
        if self.round < 0 or (self.every and self.calls and self.calls % self.every == 0):
            self._resample()
        self.calls += 1
        if self.index >= len(self.examples):
            self.epoch, self.index, self._perm = self.epoch + 1, 0, None
        chunk = self._order()[self.index: self.index + self.batch_size]
        self.index += len(chunk)
        return [self.examples[i] for i in chunk]

    def ref_logps(self, examples: List[Example]) -> torch.Tensor:
        """(B, 2) reference (chosen, rejected) log-probs of a batch drawn from the current round."""
        return self.table[[e.uid for e in examples]]

    def state_dict(self) -> dict:
        return {"calls": self.calls, "round": self.round, "epoch": self.epoch, "index": self.index,
                "pairs": [(e.prompt, e.completions) for e in self.examples], "table": self.table}

    def load_state_dict(self, s: dict) -> None:
        self.calls, self.round, self.epoch, self.index = s["calls"], s["round"], s["epoch"], s["index"]
        self.examples = [Example(p, c, f"onpolicy:{i}", uid=i) for i, (p, c) in enumerate(s["pairs"])]
        self.table, self._perm = s["table"], None
