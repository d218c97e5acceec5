"""CPU training throughput, fp32 against `--bf16` (CPU autocast, the fused head's fp32 logits), in one process.

    python benchmarks/bench_cpu_bf16.py                    # a 15.5 M-parameter Llama, SFT steps of 4 × 64 tokens
    python benchmarks/bench_cpu_bf16.py --hidden 576 --layers 30 --vocab 49152   # SmolLM2-135M's shape

The engine's own SFT trainer (`trainer.train`: backbone, fused head, backward, AdamW) runs `--steps` steps per
round with bf16 off and on, alternating for `--rounds` rounds so that a change in machine load hits both alike;
tokens/s is the median over every round's steps after the first (warm-up). The header records the CPU model, its
bf16 flags (avx512_bf16, amx_bf16: without either, oneDNN emulates bf16 matrix products), the thread count, the
load average before and after, the commit and whether the work tree differed from it (`dirty`). Run it alone
(`/work/tools/cpu.sh --exclusive` here): another job on the cores shows up as the spread of `all`.
Results: benchmarks/results/cpu_bf16.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, header  # noqa: E402
from checkpoint_sizes import work_tree_dirty  # noqa: E402

from fusealign.engine.config import SFTConfig  # noqa: E402
from fusealign.engine.data import DataStream, Example  # noqa: E402
from fusealign.engine.objectives import sft_objective  # noqa: E402
from fusealign.engine.runtime import cpu_has_native_bf16  # noqa: E402
from fusealign.engine.trainer import train  # noqa: E402


def cpu_info() -> dict:
    model, flags = "", []
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    return {"cpu": model, "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "native_bf16": cpu_has_native_bf16(), "threads": torch.get_num_threads()}


def model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                                        intermediate_size=args.intermediate or int(args.hidden * 2.75) // 64 * 64,
                                        num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                                        num_key_value_heads=max(1, args.hidden // 192), tie_word_embeddings=True,
                                        max_position_embeddings=args.seq))


def examples(args) -> list:
    g = torch.Generator().manual_seed(0)
    n_prompt = args.seq // 4
    out = []
    for i in range(args.batch * 4):
        ids = torch.randint(4, args.vocab, (args.seq,), generator=g).tolist()
        out.append(Example(ids[:n_prompt], [ids[n_prompt:]], f"synthetic:{i}", uid=i))
    return out


def run(args, bf16: bool, data: list, out_dir: Path) -> list:
    cfg = SFTConfig(output_dir=str(out_dir), max_steps=args.steps, batch_size=args.batch, device="cpu",
                    bf16=bf16, save_every=10 ** 9, lr=1e-5, max_length=args.seq)
    m = model(args)
    train(cfg, m, lambda ex: sft_objective(m, ex, pad_id=0, pack=True, backend="torch"),
          DataStream(data, args.batch, 0), desc="bf16" if bf16 else "fp32")
    rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["tokens_per_s"] for r in rows[1:]]  # step 1 is warm-up (allocator, oneDNN kernel selection)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--intermediate", type=int, default=0)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(RESULTS / "cpu_bf16.json"))
    args = p.parse_args()
    params = sum(t.numel() for t in model(args).parameters())
    info = {**header("engine SFT step", "cpu"), **cpu_info(), "load_before": os.getloadavg(), "params": params,
            "tokens_per_step": args.batch * args.seq, "dirty": work_tree_dirty(), **vars(args)}
    data = examples(args)
    speeds = {"fp32": [], "bf16": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name in ("fp32", "bf16"):
                speeds[name] += run(args, name == "bf16", data, Path(tmp) / f"{name}-{r}")
    info["load_after"] = os.getloadavg()
    result = {"header": info, "tokens_per_s": {k: {"median": statistics.median(v), "all": v}
                                                for k, v in speeds.items()}}
    result["bf16_over_fp32"] = result["tokens_per_s"]["bf16"]["median"] / result["tokens_per_s"]["fp32"]["median"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v["median"] for k, v in result["tokens_per_s"].items()} |
                     {"bf16_over_fp32": result["bf16_over_fp32"], "cpu": info["cpu"],
                      "native_bf16": info["native_bf16"], "load": info["load_before"]}))


if __name__ == "__main__":
    main()
