#!/usr/bin/env bash
# A long GPU job that outlives device calls and sessions. On the GPU machine, after the two staging calls
# of bench/stage_smollm2.sh:
#   bash bench/gpu_job.sh start JOB   unpack bench/runs/JOB_state.tgz into .gpu_state/ (unless there), start
#                                     JOB in the background (setsid), log to /tmp/JOB.log
#   bash bench/gpu_job.sh wait JOB S  wait up to S seconds or until the job ends, then show its log's end
#   bash bench/gpu_job.sh pack JOB    write .gpu_state to $OUT/JOB_state.tgz
# Here, copy the returned tgz to bench/runs/ and commit it: the next call (or session) resumes from it.
# Jobs: p4 = CausalEdit, smollm2 preset, 5 MQuAKE-hard cases (issue P4); results = scripts/results.py
# (P7: 5 methods x 20 cases, two judges, RESULTS.md into .gpu_state/). Both share the bootstrap cache.
set -u
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
case "$1" in
  start)
    [ -d .gpu_state ] || { [ -f "bench/runs/$2_state.tgz" ] && tar xzf "bench/runs/$2_state.tgz"; }
    mkdir -p .gpu_state
    case "$2" in
      p4) cmd=(python3 -m code_edit --editing_method CausalEdit --datatype MQuAKE-hard
               --model_type smollm2-135m-instruct --max_cases 5 --run_id h200 --output_root .gpu_state/out
               --cache_dir .gpu_state/cache);;
      results) cmd=(python3 scripts/results.py --output_root .gpu_state/results --cache_dir .gpu_state/cache
                    --results .gpu_state/RESULTS.md);;
      *) echo "unknown job $2"; exit 2;;
    esac
    setsid nohup "${cmd[@]}" >> "/tmp/$2.log" 2>&1 < /dev/null &
    echo "started $2 ($!)";;
  wait)
    end=$((SECONDS + $3))
    while [ $SECONDS -lt $end ] && pgrep -f 'code_edi[t] --editing_method|scripts/result[s].py' >/dev/null; do sleep 5; done
    tr '\r' '\n' < "/tmp/$2.log" | grep -v '^\s*$' | grep -v -i 'warn\|online softmax\|split the reduction\|important use case' | tail -15;;
  pack) tar czf "$OUT/$2_state.tgz" .gpu_state && ls -la "$OUT";;
  *) echo "usage: gpu_job.sh start|pack JOB | wait JOB SECONDS"; exit 2;;
esac
