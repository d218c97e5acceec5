"""Sampling completions with a KV cache (Hugging Face `generate`): the one place where the head
produces full-vocabulary logits, one decoding position at a time."""

from __future__ import annotations

from typing import List

import torch

from .distributed import InForward, run


@torch.no_grad()
def sample(model, tok, prompts: List[List[int]], *, max_new_tokens: int = 16, temperature: float = 1.0,
           top_p: float = 1.0, seed: int = 0, batch_size: int = 64) -> List[tuple]:
    """prompts: token ids (with bos) -> [(completion_ids without eos, ended_with_eos)] per prompt.

    An FSDP2-sharded model (distributed.InForward) generates inside its root's forward, with
    `synced_gpus`: every rank runs as many decoding steps as the slowest, as FSDP's collectives require
    (every rank must pass the same number of prompts)."""
    if isinstance(model, InForward):
        return run(model, lambda inner: _sample(inner, tok, prompts, max_new_tokens=max_new_tokens,
                                                temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size,
                                                synced=True))
    return _sample(model, tok, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                   seed=seed, batch_size=batch_size, synced=False)


def _sample(model, tok, prompts, *, max_new_tokens, temperature, top_p, seed, batch_size, synced) -> List[tuple]:
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i: i + batch_size]
        L = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), L), tok.pad_token_id)
        mask = torch.zeros((len(chunk), L), dtype=torch.long)
        for j, p in enumerate(chunk):  # left padding: every row's next token is at position L
            ids[j, L - len(p):] = torch.tensor(p)
            mask[j, L - len(p):] = 1
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        seqs = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
                              temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=max_new_tokens,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, synced_gpus=synced)
        for row in seqs[:, L:].tolist():
            if tok.eos_token_id in row:
                out.append((row[: row.index(tok.eos_token_id)], True))
            else:
                out.append((row, False))
    model.train(was_training)
    return out
