#!/usr/bin/env bash
# Long GPU jobs that outlive device calls and sessions. On the GPU machine, after the two staging calls
# of bench/stage_smollm2.sh (the first unpacks an earlier session's compile cache, if staged):
#   bash bench/gpu_job.sh start JOB   unpack bench/runs/gpu_state.tgz into .gpu_state/ (unless there), start
#                                     JOB in the background (setsid), log to /tmp/gpu_job.log
#   bash bench/gpu_job.sh wait S      wait up to S seconds or until the job ends, then show the log's end
#   bash bench/gpu_job.sh pack        write .gpu_state to $OUT/gpu_state.tgz, torch.compile's cache to
#                                     $OUT/inductor.tgz
# Here, copy the returned gpu_state.tgz over bench/runs/gpu_state.tgz and commit it: the next start resumes
# from it. Keep inductor.tgz (or its parts, joined with cat) as .gpu_cache/inductor.tgz (git-ignored, not
# committed: binaries for one torch/GPU pair): the next session's staging carries it, and a fresh process's
# first case then pays ~105 s of compiling instead of ~254 s (BENCHMARKS "The P7 results run").
# JOB: p4 = CausalEdit, smollm2 preset, 5 MQuAKE-hard cases (issue P4); results = scripts/results.py
# --runs-only (P7: 5 methods x 20 cases; the judges and RESULTS.md then run on the CPU machine, from the
# unpacked state: `python scripts/results.py --judge-only --output_root .gpu_state/results --cache_dir
# .gpu_state/cache`, which never edits there, so GPU time goes to edits only); all = p4, then results;
# e2 = issue E2's study runs in parallel, one process per ARM:SKIP:CASES range (bench/e2_study.py; E2_ARMS,
# E2_STAGGER), beside the teacher answers of the first E2_TEACHER_CASES cases (E2_TEACHERS).
# Every job resumes where its run folders stop; all share one bootstrap cache.
set -u
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_cache
P4=(python3 -m code_edit --editing_method CausalEdit --datatype MQuAKE-hard --model_type smollm2-135m-instruct
    --max_cases 5 --run_id h200 --output_root .gpu_state/out --cache_dir .gpu_state/cache)
RESULTS=(python3 scripts/results.py --runs-only --output_root .gpu_state/results --cache_dir .gpu_state/cache)
# what the study has not run yet (docs/e2_study.md): the answer line alone on dev cases 4-6, sft-lr on 8-10.
# A range must not overlap one already run: the report refuses a case held by two folders.
E2_ARMS=${E2_ARMS:-answer-line:3:3,sft-lr:7:3}
E2_STAGGER=${E2_STAGGER:-20}
E2_TEACHER_CASES=${E2_TEACHER_CASES:-20}
E2_TEACHERS=${E2_TEACHERS:-system_sheet:own:answer-line,system_sheet:own}
case "$1" in
  start)
    [ -d .gpu_state ] || { [ -f bench/runs/gpu_state.tgz ] && tar xzf bench/runs/gpu_state.tgz; }
    mkdir -p .gpu_state
    case "$2" in
      p4) setsid nohup "${P4[@]}" >> /tmp/gpu_job.log 2>&1 < /dev/null &;;
      results) setsid nohup "${RESULTS[@]}" >> /tmp/gpu_job.log 2>&1 < /dev/null &;;
      all) setsid nohup bash -c "$(printf '%q ' "${P4[@]}") && $(printf '%q ' "${RESULTS[@]}")" \
             >> /tmp/gpu_job.log 2>&1 < /dev/null &;;
      e2) setsid nohup bash -c "python3 bench/e2_study.py teacher --cases $E2_TEACHER_CASES --combos $E2_TEACHERS & \
             python3 bench/e2_study.py run --arms $E2_ARMS --stagger $E2_STAGGER; wait" \
             >> /tmp/gpu_job.log 2>&1 < /dev/null &;;
      *) echo "unknown job $2"; exit 2;;
    esac
    echo "started $2 ($!)";;
  wait)
    end=$((SECONDS + $2))
    while [ $SECONDS -lt $end ] && pgrep -f 'code_edi[t] --editing_method|scripts/result[s].py|e2_stud[y].py' >/dev/null; do sleep 5; done
    tr '\r' '\n' < /tmp/gpu_job.log | grep -v '^\s*$' | grep -v -i 'warn\|online softmax\|split the reduction\|important use case' | tail -15
    for f in /tmp/e2_*.log; do [ -f "$f" ] && echo "== $f" && tr '\r' '\n' < "$f" | grep -v '^\s*$' | grep -v -i 'warn' | tail -3; done; true;;
  pack) tar czf "$OUT/gpu_state.tgz" .gpu_state
        [ -d /tmp/inductor_cache ] && { tar czf "$OUT/inductor.tgz" -C /tmp/inductor_cache . 2>/dev/null || true; }
        # a returned file may hold 16 MiB: a larger cache comes back in parts (cat inductor.tgz.part-* here)
        if [ -f "$OUT/inductor.tgz" ] && [ "$(stat -c %s "$OUT/inductor.tgz")" -gt 16000000 ]; then
          split -b 15000000 "$OUT/inductor.tgz" "$OUT/inductor.tgz.part-" && rm "$OUT/inductor.tgz"; fi
        ls -la "$OUT";;
  *) echo "usage: gpu_job.sh start JOB | wait SECONDS | pack"; exit 2;;
esac
