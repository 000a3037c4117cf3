#!/usr/bin/env bash
# The GPU checks of one session (about 8 minutes on one H100/H200): throughput of cnf.py eager, bf16
# and compiled (CUDA graphs) beside the official CNF code, then the medium presets of CNF (compiled),
# IQL, AWAC and PLAS on generated HalfCheetah and Hopper medium data, all runs at once on the one GPU
# (each run's own timings are in its results.json; they share the GPU, so they are not speed figures).
#
#   bash tests/benchmarks/gpu.sh                     # OUT=DIR for the outputs (default /tmp/gpu_out)
#
# Optional, next to the checkout (never committed): .whl/ with wheels of packages the GPU machine
# lacks (gymnasium, mujoco, tyro, pyrallis and their needs: the device tool's README says how), and
# .official_cnf/ with a checkout of github.com/tinkoff-ai/cnf for the official code's figures.
# BUDGET_S (default 540) caps the whole script: the runs are stopped at the cap, and what they logged
# (metrics.jsonl, checkpoints) is packed into OUT/runs.tar.gz with whatever finished (results.json).
set -u
start=$(date +%s)
budget=${BUDGET_S:-540}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu BUDGET_S=120: a dry run of this script on a machine without a GPU
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MUJOCO_GL=egl
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
left() { local n=$(( budget - ($(date +%s) - start) )); echo $(( n > 5 ? n : 5 )); }
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/device.txt"

# 1. The two datasets, generated on the CPU cores while the benchmark uses the GPU (the benchmark is a
#    single-threaded GPU program; generation runs on other cores).
export CNF_DATA_DIR=/tmp/cnf_datasets
mkdir -p "$CNF_DATA_DIR"
for env in HalfCheetah Hopper; do
  name=$(echo "$env" | tr '[:upper:]' '[:lower:]')-medium-gymv5
  python3 data/generate.py --env "$env-v5" --level medium --num_steps 1000000 --seed 0 --no_progress \
    --out "$CNF_DATA_DIR/$name.hdf5" > "$OUT/generate-$name.log" 2>&1 &
done

# 2. Throughput on CUDA, one line per figure.
official=""
[ -d .official_cnf/cnf ] && official="--official .official_cnf"
bench_s=$(( $(left) - 300 )); timeout $(( bench_s > 10 ? bench_s : 10 )) python3 tests/benchmarks/throughput.py --device $DEVICE --amp --compile $official \
  --seconds 2 --repeats 3 2>&1 | grep -v Warning | tee "$OUT/throughput.txt"
wait  # the datasets

# 3. Medium presets, all at once; stopped at the budget.
runs=/tmp/gpu_runs
common="--device $DEVICE --seed 0 --wandb_mode disabled --checkpoints_path $runs --cpu_threads 1"
for data in halfcheetah-medium-gymv5 hopper-medium-gymv5; do
  python3 algorithms/cnf.py --config_path algorithms/configs/cnf/medium.yaml --env $data --compile $common \
    --run_name cnf-$data > "$runs-cnf-$data.log" 2>&1 &
  for algo in iql awac plas; do
    python3 algorithms/$algo.py --config_path algorithms/configs/$algo/medium.yaml --env $data $common \
      --run_name $algo-$data > "$runs-$algo-$data.log" 2>&1 &
  done
done
sleep $(( $(left) - 25 > 0 ? $(left) - 25 : 1 ))  # runs that finish earlier just wait here
pkill -INT -f "algorithms/.*medium.yaml"; sleep 10; pkill -KILL -f "algorithms/.*medium.yaml"
for f in "$runs"-*.log; do echo "== $f"; tail -n 3 "$f"; done > "$OUT/runs-tail.txt" 2>&1
tar -czf "$OUT/runs.tar.gz" -C / "${runs#/}" $(cd / && ls -d tmp/gpu_runs-*.log) \
  --exclude='*.pt' 2>/dev/null
grep -h "normalized" "$OUT"/generate-*.log "$runs"-*.log 2>/dev/null | tail -n 40 > "$OUT/summary.txt"
echo "elapsed $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.txt"
