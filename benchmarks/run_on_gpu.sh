#!/usr/bin/env bash
# The GPU run behind the README's "Results on a GPU": per-arm step costs on the quiet GPU (overhead.py --arms),
# then every compare_regimes.py arm × 3 seeds, WORKERS jobs at a time on the one GPU, while cuda_smoke.py
# checks fp16/bf16 training and fp16 reloading beside it. Results and logs end up in $1/gpu_run.tgz.
#   bash benchmarks/run_on_gpu.sh <output folder>       (STEPS, EVAL_EVERY, WORKERS, COMPARE_SECONDS, OVERHEAD_STEPS override;
#                                                        COMPARE_FLAGS adds compare_regimes.py flags, e.g. the README's GPU protocol)
# Needs the package importable (installed, or PYTHONPATH=<checkout>) with its dependencies. COMPARE_DIR=<dir>
# continues an earlier run's results.jsonl there instead of starting a fresh one.
set -u
out=${1:?usage: run_on_gpu.sh <output folder>}
run=$(mktemp -d)
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
{ nvidia-smi -L; $python -c "import torch, diffusers, accelerate, torch_pruning as tp; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'accelerate', accelerate.__version__, 'torch-pruning', tp.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"; } > "$run/env.txt" 2>&1 \
  || { cat "$run/env.txt"; exit 1; }
cat "$run/env.txt"
timeout 150 $python benchmarks/overhead.py --arms --steps "${OVERHEAD_STEPS:-30}" --batch_size 32 --output "$run/overhead_gpu.json" > "$run/overhead.log" 2>&1
tail -22 "$run/overhead.log"
costs=(); [ -f "$run/overhead_gpu.json" ] && costs=(--step_costs "$run/overhead_gpu.json")
OMP_NUM_THREADS=2 timeout "${COMPARE_SECONDS:-420}" $python benchmarks/cuda_smoke.py --output "$run/cuda_smoke.json" > "$run/cuda_smoke.log" 2>&1 &
timeout "${COMPARE_SECONDS:-420}" $python benchmarks/compare_regimes.py --workers "${WORKERS:-10}" --threads 1 \
  --max_train_steps "${STEPS:-2000}" --eval_every "${EVAL_EVERY:-250}" "${costs[@]}" ${COMPARE_FLAGS:-} \
  --output_dir "${COMPARE_DIR:-$run/compare}" > "$run/compare.log" 2>&1
echo "compare_regimes exit $?"
wait
grep -E "PASS|FAIL|passed" "$run/cuda_smoke.log"
tail -20 "$run/compare.log"
[ -n "${COMPARE_DIR:-}" ] && cp -r "$COMPARE_DIR" "$run/compare"
rm -rf "$run/compare/runs"
tar czf "$out/gpu_run.tgz" -C "$run" .
