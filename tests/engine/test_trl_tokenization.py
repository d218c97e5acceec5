"""Token for token with TRL 1.16 on the same JSONL: `load_examples` against TRL's own dataset preparation
(`SFTTrainer._prepare_dataset`, `DPOTrainer._prepare_dataset`: its `_tokenize`, `apply_chat_template`,
`common_prefix_length`, `maybe_convert_to_chatml`, `extract_prompt`, EOS handling), on a real byte-level BPE
tokenizer with SmolLM2's ChatML template — and its Llama-style twin whose tokenizer adds `<s>` itself."""

import types

import pytest

from fusealign.engine.data import DataError, load_examples, load_prompts

from real_model import chat_pairs, chatml_tokenizer, string_pairs, write_jsonl

TOKS = {"chatml": chatml_tokenizer(), "llama-bos": chatml_tokenizer(llama_bos=True)}


def trl_sft(records, tok, tmp_path):
    """TRL's SFT preparation of `records`: [(input_ids, labels)]."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path / "trl"), max_length=None, report_to=[], use_cpu=True)
    first = records[0]
    fake = types.SimpleNamespace(_tokenizer=tok, chat_template=None,
                                 completion_only_loss="prompt" in first and "completion" in first)
    ds = SFTTrainer._prepare_dataset(fake, Dataset.from_list(records), tok, args, packing=False, formatting_func=None,
                                     dataset_name="train")
    return [(r["input_ids"], r["labels"]) for r in ds]


def trl_dpo(records, tok, tmp_path):
    """TRL's DPO preparation of `records`: [(prompt_ids, chosen_ids, rejected_ids)]."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(tmp_path / "trl"), max_length=None, report_to=[], use_cpu=True)
    ds = DPOTrainer._prepare_dataset(types.SimpleNamespace(_tokenizer=tok), Dataset.from_list(records), tok, args,
                                     dataset_name="train")
    return [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in ds]


def ours(records, kind, tok, tmp_path):
    return load_examples(write_jsonl(tmp_path / "d.jsonl", records), kind, tok, max_length=10_000)[0]


def sft_cases():
    chat = chat_pairs(6, seed=1)
    strings = string_pairs(6, seed=1)
    return {
        "prompt-completion strings": [{"prompt": r["prompt"], "completion": r["chosen"]} for r in strings],
        "completion ending in EOS": [{"prompt": r["prompt"], "completion": r["chosen"] + "<|im_end|>"}
                                     for r in strings],
        "conversational prompt-completion": [{"prompt": r["prompt"], "completion": r["chosen"]} for r in chat],
        "with a system turn": [{"prompt": [{"role": "system", "content": "Be brief."}] + r["prompt"],
                                "completion": r["chosen"]} for r in chat],
    }


@pytest.mark.parametrize("tok_name", list(TOKS))
@pytest.mark.parametrize("case", list(sft_cases()))
def test_sft_prompt_completion_matches_trl(case, tok_name, tmp_path):
    tok = TOKS[tok_name]
    records = sft_cases()[case]
    theirs = trl_sft(records, tok, tmp_path)
    mine = ours(records, "sft", tok, tmp_path)
    assert len(mine) == len(theirs) == len(records)
    for e, (ids, labels) in zip(mine, theirs):
        assert e.prompt + e.completions[0] == ids  # the same sequence …
        assert [i for i, y in enumerate(labels) if y != -100] == list(range(len(e.prompt), len(ids)))  # … targets
    e = mine[0]
    if isinstance(records[0]["prompt"], list):  # ChatML: the template's whole assistant turn, "\n" included
        assert tok.decode(e.completions[0]).endswith("<|im_end|>\n")
    else:  # strings: the tokenizer's own special tokens only (Llama-style `<s>`; none for ChatML) + EOS
        assert (e.prompt[0] == tok.convert_tokens_to_ids("<s>")) == (tok_name == "llama-bos")
        assert e.completions[0][-1] == tok.eos_token_id and e.completions[0].count(tok.eos_token_id) == 1


@pytest.mark.parametrize("fmt", ["messages", "conversations"])
def test_sft_conversations_match_trl_sequences(fmt, tmp_path):
    """`messages` (and ShareGPT's `conversations`): TRL's sequence exactly; we train its last turn, TRL's
    conversational prompt–completion split of it (TRL itself trains every token of a `messages` record)."""
    tok = TOKS["chatml"]
    msgs = [r["prompt"] + r["chosen"] for r in chat_pairs(5, seed=2)]
    if fmt == "messages":
        records = [{"messages": m} for m in msgs]
    else:
        records = [{"conversations": [{"from": x["role"], "value": x["content"]} for x in m]} for m in msgs]
    theirs = trl_sft(records, tok, tmp_path)
    split = trl_sft([{"prompt": m[:-1], "completion": m[-1:]} for m in msgs], tok, tmp_path)
    for e, (ids, _), (_, labels) in zip(ours(records, "sft", tok, tmp_path), theirs, split):
        assert e.prompt + e.completions[0] == ids
        assert [i for i, y in enumerate(labels) if y != -100] == list(range(len(e.prompt), len(ids)))


def test_sft_text_matches_trl(tmp_path):
    tok = TOKS["llama-bos"]
    records = [{"text": "The sky is blue because air scatters blue light."}, {"text": "Waves."}]
    for e, (ids, labels) in zip(ours(records, "sft", tok, tmp_path), trl_sft(records, tok, tmp_path)):
        assert e.prompt + e.completions[0] == ids and all(y != -100 for y in labels)
        assert len(e.prompt) <= 1  # every token after the first is a target (the first has no context)


def dpo_cases():
    chat, strings = chat_pairs(6, seed=3), string_pairs(6, seed=3)
    return {
        "strings": strings,
        "conversational": chat,
        "implicit prompt, conversational": [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
                                            for r in chat],
        "implicit prompt, strings": [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
                                     for r in strings],
    }


@pytest.mark.parametrize("tok_name", list(TOKS))
@pytest.mark.parametrize("case", list(dpo_cases()))
def test_dpo_pairs_match_trl(case, tok_name, tmp_path):
    tok = TOKS[tok_name]
    records = dpo_cases()[case]
    theirs = trl_dpo(records, tok, tmp_path)
    mine = ours(records, "pairs", tok, tmp_path)
    assert len(theirs) == len(records) and [(e.prompt, *e.completions) for e in mine] == theirs


def test_prompts_for_rl_match_trl_grpo(tmp_path):
    """PPO / GRPO prompts: tokenizer(prompt) for strings, the template with the generation prompt for messages
    (TRL's GRPOTrainer._tokenize_prompts)."""
    for tok in TOKS.values():
        strings = [{"prompt": r["prompt"]} for r in string_pairs(3)]
        chats = [{"prompt": r["prompt"]} for r in chat_pairs(3)]
        got = load_prompts(write_jsonl(tmp_path / "p.jsonl", strings + chats), tok, max_prompt_tokens=500)
        want = tok(text=[r["prompt"] for r in strings])["input_ids"] + \
            tok.apply_chat_template([r["prompt"] for r in chats], add_generation_prompt=True, tokenize=True,
                                    return_dict=True)["input_ids"]
        assert got == [list(w) for w in want]


def test_unknown_format_lists_the_accepted_fields(tmp_path):
    tok = TOKS["chatml"]
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}])
    with pytest.raises(DataError, match=r"missing field 'prompt' \(fields here: instruction, output; accepted sft "
                                        r"records: prompt \+ completion, messages, conversations"):
        load_examples(path, "sft", tok, max_length=64)
    with pytest.raises(DataError, match="accepted pairs records: prompt . chosen . rejected, or chosen . rejected"):
        load_examples(path, "pairs", tok, max_length=64)
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match="ending with an assistant turn"):
        load_examples(path, "sft", tok, max_length=64)
