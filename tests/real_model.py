"""A small "real" model for tests: a byte-level BPE tokenizer trained here on a few sentences, with ChatML special
tokens and the ChatML chat template of SmolLM2 (`<|im_start|>role\\n…<|im_end|>\\n`; BOS `<|im_start|>`, EOS
`<|im_end|>`, a GPT-2 style tokenizer that adds no special token itself), or a Llama-style variant whose tokenizer
adds `<s>` to every text; and a tiny Llama with a tied head built from a config. Nothing comes from a hub.

    tok = chatml_tokenizer()                       # or chatml_tokenizer(llama_bos=True)
    path = save_model(tmp_path / "model", tok)     # a `--model` directory: config, safetensors, tokenizer
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

SENTENCES = [
    "What color is the sky?", "It is blue.", "It is green.", "The sky is blue because air scatters blue light.",
    "Name a fruit.", "An apple is a fruit.", "A carrot is not a fruit.", "How many legs does a cat have?",
    "A cat has four legs.", "Cats have two legs.", "Write one word about the sea.", "Waves.", "Sand!",
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face", "user assistant system",
]
QUESTIONS = ["What color is the sky?", "Name a fruit.", "How many legs does a cat have?",
             "Write one word about the sea."]
ANSWERS = [("It is blue.", "It is green."), ("An apple is a fruit.", "A carrot is not a fruit."),
           ("A cat has four legs.", "Cats have two legs."), ("Waves.", "Sand!")]


def chatml_tokenizer(*, llama_bos: bool = False):
    """A byte-level BPE tokenizer (vocabulary ~300) with `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` and the
    ChatML template; `llama_bos`: also `<s>` as BOS, added to every text by the tokenizer (as Llama's does)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + (["<s>"] if llama_bos else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES * 3, trainer)
    bos = "<|im_start|>"
    if llama_bos:
        bos = "<s>"
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 3)])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    out.chat_template = CHATML_TEMPLATE
    return out


def tiny_llama(vocab_size: int, *, seed: int = 0, hidden: int = 64):
    """A 2-layer Llama (hidden 64) with a tied head, as the 135 M SmolLM2 ties its head. At hidden 64 CPU matrix
    products are already not batch invariant (a row's log-prob moves by ~1e-6 with the other rows of its batch)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def save_model(path, tok, *, seed: int = 0, hidden: int = 64) -> str:
    """A `--model` directory: the tiny Llama's config and safetensors, and `tok`."""
    path = Path(path)
    tiny_llama(len(tok), seed=seed, hidden=hidden).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def chat_pairs(n: int, seed: int = 0) -> list:
    """`{"prompt", "chosen", "rejected"}` as message lists."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        i = rng.randrange(len(QUESTIONS))
        good, bad = ANSWERS[i]
        out.append({"prompt": [{"role": "user", "content": QUESTIONS[i]}],
                    "chosen": [{"role": "assistant", "content": good}],
                    "rejected": [{"role": "assistant", "content": bad}]})
    return out


def string_pairs(n: int, seed: int = 0) -> list:
    """`{"prompt", "chosen", "rejected"}` as strings (completions start with their separating space)."""
    return [{"prompt": r["prompt"][0]["content"], "chosen": " " + r["chosen"][0]["content"],
             "rejected": " " + r["rejected"][0]["content"]} for r in chat_pairs(n, seed)]


def write_jsonl(path, records) -> str:
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)
