#!/usr/bin/env bash
# One call on the lent GPU (the device tool), from the repository root, logs under $OUT:
#   bash bench/lent_gpu.sh tests [pytest args]  the GPU test suite (every test marked gpu), then with
#                                              TUNE_SHORT=1 the head_dim 128 short-key forward tiles
#   bash bench/lent_gpu.sh parallel "FILES" ... groups of GPU test files, one pytest process each, at once
#   bash bench/lent_gpu.sh bench [STEP...]     FlashAttention-4 installed from .whl-fa4 (see
#                                              ../shared/tools/fa4-wheels.sh; part_aa copied to
#                                              /root/fa4 by an earlier call), then the steps named
#                                              (default: varlen kvcache variants host): bench/varlen.py,
#                                              bench/kvcache.py, bench/variants.py, bench/host_path.py;
#                                              generate: examples/generate.py; user-terms:
#                                              bench/user_terms.py (masks, block masks, bias: issue 19); decode: the KV-cache
#                                              GPU tests (TMA loads included) and bench/kvcache.py with
#                                              the cp.async and TMA decode tiles (decode-bench: the
#                                              latter alone); tune: `cupyflash tune
#                                              --budget 120` into $OUT/tune, then a second process's
#                                              `cupyflash info` and the forward/backward GPU tests
#                                              with that table (issue 21); bwd-order: bench/variants.py
#                                              --only gqa from a copy whose backward walks key tiles
#                                              heaviest first, then from the tree (issue 14's A/B)
# Each step's table is printed last; a failing step does not stop the others (exit status: the
# first failure).
set -uo pipefail
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
status=0
step() {  # step NAME CMD...: run, log to $OUT/NAME.log, keep the first failure
    echo "=== $1"
    local name=$1; shift
    "$@" 2>&1 | tee "$OUT/$name.log" | tail -n 40
    local rc=${PIPESTATUS[0]}
    [ "$rc" -ne 0 ] && [ "$status" -eq 0 ] && status=$rc
    echo "=== $name: exit $rc"
}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader
case "${1:-}" in
tests)
    shift
    [ -f .whl-fa4/part_aa ] && mkdir -p /root/fa4 && cp .whl-fa4/part_aa /root/fa4/
    step gpu-tests python -m pytest -q -m gpu -p no:cacheprovider -rfEs --maxfail=30 "$@"
    [ -n "${TUNE_SHORT:-}" ] && step tune-short-d128 python bench/tune.py --short --fwd-only --seqlens 128,256 \
        --head-dims 128 --json "$OUT/tune-short-d128.json"
    ;;
parallel)
    # bash bench/lent_gpu.sh parallel "FILES..." "FILES..." ...: each group of GPU test files (and
    # pytest options, shell-quoted within the group: "tests/x.py -k 'a or b'") in its own
    # pytest process, all at once (NVRTC compiles on one core per process: with new kernels, compiling
    # dominates); each group's log is $OUT/gpu-tests-N.log; a group still running at PARALLEL_LIMIT
    # seconds (default 520) is stopped
    shift
    n=0
    for group in "$@"; do
        n=$((n + 1))
        ( eval timeout "${PARALLEL_LIMIT:-520}" python -m pytest -q -m gpu -p no:cacheprovider -rfEs "$group" \
            > "$OUT/gpu-tests-$n.log" 2>&1; echo "group $n ($group): exit $?" >> "$OUT/gpu-tests-summary.log" ) &
    done
    wait
    for i in $(seq 1 $n); do echo "=== group $i"; tail -n 6 "$OUT/gpu-tests-$i.log"; done
    cat "$OUT/gpu-tests-summary.log"
    grep -q "exit [^0]" "$OUT/gpu-tests-summary.log" && status=1
    ;;
bench)
    if [ -f /root/fa4/part_aa ] && [ -f .whl-fa4/part_ab ]; then
        bash .whl-fa4/fa4-wheels.sh install && export PYTHONPATH=$PYTHONPATH:/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages
    else
        echo "FA4 not installed: /root/fa4/part_aa is missing (the machine was handed back since the tests call)"
    fi
    shift
    for s in ${@:-varlen kvcache variants host}; do
        case $s in
        varlen) step varlen python bench/varlen.py --out-dir "$OUT" ;;
        kvcache) step kvcache python bench/kvcache.py --out-dir "$OUT" ;;
        variants) step variants python bench/variants.py --out-dir "$OUT" ;;
        host) step host-path python bench/host_path.py --json "$OUT/host-path.json" ;;
        generate) step generate python examples/generate.py ;;
        user-terms) step user-terms python bench/user_terms.py --out-dir "$OUT" ;;
        decode)
            step decode-tests python -m pytest -q -m gpu -p no:cacheprovider -rfEs tests/test_gpu_kvcache.py
            step decode-bench python bench/kvcache.py --out-dir "$OUT" --tiles 4x3t,4x4t,8x2t,8x3t ;;
        bwd-order)  # the backward's key tiles heaviest first (n_block = blockIdx.x) against the tree's order, GQA rows
            rm -rf /tmp/bwd-order && mkdir -p /tmp/bwd-order/out && cp -r . /tmp/bwd-order/tree
            sed -i 's/const int n_block = gridDim.x - 1 - blockIdx.x;/const int n_block = blockIdx.x;/' \
                /tmp/bwd-order/tree/kernels_cu/flash_bwd_sm90.cu /tmp/bwd-order/tree/kernels_cu/flash_bwd.cu
            step bwd-order-heaviest-first bash -c 'cd /tmp/bwd-order/tree && PYTHONPATH=. python bench/variants.py --only gqa --out-dir /tmp/bwd-order/out'
            step bwd-order-tree python bench/variants.py --only gqa --out-dir "$OUT" ;;
        decode-bench) step decode-bench python bench/kvcache.py --out-dir "$OUT" --tiles 4x3t,4x4t,8x2t,8x3t ;;
        tune)
            export CUPYFLASH_TUNE_DIR=$OUT/tune
            step tune bash -c 'start=$(date +%s); python -m cupyflash tune --budget 120; echo "tune took $(( $(date +%s) - start )) s"'
            step tune-info python -m cupyflash info
            step tune-tests python -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_kernels.py -k "forward or backward"
            unset CUPYFLASH_TUNE_DIR ;;
        *) echo "unknown bench step $s" ;;
        esac
    done ;;
*) echo "usage: bench/lent_gpu.sh tests|parallel|bench"; exit 2 ;;
esac
exit $status
