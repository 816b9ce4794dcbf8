#!/usr/bin/env bash
# On the GPU machine, after the two staging calls of bench/stage_smollm2.sh: start the resumable P4 run
# (SmolLM2 CausalEdit, 5 MQuAKE-hard cases) in the background with its run folder and bootstrap cache
# under .gpu_state/ (git-ignored), logging to /tmp/p4.log. A machine lasts at most 30 minutes: before it
# goes, `bash bench/smollm2_p4.sh pack` writes .gpu_state to $OUT/gpu_state.tgz; unpack it here
# (tar xzf ... -C .) and name .gpu_state in `carry` on the next machine, and the run resumes there.
# `bash bench/smollm2_p4.sh wait S` waits up to S seconds (or until the run ends), then shows the log.
set -u
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
case "${1:-}" in
  pack) tar czf "$OUT/gpu_state.tgz" .gpu_state && ls -la "$OUT"; exit;;
  wait) end=$((SECONDS + $2))
        while [ $SECONDS -lt $end ] && pgrep -f 'code_edit --editing_method' >/dev/null; do sleep 5; done
        tr '\r' '\n' < /tmp/p4.log | grep -v '^\s*$' | tail -25; exit;;
esac
mkdir -p .gpu_state
setsid nohup python3 -m code_edit --editing_method CausalEdit --datatype MQuAKE-hard \
  --model_type smollm2-135m-instruct --max_cases 5 --run_id h200 --output_root .gpu_state/out \
  --cache_dir .gpu_state/cache >> /tmp/p4.log 2>&1 < /dev/null &
echo started $!
