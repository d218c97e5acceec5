"""Print the GRPO parity table: TRL 1.16's own `GRPOTrainer` code vs `fa.linear_grpo_loss` and `fa.grpo_loss`.

    python scripts/grpo_parity.py            # CPU, fp32, about a minute; needs the test dependencies (trl)
    python scripts/grpo_parity.py --summary  # one line per loss type: the worst row of each

Each row runs TRL's `_generate_and_score_completions` and `_compute_loss` (unmodified) on a tiny Llama with TRL's
own fused head, then ours on the same batch (tests/trl_grpo.py), over every loss type × importance-sampling level
× clipping option × KL on/off × vLLM importance-sampling mode, and the extra options; it reports the losses and the
largest relative difference of the loss, of any parameter's gradient and of any metric TRL logs.
tests/losses/test_grpo_trl_parity.py asserts < 1e-5 for each.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import torch  # noqa: E402

import trl_grpo  # noqa: E402


def _worst(row) -> float:
    return max(row[i][k] for i in ("linear_grpo_loss", "grpo_loss") if i in row
               for k in ("loss_rel", "grad_rel", "metric_rel"))


def main(argv) -> int:
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and the numbers do not depend on it
    rows = [trl_grpo.compare(case, implementations=trl_grpo.implementations(case)) for case in trl_grpo.CASES]
    if "--summary" in argv:
        print(f"{'loss_type':<10} {'rows':>5} {'max rel diff: loss':>18} {'grads':>8} {'metrics':>8}")
        for lt in trl_grpo.LOSS_TYPES:
            mine = [r for r in rows if trl_grpo.CASES[r["case"]].get("loss_type", "dapo") == lt]
            worst = {k: max(r[i][k] for r in mine for i in ("linear_grpo_loss", "grpo_loss") if i in r)
                     for k in ("loss_rel", "grad_rel", "metric_rel")}
            print(f"{lt:<10} {len(mine):>5} {worst['loss_rel']:>18.1e} {worst['grad_rel']:>8.1e} "
                  f"{worst['metric_rel']:>8.1e}")
    else:
        print(trl_grpo.table(rows))
    worst = max(_worst(r) for r in rows)
    print(f"\n{len(rows)} cases; worst relative difference {worst:.1e} (loss, gradients, metrics)")
    return 0 if worst < 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
