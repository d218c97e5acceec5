"""Data loading: every bad-input case names file, line and field; truncation is counted."""

import json

import pytest
import torch

from fusealign.engine.study import task
from fusealign.engine.data import DataError, check_vocab, collate, load_examples

TOK = task.tokenizer()


def write(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return str(p)


def test_builtin_data_loads_and_tokenizes():
    ex, stats = load_examples("builtin:sft", "sft", TOK, max_length=48)
    assert len(ex) == 4000 and stats.skipped == 0
    e = ex[0]
    assert e.prompt[0] == TOK.bos_token_id and e.completions[0][-1] == TOK.eos_token_id
    pairs, _ = load_examples("builtin", "pairs", TOK, max_length=48)
    assert len(pairs[0].completions) == 2


def test_builtin_sequences_are_the_tasks_under_trls_rule():
    """The built-in task's sequences are `<bos> prompt completion <eos>` (the built-in tokenizer adds `<bos>` itself,
    the records carry the completion's separating space), as before the engine tokenised like TRL."""
    for name, kind, keys in (("builtin:sft", "sft", ("completion",)), ("builtin:pairs-ood", "pairs", ("chosen", "rejected"))):
        ex, stats = load_examples(name, kind, TOK, max_length=48)
        for e, r in zip(ex[:300], task.builtin_dataset(name, kind)):
            assert e.prompt == [TOK.bos_token_id] + TOK.encode(r["prompt"], add_special_tokens=False)
            assert e.completions == [TOK.encode(r[k], add_special_tokens=False) + [TOK.eos_token_id] for k in keys]
        assert stats.truncated == 0 and stats.prompt_boundary == 0


def test_malformed_and_missing_fields_name_file_line_field(tmp_path):
    good = {"prompt": "movie the", "chosen": "good", "rejected": "bad"}
    path = write(tmp_path, [good, "{not json", good])
    with pytest.raises(DataError, match=r"d\.jsonl:2: malformed JSON"):
        load_examples(path, "pairs", TOK, max_length=48)
    path = write(tmp_path, [good, {"prompt": "movie", "chosen": "good"}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: missing field 'rejected'"):
        load_examples(path, "pairs", TOK, max_length=48)
    path = write(tmp_path, [{"prompt": "movie", "completion": 3}])
    with pytest.raises(DataError, match=r"d\.jsonl:1: field 'completion' must be a string"):
        load_examples(path, "sft", TOK, max_length=48)
    path = write(tmp_path, [[1, 2]])
    with pytest.raises(DataError, match=r"d\.jsonl:1: expected a JSON object"):
        load_examples(path, "sft", TOK, max_length=48)


def test_skip_bad_lines_counts(tmp_path):
    good = {"prompt": "movie the", "completion": "good day"}
    path = write(tmp_path, [good, "{oops", {"prompt": "x"}, good])
    ex, stats = load_examples(path, "sft", TOK, max_length=48, skip_bad_lines=True)
    assert len(ex) == 2 and stats.lines == 4 and stats.skipped == 2
    assert "malformed JSON" in stats.errors[0] and "missing field 'completion'" in stats.errors[1]


def test_truncation_policy_and_no_room(tmp_path):
    long = " " + " ".join(["good"] * 30)  # strings are joined as they are (TRL's rule): the space is the completion's
    path = write(tmp_path, [{"prompt": "movie the", "completion": long}, {"prompt": "movie", "completion": " good"}])
    ex, stats = load_examples(path, "sft", TOK, max_length=12)
    assert stats.truncated == 1 and stats.completions == 2 and stats.longest == 1 + 2 + 30 + 1
    assert len(ex[0].prompt) + len(ex[0].completions[0]) == 12  # completion cut on the right
    assert ex[0].prompt == [TOK.bos_token_id] + TOK.encode("movie the", add_special_tokens=False)  # prompt intact
    path = write(tmp_path, [{"prompt": " ".join(["movie"] * 20), "completion": " good"}])
    with pytest.raises(DataError, match=r"d\.jsonl:1: the prompt has 21 tokens, leaving no room"):
        load_examples(path, "sft", TOK, max_length=12)


def test_empty_data_and_vocab_mismatch(tmp_path):
    path = write(tmp_path, [])
    with pytest.raises(DataError, match="empty data set"):
        load_examples(path, "sft", TOK, max_length=48)
    path = write(tmp_path, ["{bad"])
    with pytest.raises(DataError, match="empty data set.*1 skipped"):
        load_examples(path, "sft", TOK, max_length=48, skip_bad_lines=True)
    with pytest.raises(DataError, match="no such file"):
        load_examples(str(tmp_path / "missing.jsonl"), "sft", TOK, max_length=48)
    with pytest.raises(DataError, match="tokenizer has 74 tokens but the model's vocabulary has 50"):
        check_vocab(TOK, 50)


def test_chat_messages_use_the_chat_template(tmp_path):
    tok = task.tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}the{% endif %}"
    path = write(tmp_path, [{"messages": [{"role": "user", "content": "movie"}, {"role": "assistant", "content": "good"}]}])
    (e,), stats = load_examples(path, "sft", tok, max_length=48)
    # The prompt alone renders "movie the", prompt + completion "movie good": the completion starts where the two
    # token sequences part (TRL's common prefix), and no EOS is added (the template ends a turn, or does not).
    assert tok.decode(e.prompt) == "movie" and tok.decode(e.completions[0]) == "good" and stats.prompt_boundary == 1
    with pytest.raises(DataError, match="no chat template"):
        load_examples(path, "sft", TOK, max_length=48)


def test_collate_targets_only_on_completion_tokens():
    b = collate([([2, 10, 11], [20, 3]), ([2, 12], [21, 22, 3])], pad_id=0, pack=False)
    # row 0: ids 2 10 11 20 3 -> targets at t=2 (→20) and t=3 (→3)
    assert b.targets[0].tolist() == [-100, -100, 20, 3, -100]
    assert b.targets[1].tolist() == [-100, 21, 22, 3, -100]
    p = collate([([2, 10, 11], [20, 3]), ([2, 12], [21, 22, 3])], pad_id=0, pack=True)
    assert p.input_ids.shape == (1, 10) and p.attention_mask is None
    assert p.position_ids[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
    assert torch.equal(p.targets[p.targets != -100], b.targets[b.targets != -100])
    assert p.last_index.tolist() == [[0, 4], [0, 9]]
