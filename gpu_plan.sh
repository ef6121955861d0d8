#!/usr/bin/env bash
# Branch three-consumers only (remove before merging): the GPU runs that
# decide NOTES item 45, each stage one `run` call under 600 s.
#   bash gpu_plan.sh check   # compiled tests + numerics + ptxas spills (~250 s)
#   bash gpu_plan.sh ab      # 2 vs 3 consumers, head_dim 64, two rounds (<440 s)
#   bash gpu_plan.sh ab2     # ring variants, 3 stages, head_dim 128 (<480 s)
set -u
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
t() { timeout -s INT "$1" "${@:2}"; }
case "$1" in
  check)
    nvidia-smi --query-gpu=name,clocks.sm,power.draw --format=csv
    (MOSAIC_GPU_DUMP_PTXAS=1 t 150 python3 exp_consumers.py 3 check "$OUT/check3.json" > "$OUT/check3.log" 2>&1; echo "check rc=$?")
    grep -i "spill" "$OUT/check3.log" | sort | uniq -c | head
    grep -E "^\{|Error" "$OUT/check3.log" | cut -c1-300 | head -40
    t 330 python3 -m pytest tests/test_mosaic.py --compiled -n 16 -q -p no:cacheprovider \
      -W ignore::DeprecationWarning --tb=short -k "three_consumers or lower_for_cuda" 2>&1 | tail -25
    ;;
  ab)
    export PASSES=fwd,fwd+bwd
    for r in 1 2; do for v in 2 3; do
      t 110 python3 exp_consumers.py $v time "$OUT/ab_${v}_$r.json" 2>&1 | grep -E "^\{|Error" | cut -c1-220
    done; done
    ;;
  ab2)
    export PASSES=fwd
    FA2_RING=pv t 80 python3 exp_consumers.py 3 time "$OUT/ab_3pv.json" 2>&1 | grep -E "^\{|Error" | cut -c1-220
    FA2_RING2=1 t 80 python3 exp_consumers.py 2 time "$OUT/ab_2ring.json" 2>&1 | grep -E "^\{|Error" | cut -c1-220
    t 80 python3 exp_consumers.py 3s3 time "$OUT/ab_3s3.json" 2>&1 | grep -E "^\{|Error" | cut -c1-220
    export CASES=window16k,causal16k,full16k,full4k HD=128
    for r in 1 2; do for v in 2 3; do
      t 60 python3 exp_consumers.py $v time "$OUT/ab_h128_${v}_$r.json" 2>&1 | grep -E "^\{|Error" | cut -c1-220
    done; done
    ;;
esac
