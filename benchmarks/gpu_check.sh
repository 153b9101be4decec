#!/usr/bin/env bash
# A GPU session's checks in one go (the device lease is short): the machine, the GPU tests, the GPU benchmark.
# Everything goes to $OUT (default out/gpu). Needs segpipe importable (PYTHONPATH=repo root, or installed).
export PYTHONUNBUFFERED=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
{ nvidia-smi; python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"; nproc; free -g
  uptime; } > "$OUT/machine.txt" 2>&1
timeout "${TESTS_S:-200}" python3 -m pytest -p no:cacheprovider -q -rA tests/test_gpu_device.py \
  tests/test_gpu_resources.py 2>&1 | tee "$OUT/pytest_gpu.log" | tail -40
timeout "${BENCH_S:-280}" python3 benchmarks/bench_gpu.py "${SIZE:-8192}" "${REPS:-3}" > "$OUT/bench_gpu.json" \
  2> "$OUT/bench_gpu.err"
echo "bench_gpu rc=$?"
tail -c 2500 "$OUT/bench_gpu.err"
cat "$OUT/bench_gpu.json"
