"""Data: JSONL (or built-in) records -> token ids -> padded or packed batches.

Formats, one JSON object per line (TRL 1.16's dataset formats, tokenised as TRL tokenises them):
  SFT:       {"prompt": str, "completion": str}            prompt–completion
             {"prompt": messages, "completion": messages}  conversational prompt–completion
             {"messages": messages}                        conversation: the last turn (an assistant turn) is
                                                           the completion, the turns before it the prompt
             {"text": str}                                 language modelling: every token is a target
  RM / DPO:  {"prompt", "chosen", "rejected"}              strings, or message lists
             {"chosen", "rejected"}                        implicit prompt: their common start (TRL's
                                                           `extract_prompt`)
  PPO / GRPO / on-policy DPO prompts: {"prompt": str | messages}
`messages` are lists of {"role", "content"}; ShareGPT's {"conversations": [{"from", "value"}, …]} is read as
`messages` with from → role, value → content (TRL's `maybe_convert_to_chatml`; roles are kept as written).

Tokenisation (TRL 1.16's `SFTTrainer` / `DPOTrainer` `_prepare_dataset`, token for token):
  strings        prompt ids = tokenizer(prompt); sequence ids = tokenizer(prompt + completion + eos_token),
                 the EOS text appended unless the completion already ends with it. Strings are joined as they
                 are — put the separating space in the completion (" blue.") as TRL expects. Special tokens
                 are the tokenizer's own: a Llama tokenizer's BOS, none for a ChatML (GPT-2 style) one.
  messages       prompt ids = apply_chat_template(prompt, add_generation_prompt=True); sequence ids =
                 apply_chat_template(prompt + completion): the template's whole assistant turn is trained,
                 e.g. ChatML's "…<|im_end|>\n" (no EOS is added: the template ends the turn).
  split          the completion starts where prompt ids and sequence ids first differ (TRL's
                 `common_prefix_length`; for pairs the shorter of the two), so a template that renders the
                 prompt differently alone, or a token merging across the boundary, never shifts a target.
A string completion next to a message-list prompt is taken as one assistant message. Only completion tokens
are targets (TRL's completion-only loss; for `messages`, the last turn — TRL itself would train every token
unless assistant_only_loss is set). `{"text"}` trains every token after the first.

Truncation policy (counted in `DataStats`, reported before training by `truncation_report`): prompts are never
cut — they condition the answer; a completion is cut on the right to fit `max_length` (its end, the EOS, is then
lost; TRL's keep_start). A prompt that leaves no room for a single completion token is an error, like a
malformed line; `skip_bad_lines` skips and counts such lines instead of failing. When more than half of the
completions would be cut, `check_truncation` refuses the run (`--max-length` is too small for the data).
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
    truncated: int = 0  # completions cut at max_length (their EOS lost)
    completions: int = 0  # completions loaded (pairs: two per line)
    longest: int = 0  # tokens of the longest prompt + completion before truncation: the max_length that cuts none
    max_length: int = 0
    prompt_boundary: int = 0  # lines whose prompt ids are not a prefix of their sequence ids (see `_split`)
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


ACCEPTED = {"sft": "prompt + completion, messages, conversations (ShareGPT from/value) or text",
            "pairs": "prompt + chosen + rejected, or chosen + rejected (implicit prompt); strings or message lists"}


def _is_messages(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value) and \
        all("role" in m and "content" in m for m in value)


def _to_chatml(rec: dict) -> dict:
    """TRL's `maybe_convert_to_chatml`: from/value messages -> role/content, `conversations` -> `messages`."""
    rec = dict(rec)
    for key in ("prompt", "completion", "chosen", "rejected", "messages", "conversations"):
        if isinstance(rec.get(key), list):
            rec[key] = [{("role" if k == "from" else "content" if k == "value" else k): v for k, v in m.items()}
                        if isinstance(m, dict) else m for m in rec[key]]
    if "conversations" in rec:
        rec["messages"] = rec.pop("conversations")
    return rec


def _extract_prompt(chosen, rejected) -> tuple:
    """TRL's `extract_prompt`: the longest common start of chosen and rejected (turns of a conversation, or
    characters of a string, the separating space left to the completions) -> (prompt, chosen, rejected)."""
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if chosen[idx - 1] == " ":
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def _chat(tok, messages, where: str, name: str, **kw) -> List[int]:
    if not getattr(tok, "chat_template", None):
        raise DataError(f"{where}: field {name!r} holds chat messages but the tokenizer has no chat template "
                        f"(set one in tokenizer_config.json, or give the field as a string)")
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"]
    return list(out[0] if out and isinstance(out[0], list) else out)


def _tokens(tok, text: str) -> List[int]:
    """A string as TRL tokenises it: the tokenizer's own call, with the special tokens it adds itself."""
    return list(tok(text=text)["input_ids"])


def common_prefix_length(a: List[int], b: List[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _record(where: str, rec, kind: str) -> tuple:
    """A record in one of the accepted formats -> (prompt, [completions]), each a string or a message list."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    rec = _to_chatml(rec)
    if kind == "sft":
        if "messages" in rec and "prompt" not in rec:
            msgs = rec["messages"]
            if not _is_messages(msgs) or len(msgs) < 2 or msgs[-1]["role"] not in ("assistant", "gpt"):
                raise DataError(f"{where}: field 'messages' must be a list of {{role, content}} messages "
                                f"ending with an assistant turn (the completion), after at least one other")
            return msgs[:-1], [msgs[-1:]]
        if "text" in rec and "prompt" not in rec:
            if not isinstance(rec["text"], str):
                raise DataError(f"{where}: field 'text' must be a string, got {type(rec['text']).__name__}")
            return "", [rec["text"]]
        names = ("prompt", "completion")
    else:
        if "prompt" not in rec and "chosen" in rec and "rejected" in rec:
            same = isinstance(rec["chosen"], str) == isinstance(rec["rejected"], str)
            if same and isinstance(rec["chosen"], (str, list)):
                p, c, r = _extract_prompt(rec["chosen"], rec["rejected"])
                rec = {**rec, "prompt": p, "chosen": c, "rejected": r}
        names = ("prompt", "chosen", "rejected")
    for name in names:
        if name not in rec:
            have = ", ".join(sorted(rec)) or "none"
            raise DataError(f"{where}: missing field {name!r} (fields here: {have}; accepted {kind} records: "
                            f"{ACCEPTED[kind]})")
    for name in names:
        v = rec[name]
        if not (isinstance(v, str) or _is_messages(v) or (name != "prompt" and v == [])):
            raise DataError(f"{where}: field {name!r} must be a string or a list of {{role, content}} messages, "
                            f"got {type(v).__name__}")
    prompt, completions = rec[names[0]], [rec[n] for n in names[1:]]
    if isinstance(prompt, list):  # a string completion after a conversation: one assistant message
        completions = [[{"role": "assistant", "content": c}] if isinstance(c, str) else c for c in completions]
    else:
        for n, c in zip(names[1:], completions):
            if not isinstance(c, str):
                raise DataError(f"{where}: field {n!r} holds messages but 'prompt' is a string: give both as "
                                f"message lists or both as strings")
    return prompt, completions


def _split(tok, where: str, prompt, completions: list) -> tuple:
    """(prompt ids, [completion ids], whether the prompt's own ids were cut to the common prefix) — TRL's rule."""
    if isinstance(prompt, list):
        prompt_ids = _chat(tok, prompt, where, "prompt", add_generation_prompt=True)
        full = [_chat(tok, prompt + c, where, "completion") for c in completions]
    else:
        eos = tok.eos_token or ""
        prompt_ids = _tokens(tok, prompt)
        full = [_tokens(tok, prompt + (c if c.endswith(eos) else c + eos)) for c in completions]
    n = min(common_prefix_length(prompt_ids, f) for f in full)
    outs = [f[n:] for f in full]
    if any(not c for c in outs):
        raise DataError(f"{where}: a completion has no tokens of its own after the prompt")
    return full[0][:n], outs, n < len(prompt_ids)


def _example(where, rec, kind, tok, max_length, stats) -> Example:
    prompt_value, completion_values = _record(where, rec, kind)
    prompt, full, boundary = _split(tok, where, prompt_value, completion_values)
    if len(prompt) >= max_length:
        raise DataError(f"{where}: the prompt has {len(prompt)} tokens, leaving no room for a completion within "
                        f"max_length={max_length}; raise --max-length or pass --skip-bad-lines")
    completions = []
    for c in full:
        stats.completions += 1
        stats.longest = max(stats.longest, len(prompt) + len(c))
        room = max_length - len(prompt)
        if len(c) > room:
            c = c[:room]
            stats.truncated += 1
        completions.append(c)
    stats.prompt_boundary += boundary
    texts = {"prompt": prompt_value, **dict(zip(("completion",) if kind == "sft" else ("chosen", "rejected"),
                                                completion_values))}
    return Example(prompt, completions, where, texts)


def truncation_report(stats: DataStats) -> Optional[str]:
    """One line saying what `max_length` cuts (None when it cuts nothing)."""
    if not stats.truncated:
        return None
    return (f"data: {stats.truncated} of {stats.completions} completions are longer than --max-length "
            f"{stats.max_length} allows and lose their end (EOS or end of turn); --max-length {stats.longest} "
            f"keeps every one")


def check_truncation(stats: DataStats) -> None:
    """More than half of the completions cut: `--max-length` is too small for this data (a DataError naming the
    length that keeps them). Fewer: the run goes on, and `truncation_report` says what is cut."""
    if stats.truncated * 2 > stats.completions:
        raise DataError(f"--max-length {stats.max_length} cuts the end off {stats.truncated} of {stats.completions} "
                        f"completions (more than half): raise it — --max-length {stats.longest} keeps every one")


def load_examples(data: str, kind: str, tok, *, max_length: int, skip_bad_lines: bool = False,
                  held_out: bool = False) -> tuple:
    """-> (examples, DataStats). kind: "sft" or "pairs"."""
    if kind not in ("sft", "pairs"):
        raise ValueError(f"kind must be 'sft' or 'pairs', got {kind!r}")
    stats, out = DataStats(max_length=max_length), []
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


def prompt_ids(tok, prompt, where: str = "prompt") -> List[int]:
    """A prompt alone, as TRL's GRPOTrainer tokenises it: tokenizer(prompt), or the chat template with the
    generation prompt for messages."""
    if isinstance(prompt, str):
        return _tokens(tok, prompt)
    return _chat(tok, prompt, where, "prompt", add_generation_prompt=True)


def load_prompts(data: str, tok, *, max_prompt_tokens: int, seed: int = 0, n_builtin: int = 4096) -> List[List[int]]:
    """Prompt token ids for RL: the built-in task's prompts, or the "prompt" field of each JSONL line (a string or
    chat messages, tokenised by `prompt_ids`; other fields are ignored)."""
    if is_builtin_data(data):
        import random

        from .study.task import prompt

        return [prompt_ids(tok, prompt(random.Random(f"ppo-{seed}-{i}"))) for i in range(n_builtin)]
    out = []
    for where, rec, err in _records(data, "pairs", held_out=False):
        if err:
            raise DataError(err)
        rec = _to_chatml(rec) if isinstance(rec, dict) else rec
        if not isinstance(rec, dict) or "prompt" not in rec:
            raise DataError(f"{where}: missing field 'prompt' (RL prompts are JSONL lines {{\"prompt\": str or "
                            f"messages}}; other fields are ignored)")
        if not (isinstance(rec["prompt"], str) or _is_messages(rec["prompt"])):
            raise DataError(f"{where}: field 'prompt' must be a string or a list of {{role, content}} messages, "
                            f"got {type(rec['prompt']).__name__}")
        ids = prompt_ids(tok, rec["prompt"], where)
        if len(ids) > max_prompt_tokens:
            raise DataError(f"{where}: the prompt has {len(ids)} tokens; at most {max_prompt_tokens} leave room for "
                            f"the sampled completion within max_length (raise --max-length or lower "
                            f"--max-new-tokens)")
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

    def _permutation(self, epoch: int) -> list:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.examples), generator=g).tolist()

    def _order(self):
        if self._perm is None:
            self._perm = self._permutation(self.epoch)
        return self._perm

    def epoch_batches(self, epoch: int = 0) -> list:
        """The batches `next_batch` yields in epoch `epoch`, in order (the stream's position is not moved)."""
        order = self._permutation(epoch)
        return [[self.examples[i] for i in order[j: j + self.batch_size]] for j in range(0, len(order), self.batch_size)]

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
