"""`fa.grpo_loss` / `fa.linear_grpo_loss` against TRL 1.16's own `GRPOTrainer` code (CPU, fp32).

tests/trl_grpo.py runs TRL's `_generate_and_score_completions` (stub sampler and reward: padding, truncation
masks, num_items_in_batch, old and reference log-probs, the vLLM importance-sampling ratio and its metrics,
advantages) and `_compute_loss` (every loss type, GSPO, clipping, KL, masks, entropy bonus, aggregation,
metrics), unmodified, on a tiny Llama with TRL's own fused head, then ours on the same batch. For every loss
type × importance-sampling level × clipping option × KL on/off × vLLM IS mode (and the extras: entropy and
off-policy masks, entropy bonus, bias correction off, SAPO / VESPO parameters, truncated-completion masking,
temperature): the loss, the gradient of every model parameter and every metric TRL logs agree within 1e-5
relative (the fused twin's loss: or at least as near the float64 loss as TRL's, where a loss that nearly
cancels amplifies fp32 rounding of the log-probs past 1e-5). `pytest -s` prints the parity table (also:
`python scripts/grpo_parity.py`).
"""

import dataclasses

import pytest

pytest.importorskip("trl")

import trl_grpo as H  # noqa: E402  (tests/trl_grpo.py)

import fusealign as fa  # noqa: E402

RTOL = 1e-5


def check(row):
    bad = []
    for impl in ("linear_grpo_loss", "grpo_loss"):
        if impl not in row:
            continue
        r = row[impl]
        for what in ("loss_rel", "grad_rel", "metric_rel"):
            # The fused twin's loss may differ from TRL's by more than RTOL only where it is at least as near the
            # float64 loss as TRL's own (H.compare measures both then): fp32 rounding of a loss that nearly cancels.
            if what == "loss_rel" and "loss_err64" in r and r["loss_err64"] <= r["trl_err64"]:
                continue
            if not r[what] < RTOL:
                bad.append(f"{row['case']}: {impl} {what} = {r[what]:.2e}"
                           + (f" (vs float64: ours {r['loss_err64']:.1e}, TRL {r['trl_err64']:.1e})"
                              if what == "loss_rel" and "loss_err64" in r else ""))
        if r["metrics_missing"]:
            bad.append(f"{row['case']}: {impl} does not log {r['metrics_missing']}")
    return bad


@pytest.fixture(scope="module")
def rows():
    return {case: H.compare(case, implementations=H.implementations(case)) for case in H.CASES}


def test_every_combination_matches_trl_and_print_the_table(rows):
    print("\n" + H.table(rows.values()))
    bad = [msg for row in rows.values() for msg in check(row)]
    assert not bad, "\n".join(bad)
    # the grid is the whole product the issue names (vespo × sequence_* modes: refused, as TRL's __init__ does)
    combos = {(o["loss_type"], o["importance_sampling_level"], "beta" in o, o.get("vllm_importance_sampling_mode",
              "none") if o["use_vllm"] else "none") for o in H.GRID.values()}
    assert len(combos) == 8 * 2 * 2 * 5 - 2 * 2 * 2
    assert sum("linear_grpo_loss" in r for r in rows.values()) >= 150


def test_the_grid_exercises_what_it_names(rows):
    """Not vacuous: on these rollouts each clipping option, each vLLM IS mode, KL and every extra changes TRL's
    loss, and clipping and the IS correction happen (their metrics are non-zero)."""
    trl = {c: r["trl"] for c, r in rows.items()}
    for lt in H.CLIPPED:
        losses = [trl[f"{lt} token {c} β=0 no vLLM"] for c in H.CLIPPING]
        assert len({round(x, 9) for x in losses}) == 3, (lt, losses)
    for lt in H.LOSS_TYPES:
        clip = {"cispo": "ε_h=ε", "sapo": "–", "vespo": "–"}.get(lt, "ε")
        modes = [m for m in H.IS_MODES if not (lt == "vespo" and m.startswith("sequence"))]
        for level in ("token", "sequence"):
            losses = [trl[f"{lt} {level} {clip} β=0 {m}"] for m in modes]
            assert len({round(x, 9) for x in losses}) == len(modes), (lt, level, losses)
            assert trl[f"{lt} {level} {clip} β=0.05 no vLLM"] != trl[f"{lt} {level} {clip} β=0 no vLLM"]
    base = trl["dapo token ε β=0 no vLLM"]
    for case in H.EXTRA:
        assert trl[case] != pytest.approx(base, rel=1e-6), case
    m = rows["grpo token ε β=0.05 token_mask"]["grpo_loss"]
    assert m["metric_rel"] < RTOL
    metrics = H.trl_run(H.CASES["grpo token ε β=0.05 token_mask"], backward=False)[1]
    assert metrics["clip_ratio/region_mean"] > 0 and metrics["sampling/importance_sampling_ratio/min"] == 0.0


@pytest.mark.parametrize("case", ["dapo token ε β=0.05 sequence_mask", "everything"])
def test_triton_backend_matches_trl(case):
    bad = check(H.compare(case, backend="triton", implementations=("linear_grpo_loss",)))
    assert not bad, "\n".join(bad)


def test_defaults_are_trls():
    """GRPOOptions' defaults are GRPOConfig's (TRL 1.16) for every shared name, and so are the harness's; the one
    difference is max_completion_length (TRL: 512, a sampling setting; ours: None, dr_grpo asks for it)."""
    from trl import GRPOConfig

    trl_defaults = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
    ours = {f.name: f.default for f in dataclasses.fields(fa.GRPOOptions)}
    shared = set(ours) & set(trl_defaults)
    assert shared >= set(H.TRL_DEFAULTS) - {"mask_truncated_completions"}
    assert {k: ours[k] for k in shared if k != "max_completion_length"} == \
        {k: trl_defaults[k] for k in shared if k != "max_completion_length"}
    assert trl_defaults["max_completion_length"] == 512 and ours["max_completion_length"] is None
    assert {k: trl_defaults[k] for k in H.TRL_DEFAULTS} == H.TRL_DEFAULTS
    # ours beyond GRPOConfig: the batch geometry TRL reads from its trainer state
    assert set(ours) - shared == {"num_processes"}


def test_every_trl_loss_type_is_ours():
    """The loss types GRPOConfig documents are exactly fusealign's table (and the grid's)."""
    import re

    from trl import GRPOConfig

    help_text = next(f for f in dataclasses.fields(GRPOConfig) if f.name == "loss_type").metadata["help"]
    trl_types = set(re.findall(r"'(\w+)'", help_text.split("Supported values are")[1].split(". ")[0]))
    assert trl_types == set(fa.losses.GRPO_LOSS_TYPES) == set(H.LOSS_TYPES), trl_types


def test_vespo_with_sequence_is_modes_is_refused():
    """TRL 1.16's GRPOTrainer.__init__ raises for vespo with a sequence_* vLLM mode; ours, when the sampler's
    log-probs are given (the only time the mode is read)."""
    import inspect

    from trl import GRPOTrainer

    assert "VESPO loss requires `vllm_importance_sampling_mode` to be either" in inspect.getsource(GRPOTrainer.__init__)
    _, _, _, batch = H.trl_run(H.CASES["vespo token – β=0 token_mask"], backward=False)
    with pytest.raises(ValueError, match="vespo' takes per-token vLLM ratios"):
        fa.grpo_loss(batch["old_per_token_logps"], batch["old_per_token_logps"], batch["advantages"],
                     batch["completion_mask"], sampling_logps=batch["sampling_per_token_logps"], loss_type="vespo",
                     vllm_importance_sampling_mode="sequence_truncate")
