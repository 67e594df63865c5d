#!/usr/bin/env bash
# Verification and benchmark runs on a GPU machine, in three parts that each fit a
# 10-minute call: tests | export | build | bench (PRESETS="tiny small" by default). Results go to ${OUT:-build/accelerator}.
# Needs the GPU wheels staged first (../shared/gpu/gpu-wheels; see README).
set -uo pipefail
part=${1:?usage: scripts/accelerator.sh tests|export|build|bench}
out=${OUT:-build/accelerator}
work=${WORK:-/tmp/rotary-work}
mkdir -p "$out" "$work"
[ -f /tmp/gpu/env.sh ] && source /tmp/gpu/env.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py() { python3 "$@"; }
run() { echo "+ $*"; local t0=$SECONDS; "$@"; local rc=$?; echo "  (exit $rc, $((SECONDS - t0)) s)"; return 0; }

case "$part" in
tests)
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv | tee "$out/gpu.txt"
  py -c "import torch, onnx, onnxruntime as o; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| onnx', onnx.__version__, '| onnxruntime', o.__version__, o.get_available_providers())" | tee -a "$out/gpu.txt"
  py -c "import tensorrt_rtx as t; print('tensorrt_rtx', t.__version__)" 2>&1 | tee -a "$out/gpu.txt"
  run py -m pytest -m gpu -v -rs -s -p no:cacheprovider tests/gpu 2>&1 | tee "$out/pytest-gpu.txt"
  ;;
export)
  for preset in tiny small; do
    for dtype in fp32 fp16; do
      run py -m runtime.commands.export_model --preset "$preset" --with-past --dtype "$dtype" --output "$work/$preset-$dtype-past.onnx" \
        --json "$out/export-$preset-$dtype.json" > "$work/export-$preset-$dtype.log" 2>&1
      tail -3 "$work/export-$preset-$dtype.log"
      run py -m runtime.commands.check_parity "$work/$preset-$dtype-past.onnx" --backend onnxruntime-cuda --generate 64 \
        --batch 1,3 --seq 1,17,128,513 --json "$out/parity-$preset-$dtype.json" > "$work/parity-$preset-$dtype.log" 2>&1
      tail -2 "$work/parity-$preset-$dtype.log"
    done
  done
  ;;
build)
  for preset in tiny small; do
    for dtype in fp32 fp16; do
      [ -f "$work/$preset-$dtype-past.onnx" ] || { echo "missing $work/$preset-$dtype-past.onnx: run the export part"; continue; }
      for attempt in build cached; do
        run py -m runtime.commands.build_engine "$work/$preset-$dtype-past.onnx" --output "$work/$preset-$dtype-past.engine" \
          --batch 1:1:8 --seq 1:128:1024 --past 0:128:1024 --timing-cache "$work/timing-$dtype.cache" \
          --json "$out/build-$preset-$dtype-$attempt.json" 2>&1 | tail -3
      done
    done
  done
  run py -m runtime.commands.check_parity "$work/tiny-fp32-past.engine" --backend tensorrt 2>&1 | tail -1
  ;;
bench)
  [ -f "$work/small-fp16-past.onnx" ] && run py scripts/profile_decode.py "$work/small-fp16-past.onnx" \
    --context 1024 --json "$out/profile-small-fp16.json" 2>&1 | grep -v "^W\|Warning" | tail -4
  for preset in ${PRESETS:-tiny small}; do
    onnx="$work/$preset-fp16-past.onnx"
    [ -f "$onnx" ] || py -m runtime.commands.export_model --preset "$preset" --with-past --dtype fp16 --no-verify --output "$onnx" > /dev/null
    static="$work/$preset-fp16-static.onnx"
    [ -f "$static" ] || py -m runtime.commands.export_model --preset "$preset" --static-cache 2048 --dtype fp16 --no-verify --output "$static" > /dev/null
    run py -m runtime.commands.benchmark "$onnx" --backend torch,torch-compile,onnxruntime-cuda,onnxruntime-cuda-static --batch 1,8 \
      --context 128,1024 --new-tokens 32 --warmup 3 --iters 10 --json "$out/bench-$preset-fp16.json" \
      --plot "$out/bench-$preset-fp16.png" 2>&1 | grep -v "^  " | tail -20
    for backend in torch onnxruntime-cuda static; do
      model="$onnx"; name="$backend"
      [ "$backend" = static ] && { model="$static"; backend=onnxruntime-cuda; }
      run py -m runtime.commands.generate --model "$model" --backend "$backend" --preset "$preset" --prompt "Hello" \
        --max-new-tokens 64 --json "$out/generate-$preset-$name.json" > /dev/null 2>&1
      py -c "import json; d=json.load(open('$out/generate-$preset-$name.json')); print('$preset $name', round(d['decode_tokens_per_second'],1), 'tokens/s')"
    done
  done
  ;;
esac
