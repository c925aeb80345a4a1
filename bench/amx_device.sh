#!/usr/bin/env bash
# Runs the AMX checks on a machine whose CPU has AMX (run from the repo root):
# builds the extension in place with the python3 found there, runs the kernel and
# format tests (the real-AMX kernel is tested wherever the CPU can run it), then
# bench/linear.py with the automatic kernel choice and with AMX forced.
# Results go to ${OUT:-/tmp/sparamx-amx}. On a CPU without AMX it says so and stops.
set -uo pipefail
out=${OUT:-/tmp/sparamx-amx}
mkdir -p "$out"
lscpu | grep -E 'Model name|^CPU\(s\)|Socket|NUMA node\(s\)|L3' | tee "$out/lscpu.txt"
if ! grep -qw amx_tile /proc/cpuinfo; then
    echo "no amx_tile on this CPU: nothing to check here"
    exit 0
fi
grep -o 'amx[a-z0-9_]*\|avx512_bf16' /proc/cpuinfo | sort -u | tr '\n' ' '; echo
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=.
MAX_JOBS=${MAX_JOBS:-16} python3 setup.py -q build_ext --inplace > "$out/build.log" 2>&1 \
    || { tail -30 "$out/build.log"; exit 1; }
python3 -c "import sparamx, json; print(json.dumps(sparamx.kernel_info()))"
python3 -m pytest -q -p no:cacheprovider tests/test_format.py tests/test_kernels.py -k "${PYTEST_K:-}" \
    2>&1 | tee "$out/tests.txt" | tail -15
bench="--shapes 4096x4096,14336x4096 --sparsity 0,0.5,0.7 --residency dram --repeats 5"
python3 bench/linear.py $bench --m 1,16,256 --threads 1,${BENCH_THREADS:-16} \
    --json "$out/linear_auto.json" > "$out/linear_auto.txt" 2>&1
tail -20 "$out/linear_auto.txt"
python3 bench/linear.py $bench --m 1,16 --threads 1 --kernel amx \
    --json "$out/linear_amx.json" > "$out/linear_amx.txt" 2>&1
tail -8 "$out/linear_amx.txt"
