"""Checkpoint sizes on disk: resumable against `--save-only-model`, for SmolLM2-135M's shape (random weights).

    python benchmarks/checkpoint_sizes.py      # 30 layers, hidden 576, vocabulary 49,152, tied head: 134.5 M params

One SFT step of the engine's trainer on a synthetic batch, then the checkpoint each mode writes, summed file by file
(dcp/ = the AdamW state). Results: benchmarks/results/checkpoint_sizes.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, header  # noqa: E402

from fusealign.engine.checkpoint import checkpoint_sizes, latest_checkpoint  # noqa: E402
from fusealign.engine.config import SFTConfig  # noqa: E402
from fusealign.engine.data import DataStream, Example  # noqa: E402
from fusealign.engine.objectives import sft_objective  # noqa: E402
from fusealign.engine.trainer import train  # noqa: E402


def work_tree_dirty() -> bool:
    """Whether the code (not the docs) differs from the commit the header names (a result from uncommitted code says so)."""
    r = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/", ":(exclude,top)*.md"], capture_output=True, text=True,
                       cwd=Path(__file__).parent)
    return bool(r.stdout.strip())


def smollm2_135m():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                        tie_word_embeddings=True, max_position_embeddings=2048))


def main():
    data = [Example(list(range(10, 26)), [list(range(30, 62))], f"synthetic:{i}", uid=i) for i in range(2)]
    out = {"header": {**header("engine SFT step + checkpoint", "cpu"), "dirty": work_tree_dirty()}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, only in (("resumable", False), ("save_only_model", True)):
            model = smollm2_135m()
            cfg = SFTConfig(output_dir=f"{tmp}/{name}", max_steps=1, batch_size=2, device="cpu", lr=1e-5,
                            save_only_model=only)
            train(cfg, model, lambda ex: sft_objective(model, ex, pad_id=0, pack=True), DataStream(data, 2, 0))
            total, optim = checkpoint_sizes(latest_checkpoint(Path(cfg.output_dir)))
            out[name] = {"bytes": total, "dcp_bytes": optim}
            params = sum(p.numel() for p in model.parameters())
    out["params"] = params
    out["ratio"] = out["save_only_model"]["bytes"] / out["resumable"]["bytes"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "checkpoint_sizes.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
