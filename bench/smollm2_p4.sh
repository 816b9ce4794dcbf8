#!/usr/bin/env bash
# On the GPU machine (after the two staging calls of bench/stage_smollm2.sh): the SFT step profile, then
# the P4 5-case CausalEdit run in the background (resumable), logging to /tmp/p4.log.
set -u
export PYTHONPATH=/tmp/site:$PWD
(cd bench && python3 profile_sft.py /tmp/profile_sft.json) 2>&1 | grep -v Warning | tail -5
setsid nohup python3 -m code_edit --editing_method CausalEdit --datatype MQuAKE-hard \
  --model_type smollm2-135m-instruct --max_cases 5 --run_id h100 --output_root /tmp/ce_h100 > /tmp/p4.log 2>&1 &
echo started $!
