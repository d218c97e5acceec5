"""The built-in task: a controlled "sentiment" generation problem small enough for a CPU.

In the spirit of the DPO paper's controlled sentiment experiment (Rafailov et al. 2023, §6.1): a hidden,
programmatic "human" scores completions, and preferences are drawn from it by Bradley-Terry sampling.

- Vocabulary: 4 special tokens, 20 positive, 20 negative, 20 neutral and 10 topic words (74 tokens);
  a word-level tokenizer (a real `transformers` fast tokenizer, saved with every checkpoint).
- Prompt x: `<bos>` then 3–6 words drawn from topics and neutral words ("movie the of film").
- Ground-truth reward r(x, y) = (#positive − #negative) / #words of the completion y, in [−1, 1];
  a completion that never emits `<eos>` (cut at the length limit) scores −1.
- Base ("human-written") completions: 4–10 words, each positive/negative/neutral w.p. ¼/¼/½, then `<eos>`:
  E[r] = 0. The SFT corpus is drawn from it, so the SFT policy learns this distribution.
- Preference pairs, in-distribution: two base completions per prompt (what the SFT policy samples);
  out-of-distribution: two completions from a different policy (8–14 words, mostly neutral, other
  neutral words). Labels: y₁ ≻ y₂ with probability σ(β_h (r₁ − r₂)), β_h = 5.
- Model: a 2-layer Llama (hidden 64; 2 query heads and 1 key/value head of 32: vLLM's CPU attention runs head
  sizes 32, 64, 80, … only), ~0.1 M parameters.
Everything is generated from a seed: no file or network access.
"""

from __future__ import annotations

import math
import random
from typing import Optional

POSITIVE = ("good great happy joy love nice fine kind warm bright calm brave clever gentle lucky proud sweet wise "
            "fresh glad").split()
NEGATIVE = ("bad awful sad pain hate nasty poor cruel cold dark angry weak dull harsh rude sour bitter grim sick "
            "gloomy").split()
NEUTRAL = "the a of and to in is it that was on for with as at by this from or an".split()
TOPICS = "movie book song game trip meal day story film show".split()
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]
VOCAB = SPECIALS + POSITIVE + NEGATIVE + NEUTRAL + TOPICS
BETA_HUMAN = 5.0
_SCORE = {**{w: 1 for w in POSITIVE}, **{w: -1 for w in NEGATIVE}}


def tokenizer():
    """The built-in word-level tokenizer (a `transformers` fast tokenizer). Like a Llama tokenizer it adds `<bos>`
    itself (`tok(text)`; `add_special_tokens=False` leaves it out), so the engine's one tokenisation rule (TRL's,
    engine/data.py) gives the task's sequences `<bos> prompt completion <eos>`."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", VOCAB.index("<bos>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def model_config(**overrides):
    """The tiny Llama of the built-in task. Head size 32 (2 query heads, 1 key/value head; q/k/v/o as large as 4 × 16
    with 2 kv heads): vLLM's CPU attention refuses head sizes below 32, and `--rollout vllm` must run on it."""
    from transformers import LlamaConfig

    kw = dict(vocab_size=len(VOCAB), hidden_size=64, intermediate_size=176, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, rms_norm_eps=1e-5,
              bos_token_id=VOCAB.index("<bos>"), eos_token_id=VOCAB.index("<eos>"),
              pad_token_id=VOCAB.index("<pad>"), tie_word_embeddings=False)
    kw.update(overrides)
    return LlamaConfig(**kw)


def reward(completion: str, ended: bool = True) -> float:
    """Ground-truth reward of a completion's text (without `<eos>`); −1 if it never ended."""
    words = [w for w in completion.split() if w not in SPECIALS]
    if not ended:
        return -1.0
    if not words:
        return 0.0
    return sum(_SCORE.get(w, 0) for w in words) / len(words)


def prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(TOPICS + NEUTRAL) for _ in range(rng.randint(3, 6)))


def base_completion(rng: random.Random) -> str:
    out = []
    for _ in range(rng.randint(4, 10)):
        u = rng.random()
        out.append(rng.choice(POSITIVE if u < 0.25 else NEGATIVE if u < 0.5 else NEUTRAL))
    return " ".join(out)


def ood_completion(rng: random.Random) -> str:
    """A different policy: longer, mostly neutral, and drawing on other neutral words."""
    out = []
    for _ in range(rng.randint(8, 14)):
        u = rng.random()
        out.append(rng.choice(POSITIVE if u < 0.1 else NEGATIVE if u < 0.2 else NEUTRAL[10:]))
    return " ".join(out)


def label(a: str, b: str, rng: random.Random) -> tuple:
    """(chosen, rejected) by Bradley-Terry sampling from the ground-truth reward."""
    p_a = 1.0 / (1.0 + math.exp(-BETA_HUMAN * (reward(a) - reward(b))))
    return (a, b) if rng.random() < p_a else (b, a)


def sft_records(n: int = 4000, seed: int = 0) -> list:
    rng = random.Random(f"sft-{seed}")
    return [{"prompt": prompt(rng), "completion": base_completion(rng)} for _ in range(n)]


def pair_records(n: int = 2000, seed: int = 0, *, split: str = "train", distribution: str = "in") -> list:
    """Preference pairs; `distribution="in"` (base/SFT policy) or `"out"` (a different policy)."""
    if distribution not in ("in", "out"):
        raise ValueError(f"distribution must be 'in' or 'out', got {distribution!r}")
    rng = random.Random(f"pairs-{distribution}-{split}-{seed}")
    gen = base_completion if distribution == "in" else ood_completion
    out = []
    for _ in range(n):
        x = prompt(rng)
        chosen, rejected = label(gen(rng), gen(rng), rng)
        out.append({"prompt": x, "chosen": chosen, "rejected": rejected})
    return out


def eval_prompts(n: int = 128, seed: int = 0) -> list:
    rng = random.Random(f"eval-{seed}")
    return [prompt(rng) for _ in range(n)]


BUILTIN_DATA = ("builtin", "builtin:sft", "builtin:pairs", "builtin:pairs-ood")


def is_builtin_data(name: str) -> bool:
    """`--data` names a built-in data set (a file called e.g. "builtin_pairs.jsonl" is not one)."""
    return name == "builtin" or name in BUILTIN_DATA


def builtin_dataset(name: str, kind: str, *, held_out: bool = False, seed: int = 0) -> Optional[list]:
    """Records of a built-in data set name (None if `name` is not built-in), as a JSONL file would hold them for
    TRL: completions start with the space that separates them from the prompt (strings are joined as they are)."""
    if name == "builtin":
        name = "builtin:sft" if kind == "sft" else "builtin:pairs"
    if name not in BUILTIN_DATA:
        return None
    split = "eval" if held_out else "train"
    n = 200 if held_out else None
    if name == "builtin:sft":
        records = sft_records(n or 4000, seed + (1000 if held_out else 0))
    else:
        records = pair_records(n or 2000, seed, split=split, distribution="out" if name.endswith("ood") else "in")
    return [{k: v if k == "prompt" else " " + v for k, v in r.items()} for r in records]
