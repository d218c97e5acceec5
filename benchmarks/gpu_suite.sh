#!/usr/bin/env bash
# One device call: install the carried peer wheels (if any), run the GPU test suite, then every benchmark
# with a time budget, then the plots. Raw JSON lands in benchmarks/results/ (and $OUT when set).
#   device run:  carry [".whl"], command: bash benchmarks/gpu_suite.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/python:${PYTHONPATH:-} PYTHONUNBUFFERED=1
# The checkout is not installed on the device: map the package like setup.py does.
mkdir -p /tmp/fa/fusealign && cp -r python/fusealign/* /tmp/fa/fusealign/ && cp -r kernels /tmp/fa/fusealign/kernels \
  && cp -r engine /tmp/fa/fusealign/engine && export PYTHONPATH=/tmp/fa:$PYTHONPATH
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# Every kernel test on the GPU (incl. GPU-marked ones), then the GPU-only engine checks (packing, bf16).
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/kernels 2>&1 | tail -15
timeout 60 python3 -m pytest -q -p no:cacheprovider -m gpu tests/engine 2>&1 | tail -8
# FSDP2 on one GPU (bf16 parameters, fp32 reduction, NCCL) against the same run without FSDP.
timeout 120 python3 -m fusealign dpo --fsdp --max-steps 20 --output-dir /tmp/fsdp1 2>&1 | tail -3 && cp /tmp/fsdp1/metrics.jsonl benchmarks/results/fsdp1_metrics.jsonl
timeout 120 python3 -m fusealign dpo --max-steps 20 --output-dir /tmp/nofsdp 2>&1 | tail -3 \
  && cp /tmp/nofsdp/metrics.jsonl benchmarks/results/nofsdp_metrics.jsonl
timeout 200 python3 benchmarks/bench_logps.py --N 4096 16384 --V 32000 128256 262144 --impls fusealign,matmul,naive,liger,cce
timeout 60 python3 benchmarks/bench_dpo.py --tokens 16384
timeout 60 python3 benchmarks/bench_kl.py --N 16384
python3 benchmarks/plot_results.py || true
if [ -n "${OUT:-}" ]; then cp benchmarks/results/*.json benchmarks/results/*.png "$OUT"/ 2>/dev/null; fi
