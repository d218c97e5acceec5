"""The study's presets: stage sizes and sweeps of `fusealign compare` (`--preset smoke|default|gpu`), its DPO rows,
and its two preference settings. Plain data, read by the study's config (validation) and its pipeline."""

DPO_DATA = ("offline", "onpolicy", "iterative")

PRESETS = {
    # name: stage sizes and per-setting sweeps ("in" overridden by --kl-coefs / --betas). `main_beta` is the β of
    # the on-policy rows and of the DPO rows the findings quote: DPOConfig's default, fixed before any run rather
    # than picked from the results. GRPO draws
    # `grpo_generations` samples for each of ppo_batch / grpo_generations prompts: as many samples per iteration as
    # PPO. On-policy DPO samples `onpolicy_prompts` pairs once (default: as many as the offline set holds);
    # iterative DPO re-samples every `resample_every` steps, resample_every × 16 (the DPO batch) pairs a round, so
    # each pair is trained on once.
    "smoke": dict(seeds=(0, 1), sft_steps=40, rm_steps=40, dpo_steps=30, ppo_steps=6, ppo_batch=16, eval_prompts=48,
                  ppo_kl_coefs={"in": (0.05,), "ood": (0.05,)}, grpo_kl_coefs={"in": (0.05,), "ood": ()},
                  dpo_betas={"in": (0.5,), "ood": (0.5,)}, main_beta=0.5, grpo_generations=4,
                  onpolicy_prompts=96, resample_every=15),
    "default": dict(seeds=(0, 1, 2), sft_steps=200, rm_steps=200, dpo_steps=200, ppo_steps=60, ppo_batch=32,
                    eval_prompts=256, ppo_kl_coefs={"in": (0.01, 0.05, 0.2, 0.5, 1.0), "ood": (0.05, 0.2, 0.5, 1.0)},
                    grpo_kl_coefs={"in": (0.05,), "ood": ()},
                    dpo_betas={"in": (0.1, 0.5, 2.0), "ood": (0.1, 0.5, 2.0)}, main_beta=0.5,
                    grpo_generations=4, onpolicy_prompts=2000, resample_every=50),
    "gpu": dict(seeds=(0, 1, 2, 3, 4), sft_steps=500, rm_steps=500, dpo_steps=500, ppo_steps=200, ppo_batch=64,
                eval_prompts=1024, ppo_kl_coefs={"in": (0.005, 0.01, 0.03, 0.05, 0.1, 0.2, 0.5, 1.0),
                                                 "ood": (0.01, 0.05, 0.2, 1.0)},
                grpo_kl_coefs={"in": (0.01, 0.05, 0.2), "ood": (0.05,)},
                dpo_betas={"in": (0.05, 0.1, 0.3, 0.5, 1.0, 2.0), "ood": (0.1, 0.5, 2.0)}, main_beta=0.5,
                grpo_generations=4, onpolicy_prompts=2000, resample_every=100),
}
SETTINGS = (("in", "builtin:pairs"), ("ood", "builtin:pairs-ood"))
