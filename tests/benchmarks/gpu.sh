#!/usr/bin/env bash
# The GPU checks of one session (about 8 minutes on one H100/H200): throughput of cnf.py eager, compiled
# (CUDA graphs) and bf16 beside the official CNF code, and of `--seeds 0 1 2` (cnf_seeds3: three agents, one
# vmapped update); then one CNF run on generated HalfCheetah medium data (300k transitions; paper-size flow
# and networks, --compile, 20k updates) for its real updates/s and wall time; then the paper's HalfCheetah
# evaluation schedule (10 episodes every 100 updates) for 2k updates over that run's flow, evaluated in the
# training process and in 8 worker processes (`--eval_workers`), for the wall time each costs.
#
#   bash tests/benchmarks/gpu.sh                     # OUT=DIR for the outputs (default /tmp/gpu_out)
#
# Optional, next to the checkout (never committed): .whl/ with wheels of packages the GPU machine lacks
# (gymnasium, mujoco, tyro, pyrallis and their needs: the device tool's README says how), and
# .official_cnf/ with a checkout of github.com/tinkoff-ai/cnf for the official code's figures.
# (In this project's workplace the device tool moves at most 64 MiB: with .whl/ that meant moving
# data/policies/walker2d-medium-replay.hdf5 out of the checkout for the call; nothing here needs it.)
# BUDGET_S (default 520) caps the whole script; the run is stopped at the cap and what it logged comes back.
set -u
start=$(date +%s)
budget=${BUDGET_S:-520}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu BUDGET_S=150 GEN_STEPS=20000: a dry run on a machine without a GPU
GEN_STEPS=${GEN_STEPS:-300000}  # transitions of the generated HalfCheetah medium data (bundled: 1M)
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1  # (no MUJOCO_GL: nothing renders, and EGL is not on the GPU machines)
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
left() { local n=$(( budget - ($(date +%s) - start) )); echo $(( n > 5 ? n : 5 )); }
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/device.txt"

# 1. The dataset, generated on a CPU core while the benchmark (one thread, the GPU) runs.
python3 data/generate.py --env HalfCheetah-v5 --level medium --num_steps "$GEN_STEPS" --seed 0 --no_progress \
  --out /tmp/hc-medium.hdf5 > "$OUT/generate.log" 2>&1 &

# 2. Throughput on CUDA, one line per figure (official code first: it is the reference).
official=""
[ -d .official_cnf/cnf ] && official="--official .official_cnf"
bench_s=$(( $(left) - 290 ))
timeout $(( bench_s > 10 ? bench_s : 10 )) python3 tests/benchmarks/throughput.py --device "$DEVICE" --compile \
  --amp --cnf_only $official --seconds 2 --repeats 3 2>&1 | grep -v Warning | tee "$OUT/throughput.txt"
wait  # the dataset

# 3. One CNF run, alone on the GPU: paper-size flow (3k pre-training steps) and networks, 20k updates, compiled.
timeout $(( $(left) - 130 )) python3 algorithms/cnf.py --dataset_path /tmp/hc-medium.hdf5 --device "$DEVICE" --compile \
  --flow_steps 3000 --flow_eval_every 1000 --train_steps 20000 --eval_every 5000 --log_every 1000 \
  --wandb_mode disabled --checkpoints_path /tmp/gpu_runs --run_name cnf-20k > "$OUT/cnf-20k.log" 2>&1
echo "cnf run exit $?" >> "$OUT/cnf-20k.log"
cp /tmp/gpu_runs/cnf-20k/results.json "$OUT/cnf-20k-results.json" 2>/dev/null
cp /tmp/gpu_runs/cnf-20k/metrics.jsonl "$OUT/cnf-20k-metrics.jsonl" 2>/dev/null

# 4. The paper's HalfCheetah schedule, an evaluation every 100 updates, 2k updates over step 3's flow: in the
#    training process, then in 8 workers (the GPU machine's 16 cores); wall time of each.
for workers in 0 8; do
  t0=$(date +%s)
  timeout $(( $(left) / 2 > 10 ? $(left) / 2 : 10 )) python3 algorithms/cnf.py --dataset_path /tmp/hc-medium.hdf5 \
    --device "$DEVICE" --compile --flow_checkpoint /tmp/gpu_runs/cnf-20k/flow.pt --train_steps 2000 --eval_every 100 \
    --eval_workers $workers --wandb_mode disabled --checkpoints_path /tmp/gpu_runs --run_name "eval-w$workers" \
    > "$OUT/eval-w$workers.log" 2>&1
  echo "eval_every 100, 2000 updates, eval_workers $workers: exit $?, wall $(( $(date +%s) - t0 )) s" \
    | tee -a "$OUT/eval_overlap.txt"
done
echo "elapsed $(( $(date +%s) - start )) s" | tee "$OUT/summary.txt"
