#!/usr/bin/env bash
# Build the kit that carries montessori's GPU runs to a machine without PyPI or the Hub, in calls of at
# most 64 MiB each (the device tool's limit): .whl/ (py3.12 wheels the GPU image lacks), .gpu/ (env.sh,
# sourced first in every call, and the public data), .carry/m.00..m.05 (SmolLM2's and Gemma's GGUF as
# one stream). Call 1 carries .whl .gpu .carry/m.00; call K carries .gpu .carry/m.0K; env.sh cuts the
# two files out once their bytes are there and checks their sha256. Run from the checkout's root.
set -euo pipefail
S=$(python -c 'from montessori.models.load import smollm2_gguf_path as p; print(p())')
G=$(python -c 'from montessori.models.load import NAMED_MODELS, assemble_gguf; print(assemble_gguf(NAMED_MODELS["gemma3-270m"]))')
mkdir -p .whl .gpu/data .carry
# transformers 5.18: the image's 5.17 converts Gemma-3's GGUF tokenizer into characters (docs/benchmarks.md).
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
  -d .whl pydantic==2.13.4 pydantic_core==2.46.4 annotated-types typing-inspection trl==1.16.0 datasets==5.2.0 \
  gguf==0.19.0 dill multiprocess xxhash starlette uvicorn transformers==5.18.0
cp bench/carry/env.sh .gpu/env.sh
cp ../shared/data/*.jsonl .gpu/data/
rm -f .carry/m.*
cat "$S" "$G" > .carry/stream
head -c $((40 * 1048576)) .carry/stream > .carry/m.00  # the first call also carries the wheels
tail -c +$((40 * 1048576 + 1)) .carry/stream | split -b $((59 * 1048576 + 65536)) -d -a 2 --numeric-suffixes=1 - .carry/m.
rm .carry/stream
du -b .whl .gpu .carry/m.* | cat
