"""`fa.dpo_loss` / `fa.linear_dpo_loss` against TRL 1.16's own `DPOTrainer` loss code (CPU, fp32).

Every TRL loss type, every f-divergence, label smoothing, WPO weighting and multi-loss combinations
(tests/trl_dpo.py: TRL's `_compute_loss`, unmodified, on a tiny Llama with TRL's own fused head): the loss,
the gradient of every model parameter, and every metric TRL logs agree within 1e-5 relative.
`pytest -s` prints the parity table (also: `python scripts/dpo_parity.py`).
"""

import math

import pytest
import torch

pytest.importorskip("trl")

import trl_dpo as H  # noqa: E402  (tests/trl_dpo.py)

from fusealign.kernels.reference import linear_dpo_loss_reference  # noqa: E402

RTOL = 1e-5


def check(row):
    bad = []
    for impl in ("linear_dpo_loss", "dpo_loss"):
        r = row[impl]
        for what in ("loss_rel", "grad_rel", "metric_rel"):
            if not r[what] < RTOL:
                bad.append(f"{row['case']}: {impl} {what} = {r[what]:.2e}")
        if r["metrics_missing"]:
            bad.append(f"{row['case']}: {impl} does not log {r['metrics_missing']}")
    return bad


def test_every_loss_matches_trl_and_print_the_table():
    rows = [H.compare(case) for case in H.CASES]
    print("\n" + H.table(rows))
    bad = [msg for row in rows for msg in check(row)]
    assert not bad, "\n".join(bad)
    # Every TRL 1.16 loss type and f-divergence is in the table.
    from trl.trainer.dpo_trainer import DPOTrainer  # noqa: F401  (the pinned TRL is the one compared)

    covered = {t for o in H.CASES.values() for t in ([o["loss_type"]] if isinstance(o["loss_type"], str)
                                                     else o["loss_type"])}
    assert covered >= {"sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                       "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"}
    assert {o.get("f_divergence_type") for o in H.CASES.values()} >= {"forward_kl", "js_divergence",
                                                                     "alpha_divergence"}
    assert rows[0]["metrics"] == sorted(H.TRL_METRICS_LOGGED)


@pytest.mark.parametrize("case", ["sigmoid WPO", "MPO sigmoid+bco_pair+sft"])
def test_triton_backend_matches_trl(case):
    bad = check(H.compare(case, backend="triton"))
    assert not bad, "\n".join(bad)


def test_nll_coef_is_rpo():
    """`nll_coef=α` is TRL 1.16's RPO: loss_type=["sigmoid", "sft"], loss_weights=[1, α]."""
    model, batch = H.model_and_batch()
    trl_loss, _, trl_grads = H.trl_run(model, batch, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    loss, _, grads = H.ours_linear(model, batch, nll_coef=0.5)
    assert abs(loss.item() - trl_loss.item()) < RTOL * abs(trl_loss.item())
    assert max(H.rel(grads[k], trl_grads[k]) for k in trl_grads) < RTOL


@pytest.mark.parametrize("loss_type", ["hinge", "sft"])
def test_wpo_where_trl_raises(loss_type):
    """TRL 1.16 multiplies the WPO weights in place: for `hinge` that overwrites ReLU's saved output (its
    backward raises), for `sft` it writes into an expanded tensor (its forward raises). fusealign gives
    the evident value, loss_b · w_w,b · w_l,b: checked against the float64 reference (and, for `hinge`,
    against TRL's forward value, computed before its backward fails)."""
    model, batch = H.model_and_batch()
    with pytest.raises(RuntimeError):
        H.trl_run(model, batch, loss_type=loss_type, use_weighting=True)
    model.zero_grad(set_to_none=True)
    opts = dict(loss_type=loss_type, use_weighting=True, beta=0.1)
    loss, _, grads = H.ours_linear(model, batch, **opts)
    hidden, targets = H._completion_inputs(model, batch)
    h64 = hidden.detach().double().requires_grad_()
    W64 = model.lm_head.weight.detach().double().requires_grad_()
    ref = linear_dpo_loss_reference(h64, W64, targets, ref_chosen_logps=batch["ref_chosen_logps"].double(),
                                    ref_rejected_logps=batch["ref_rejected_logps"].double(), **opts)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    ref.backward()
    assert H.rel(grads["lm_head.weight"], W64.grad) < 1e-4
    if loss_type == "hinge":
        trl_loss, _, _ = H.trl_run(model, batch, backward=False, **opts)
        assert math.isclose(trl_loss.item(), loss.item(), rel_tol=RTOL)
