#!/usr/bin/env bash
# Nsight Compute on the Hopper forward of bench/user_terms.py's rows (issue 19): one kernel launch
# each (after two), with the sections that say where a tile's time goes (throughputs, warp stalls,
# issue slots). From the repository root on the lent GPU:
#   bash bench/ncu_user_terms.sh [ROW...]   (default: dense document-mask+block_mask)
# Clocks are left alone (--clock-control none, as the device notes ask). The raw pages: $OUT/ncu-ROW.txt
# ('+' in a row's name becomes '_').
set -uo pipefail
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
for row in ${@:-dense document-mask+block_mask}; do
    echo "=== $row"
    ncu --clock-control none --kernel-name regex:flash_fwd_sm90 --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section LaunchStats --page raw \
        python bench/user_terms.py --only "$row" --repeats 1 2>&1 | tee "${OUT:-/tmp}/ncu-${row//+/_}.txt" | \
        grep -E "gpu__time_duration.sum|sm__throughput.avg.pct|smsp__issue_active.avg.pct|smsp__inst_executed.sum |issue_stalled_.*_per_issue_active.ratio|launch__grid_size|pipe_tensor_cycles_active.avg|warps_active.avg.per_cycle" | \
        awk '$NF != 0'
done
