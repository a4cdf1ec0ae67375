#!/usr/bin/env bash
# The GPU checks in one run, with cfebm alone (torch, numpy, fsspec; no Ray, MLflow, DVC):
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# 1. the tests marked gpu (fused energy against the naive path, bf16 tolerance, exact
#    resume of a coarse-to-fine training), without the suite's conftest, which loads the
#    fixtures of the full install; 2. the Langevin and training benchmark on CUDA, the
#    release CIFAR-10 network at batch 64 and 1024, and at 64 with the energies compiled
#    (CUDA graphs). Output in OUT_DIR (default $OUT or gpu-check/).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-check}}
mkdir -p "$out"
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
PYTHONPATH=$PWD timeout 240 "$py" -m pytest -m gpu --noconftest -p no:cacheprovider -q \
	tests/test_gpu.py 2>&1 | tee "$out/gpu_tests.txt"
tests=${PIPESTATUS[0]}
bench=0
for batch in 64 1024; do # the release's batch at 32x32, and a batch that fills the card
	PYTHONPATH=$PWD timeout 200 "$py" -m benchmarks.langevin --network cifar10 --device cuda \
		--batch "$batch" 2>&1 | tee "$out/bench-$batch.txt"
	bench=$((bench || PIPESTATUS[0]))
done
# The fused energies compiled with CUDA graphs (sampler.compile: reduce-overhead), batch 64.
PYTHONPATH=$PWD timeout 200 "$py" -m benchmarks.langevin --network cifar10 --device cuda \
	--batch 64 --compile reduce-overhead 2>&1 | tee "$out/bench-64-compiled.txt"
bench=$((bench || PIPESTATUS[0]))
echo "gpu tests: exit $tests; benchmark: exit $bench"
exit $((tests || bench))
