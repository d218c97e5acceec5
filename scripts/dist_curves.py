"""Loss curves of one process and of torchrun with 2 and 3 ranks side by side (CPU, gloo), SFT then DPO on
the built-in task with the same global batch; prints a markdown table and the max differences.

    python scripts/dist_curves.py [--steps 8] [--batch-size 12]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def launch(nproc: int, args: list, cwd: Path) -> None:
    head = [sys.executable, "-m", "fusealign"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "fusealign"]
    subprocess.run([*head, *args, "--device", "cpu", "--threads", "1"], cwd=cwd, check=True, capture_output=True)


def losses(run_dir: Path) -> list:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=12, help="global batch (divisible by 2 and 3 splits evenly)")
    a = p.parse_args()
    common = ["--max-steps", str(a.steps), "--batch-size", str(a.batch_size), "--save-every", str(a.steps)]
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        curves = {}
        for nproc in (1, 2, 3):
            launch(nproc, ["sft", *common, "--output-dir", f"sft{nproc}"], d)
            curves[("sft", nproc)] = losses(d / f"sft{nproc}")
        sft = str(d / "sft1" / f"checkpoint-{a.steps:06d}")
        for nproc in (1, 2, 3):
            launch(nproc, ["dpo", *common, "--sft-model", sft, "--eval-samples", "8", "--output-dir", f"dpo{nproc}"], d)
            curves[("dpo", nproc)] = losses(d / f"dpo{nproc}")
    for cmd in ("sft", "dpo"):
        print(f"\n{cmd}: loss per step (global batch {a.batch_size})\n")
        print("| step | 1 process | 2 ranks | 3 ranks |\n|---|---|---|---|")
        for i in range(a.steps):
            print(f"| {i + 1} | " + " | ".join(f"{curves[(cmd, n)][i]:.8f}" for n in (1, 2, 3)) + " |")
        for n in (2, 3):
            diff = max(abs(x - y) for x, y in zip(curves[(cmd, 1)], curves[(cmd, n)]))
            print(f"\n{cmd}: max |loss(1 process) − loss({n} ranks)| = {diff:.2e}")


if __name__ == "__main__":
    main()
