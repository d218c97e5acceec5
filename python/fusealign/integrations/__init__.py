"""Switch fusealign on inside the frameworks people already train with; nothing here runs at `import fusealign`
beyond `hf` (torch only).

- `hf`   — `patch_model`: any Hugging Face causal LM returns per-token log-probs (and entropy, …) without logits
           (the head itself is read by `fusealign.head`, which the engine shares).
- `trl`  — `enable()` / `disable()`: TRL's fused LM head (`add_fused_lm_head`, every trainer that scores
           completions) runs fusealign's kernels. Imports TRL only when called.
- `verl` — `linear_cross_entropy` with verl's signature, and `enable()` for `use_fused_kernels=True`. Imports
           verl only when `enable()` is called.
"""
