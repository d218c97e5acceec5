"""sampling/sampling_logp_difference on a checkpoint whose generation_config.json reshapes the distribution:
a plain `model.generate` (what engine/sampling.py called before: the checkpoint fills every unset field; its
processed scores read with output_scores) against `HFGenerate` (our flags alone), both scored by the fused path.

    python scripts/sampling_mismatch.py [--repetition-penalty 1.3] [--no-repeat-ngram-size 2]
        [--suppress-tokens 10,11,12] [--min-new-tokens 4] [--temperature 1.0] [--prompts 64] [--arch llama|opt]
        [--no-pack]

Random-weight tiny models of the built-in task, fp32 on CPU; prints one line per sampler.
"""

import argparse
import tempfile

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repetition-penalty", type=float, default=1.3)
    ap.add_argument("--no-repeat-ngram-size", type=int, default=2)
    ap.add_argument("--suppress-tokens", default="10,11,12")
    ap.add_argument("--min-new-tokens", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--arch", choices=("llama", "opt"), default="llama")
    ap.add_argument("--no-pack", action="store_true")
    a = ap.parse_args()

    from transformers import OPTConfig

    from fusealign.engine.study import task
    from fusealign.engine.data import collate
    from fusealign.engine.models import load_causal_lm, model_from_config, score_tokens
    from fusealign.engine.ppo import to_padded
    from fusealign.engine.sampling import HFGenerate, SamplingParams, sampling_logp_difference

    torch.set_num_threads(1)
    tok = task.tokenizer()
    if a.arch == "llama":
        config = task.model_config()
    else:
        config = OPTConfig(vocab_size=len(task.VOCAB), hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=64,
                           tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    m = model_from_config(config, seed=0)
    g = m.generation_config
    g.repetition_penalty, g.no_repeat_ngram_size, g.min_new_tokens = a.repetition_penalty, a.no_repeat_ngram_size, \
        a.min_new_tokens
    g.suppress_tokens = [int(t) for t in a.suppress_tokens.split(",") if t] or None
    path = tempfile.mkdtemp()
    m.save_pretrained(path)
    m = load_causal_lm(path).eval()
    shown = {k: v for k, v in m.generation_config.to_diff_dict().items()
             if k in ("repetition_penalty", "no_repeat_ngram_size", "suppress_tokens", "min_new_tokens")}
    prompts = [[tok.bos_token_id] + tok.encode(p, add_special_tokens=False) for p in task.eval_prompts(a.prompts, 0)]
    T = a.temperature

    def plain_generate():
        gen = torch.Generator().manual_seed(0)
        L = max(len(p) for p in prompts)
        ids, mask = torch.full((len(prompts), L), tok.pad_token_id), torch.zeros((len(prompts), L), dtype=torch.long)
        for j, p in enumerate(prompts):
            ids[j, L - len(p):], mask[j, L - len(p):] = torch.tensor(p), 1
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        out = m.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=T, top_p=1.0, top_k=0,
                         max_new_tokens=16, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         output_scores=True, return_dict_in_generate=True)
        lp = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], 1)  # (B, G, V): fine at this size
        res = []
        for r, row in enumerate(out.sequences[:, L:].tolist()):
            e = tok.eos_token_id in row
            n = row.index(tok.eos_token_id) if e else len(row)
            res.append((row[:n], e, lp[r, torch.arange(n + e), torch.tensor(row[:n + e], dtype=torch.long)]))
        return res

    def difference(outs):
        seqs = [(p, ids + ([tok.eos_token_id] if e else [])) for p, (ids, e, _) in zip(prompts, outs)]
        width = max(len(c) for _, c in seqs)
        mask, samp = torch.zeros(len(seqs), width, dtype=torch.bool), torch.zeros(len(seqs), width)
        for i, (_, c) in enumerate(seqs):
            mask[i, :len(c)], samp[i, :len(c)] = True, outs[i][2]
        with torch.no_grad():
            s = score_tokens(m, collate(seqs, pad_id=tok.pad_token_id, pack=not a.no_pack), temperature=T)
        d = sampling_logp_difference(to_padded(s.logps, mask), samp, mask)
        return d, int(mask.sum())

    print(f"{a.arch}, checkpoint generation config {shown}, T = {T}, {len(prompts)} prompts, "
          f"{'padded' if a.no_pack else 'packed'} scoring")
    for name, outs in (("plain generate (checkpoint's config)", plain_generate()),
                       ("HFGenerate (our flags alone)", [(c.ids, c.ended, c.logps) for c in HFGenerate(m, tok).sample(
                           prompts, SamplingParams(temperature=T, max_new_tokens=16))])):
        d, n = difference(outs)
        print(f"  {name:38s} mean {d['sampling/sampling_logp_difference/mean']:.3g}  "
              f"max {d['sampling/sampling_logp_difference/max']:.3g}  ({n} tokens)")


if __name__ == "__main__":
    main()
