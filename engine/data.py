"""Data: JSONL (or built-in) records -> token ids -> padded or packed batches.

Formats, one JSON object per line:
  SFT:         {"prompt": str, "completion": str}   or   {"messages": [{"role", "content"}, …]}
  RM / DPO:    {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}
Chat `messages` are rendered with the tokenizer's chat template (the last assistant turn is the
completion). Sequences are `[bos] prompt completion [eos]`; only completion tokens are targets.

Truncation policy (counted in `DataStats.truncated`): prompts are never cut — they condition the
answer; a completion is cut on the right to fit `max_length` (its `<eos>` is then lost). A prompt that
leaves no room for a single completion token is an error, like a malformed line; `skip_bad_lines`
skips and counts such lines instead of failing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch

from .errors import DataError  # noqa: F401  (re-exported: callers catch data.DataError)
from .study.task import builtin_dataset, is_builtin_data

IGNORE = -100


@dataclass
class Example:
    prompt: List[int]
    completions: List[List[int]]  # SFT: [completion]; pairs: [chosen, rejected]
    source: str  # "file:line", for error messages
    texts: dict = field(default_factory=dict)
    uid: int = -1  # position in the loaded data set (keys precomputed reference log-probs)


@dataclass
class DataStats:
    lines: int = 0
    skipped: int = 0
    truncated: int = 0
    errors: list = field(default_factory=list)  # first few skip reasons



def _lines(path: Path):
    """(line number, text) of a UTF-8 file; a byte that is not UTF-8 is a DataError naming file, line, offset."""
    offset = 0
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                yield i, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{i}: not UTF-8 (byte 0x{raw[e.start]:02x} at byte offset {offset + e.start} "
                                f"of the file, column {e.start + 1}); save the file as UTF-8") from None
            offset += len(raw)


def check_data_file(data: str) -> None:
    """Before any model is loaded: `--data` is a built-in name, or a readable UTF-8 file (DataError if not)."""
    if is_builtin_data(data):
        return
    path = Path(data)
    if not path.is_file():
        raise DataError(f"--data {data!r}: no such file (give a JSONL path or a built-in name: builtin, "
                        f"builtin:sft, builtin:pairs, builtin:pairs-ood)")
    try:
        for _ in _lines(path):
            pass
    except PermissionError:
        raise DataError(f"--data {data!r}: not readable (permission denied)") from None


def _records(data: str, kind: str, held_out: bool):
    built = builtin_dataset(data, kind, held_out=held_out)
    if built is not None:
        for i, r in enumerate(built, 1):
            yield f"{data}:{i}", r, None
        return
    check_data_file(data)
    path = Path(data)
    for i, line in _lines(path):
        if not line.strip():
            continue
        where = f"{path}:{i}"
        try:
            yield where, json.loads(line), None
        except json.JSONDecodeError as e:
            yield where, None, f"{where}: malformed JSON ({e.msg} at column {e.colno})"


def _text(value, name, where, tok, *, prompt: bool):
    """A field as text: a string, or chat messages rendered with the tokenizer's template."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        if prompt:
            if not getattr(tok, "chat_template", None):
                raise DataError(f"{where}: field {name!r} holds chat messages but the tokenizer has no chat template")
            return tok.apply_chat_template(value, tokenize=False, add_generation_prompt=True)
        return value[-1]["content"]
    raise DataError(f"{where}: field {name!r} must be a string or a list of {{role, content}} messages, "
                    f"got {type(value).__name__}")


def _encode(tok, text: str, *, bos: bool, eos: bool) -> List[int]:
    ids = tok.encode(text, add_special_tokens=False)
    if bos and tok.bos_token_id is not None:
        ids = [tok.bos_token_id] + ids
    if eos:
        ids = ids + [tok.eos_token_id]
    return ids


def _example(where, rec, kind, tok, max_length, stats) -> Example:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if kind == "sft" and "messages" in rec and "prompt" not in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs or msgs[-1].get("role") != "assistant":
            raise DataError(f"{where}: field 'messages' must be a list ending with an assistant turn")
        rec = {"prompt": msgs[:-1], "completion": msgs[-1:]}
    fields = ("prompt", "completion") if kind == "sft" else ("prompt", "chosen", "rejected")
    for name in fields:
        if name not in rec:
            raise DataError(f"{where}: missing field {name!r} ({kind} records need {', '.join(fields)})")
    templated = not isinstance(rec["prompt"], str)
    prompt_text = _text(rec["prompt"], "prompt", where, tok, prompt=True)
    prompt = _encode(tok, prompt_text, bos=not templated, eos=False)
    if len(prompt) >= max_length:
        raise DataError(f"{where}: the prompt has {len(prompt)} tokens, leaving no room for a completion within "
                        f"max_length={max_length}; raise --max-length or pass --skip-bad-lines")
    completions = []
    for name in fields[1:]:
        c = _encode(tok, _text(rec[name], name, where, tok, prompt=False), bos=False, eos=True)
        room = max_length - len(prompt)
        if len(c) > room:
            c = c[:room]
            stats.truncated += 1
        completions.append(c)
    return Example(prompt, completions, where, {k: rec[k] for k in fields})


def load_examples(data: str, kind: str, tok, *, max_length: int, skip_bad_lines: bool = False,
                  held_out: bool = False) -> tuple:
    """-> (examples, DataStats). kind: "sft" or "pairs"."""
    if kind not in ("sft", "pairs"):
        raise ValueError(f"kind must be 'sft' or 'pairs', got {kind!r}")
    stats, out = DataStats(), []
    for where, rec, err in _records(data, kind, held_out):
        stats.lines += 1
        try:
            if err:
                raise DataError(err)
            out.append(_example(where, rec, kind, tok, max_length, stats))
        except DataError as e:
            if not skip_bad_lines:
                raise
            stats.skipped += 1
            if len(stats.errors) < 5:
                stats.errors.append(str(e))
    for i, e in enumerate(out):
        e.uid = i
    if not out:
        raise DataError(f"--data {data!r}: empty data set ({stats.lines} lines read, {stats.skipped} skipped)"
                        + (f"; first problem: {stats.errors[0]}" if stats.errors else ""))
    return out, stats


def load_prompts(data: str, tok, *, max_prompt_tokens: int, seed: int = 0, n_builtin: int = 4096) -> List[List[int]]:
    """Prompt token ids for RL: the built-in task's prompts, or the "prompt" field of each JSONL line."""
    if is_builtin_data(data):
        import random

        from .study.task import prompt

        texts = [prompt(random.Random(f"ppo-{seed}-{i}")) for i in range(n_builtin)]
        return [_encode(tok, t, bos=True, eos=False) for t in texts]
    out = []
    for where, rec, err in _records(data, "pairs", held_out=False):
        if err:
            raise DataError(err)
        if not isinstance(rec, dict) or "prompt" not in rec:
            raise DataError(f"{where}: missing field 'prompt' (RL prompts need a prompt)")
        templated = not isinstance(rec["prompt"], str)
        ids = _encode(tok, _text(rec["prompt"], "prompt", where, tok, prompt=True), bos=not templated, eos=False)
        if len(ids) > max_prompt_tokens:
            raise DataError(f"{where}: the prompt has {len(ids)} tokens; at most {max_prompt_tokens} leave room for "
                            f"the sampled completion within max_length")
        out.append(ids)
    if not out:
        raise DataError(f"--data {data!r}: no prompts")
    return out


def check_vocab(tok, vocab_size: int) -> None:
    if len(tok) > vocab_size:
        raise DataError(f"tokenizer has {len(tok)} tokens but the model's vocabulary has {vocab_size}: "
                        f"they do not belong together (pass the model's own tokenizer)")


@dataclass
class Batch:
    """input_ids, targets, seq_ids: (R, L); position_ids (R, L); attention_mask (R, L) or None (packed);
    last_index: (S, 2) (row, position) of each sequence's last token; S sequences in order."""

    input_ids: torch.Tensor
    targets: torch.Tensor
    seq_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: Optional[torch.Tensor]
    last_index: torch.Tensor
    num_sequences: int
    num_tokens: int

    def to(self, device) -> "Batch":
        mv = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(mv(self.input_ids), mv(self.targets), mv(self.seq_ids), mv(self.position_ids),
                     mv(self.attention_mask), mv(self.last_index), self.num_sequences, self.num_tokens)


def collate(seqs: List[tuple], *, pad_id: int, pack: bool) -> Batch:
    """seqs: (prompt_ids, completion_ids) per sequence. Target at t is token t+1 when it is a completion token.

    Packed: all sequences in one row, position_ids restarting at 0 per sequence and no attention mask, from
    which `transformers` builds a block-diagonal causal mask (varlen kernels with flash-attention).
    Padded: one sequence per row, right padding, with an attention mask.
    """
    ids = [p + c for p, c in seqs]
    tgts = [[(s[t + 1] if t + 1 >= len(p) else IGNORE) for t in range(len(s) - 1)] + [IGNORE]
            for s, (p, _) in zip(ids, seqs)]
    S = len(seqs)
    if pack:
        flat = [x for s in ids for x in s]
        input_ids = torch.tensor([flat])
        targets = torch.tensor([[x for t in tgts for x in t]])
        seq_ids = torch.tensor([[i for i, s in enumerate(ids) for _ in s]])
        position_ids = torch.tensor([[j for s in ids for j in range(len(s))]])
        ends = torch.tensor([len(s) for s in ids]).cumsum(0) - 1
        last_index = torch.stack([torch.zeros_like(ends), ends], 1)
        mask = None
    else:
        L = max(len(s) for s in ids)
        input_ids = torch.full((S, L), pad_id)
        targets = torch.full((S, L), IGNORE)
        seq_ids = torch.full((S, L), -1)
        mask = torch.zeros((S, L), dtype=torch.long)
        for i, (s, t) in enumerate(zip(ids, tgts)):
            input_ids[i, : len(s)] = torch.tensor(s)
            targets[i, : len(t)] = torch.tensor(t)
            seq_ids[i, : len(s)] = i
            mask[i, : len(s)] = 1
        position_ids = torch.arange(L).expand(S, L).clone()
        last_index = torch.stack([torch.arange(S), torch.tensor([len(s) - 1 for s in ids])], 1)
    return Batch(input_ids, targets, seq_ids, position_ids, mask, last_index, S, sum(len(s) for s in ids))


class DataStream:
    """Deterministic, resumable order: epoch e is a permutation drawn from (seed, e); position = (epoch, index)."""

    def __init__(self, examples: list, batch_size: int, seed: int):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.epoch, self.index = 0, 0
        self._perm = None

    def _order(self):
        if self._perm is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._perm = torch.randperm(len(self.examples), generator=g).tolist()
        return self._perm

    def next_batch(self) -> list:
        if self.index >= len(self.examples):
            self.epoch, self.index, self._perm = self.epoch + 1, 0, None
        order = self._order()
        chunk = order[self.index: self.index + self.batch_size]
        self.index += len(chunk)
        return [self.examples[i] for i in chunk]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, s: dict) -> None:
        self.epoch, self.index, self._perm = s["epoch"], s["index"], None
