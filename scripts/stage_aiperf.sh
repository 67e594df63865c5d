#!/usr/bin/env bash
# aiperf for the GPU machine, which reaches no package index: its 139 wheels (cp312, ~230 MB) travel
# in parts of 60 MiB, apart from the GPU wheels, because its pins (numpy 2.5, protobuf 7, ...)
# clash with the serve wheels: it is installed into a folder of its own that only aiperf reads.
#   On the development machine:  scripts/stage_aiperf.sh pack        -> .gpu/aiperf/p1 .. pN (ignored by git)
#   On the GPU machine, one run per part, carrying .gpu/aiperf/pK:    scripts/stage_aiperf.sh stage K N
#   The last one (K = N) installs into /tmp/aiperf/site; run aiperf as
#       PYTHONPATH=/tmp/aiperf/site python3 -m aiperf profile ...      (scripts/accelerator.sh aiperf does)
# Ran on the H200 on 2026-12-03: 4 parts, then aiperf 0.13.0 against serve's OpenAI API (docs/benchmarks.md).
set -euo pipefail
version=${AIPERF_VERSION:-0.13.0}
case "${1:?usage: stage_aiperf.sh pack | stage K N}" in
pack)
  cache=${AIPERF_WHEELS_CACHE:-$HOME/.cache/aiperf-wheels}
  mkdir -p "$cache"
  python3 -m pip download -q "aiperf==$version" --python-version 3.12 --implementation cp --only-binary=:all: \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64 -d "$cache"
  rm -rf .gpu/aiperf && mkdir -p .gpu/aiperf
  tar cf .gpu/aiperf/wheels.tar -C "$cache" .
  split -b 60m -d -a 2 .gpu/aiperf/wheels.tar .gpu/aiperf/part-
  rm .gpu/aiperf/wheels.tar
  count=$(ls .gpu/aiperf/part-* | wc -l)
  for i in $(seq 1 "$count"); do mkdir -p ".gpu/aiperf/p$i"; mv ".gpu/aiperf/part-$(printf %02d $((i - 1)))" ".gpu/aiperf/p$i/"; done
  echo "packed $count parts: run 'scripts/stage_aiperf.sh stage K $count' carrying .gpu/aiperf/pK, back to back"
  ;;
stage)
  k=${2:?part number}; n=${3:?number of parts}
  mkdir -p /tmp/aiperf/parts && cp .gpu/aiperf/p"$k"/part-* /tmp/aiperf/parts/
  echo "staged aiperf part $k of $n"
  if [ "$k" = "$n" ]; then
    mkdir -p /tmp/aiperf/wheels && cat /tmp/aiperf/parts/part-* | tar xf - -C /tmp/aiperf/wheels
    python3 -m pip install -q --no-index --find-links /tmp/aiperf/wheels --target /tmp/aiperf/site "aiperf==$version"
    PYTHONPATH=/tmp/aiperf/site python3 -m aiperf --version
  fi
  ;;
esac
