#!/usr/bin/env bash
# Verification and benchmark runs on a GPU machine, in parts that each fit a 10-minute call:
#   tests | export | parity | bench-static | bench-compile | bench-dynamic | generate | trt | serve | profile | admission | reference | aiperf | hbm
#   | export-large | bench-large | fused   (serve and fused end with scripts/check_targets.py: the issue targets met or missed)
# Run them back to back on one warm machine: later parts reuse the graphs `export` writes to $WORK.
# Each part packs what it produced into $OUT/<part>.tgz (the device tool returns at most 8 files).
# Needs the GPU wheels staged first (../shared/gpu/gpu-wheels; see docs/gpu-verification.md).
# Results record the commit they ran (runtime/provenance.py). The GPU machine gets a copy of the
# working tree whose .git may hold an older commit, so make an archive of the commit to run first,
#     git archive -o .whl/src.tar HEAD        (on the development machine; carry .whl)
# and this script re-runs itself from that archive with ROTARY_DEPLOY_COMMIT set from it.
set -uo pipefail
part=${1:?usage: scripts/accelerator.sh tests|export|parity|bench-static|bench-compile|bench-dynamic|generate|trt|serve|profile|admission|reference|aiperf|hbm|export-large|bench-large|fused}
if [ -f .whl/src.tar ] && [ -z "${ROTARY_FROM_ARCHIVE:-}" ]; then
  commit=$(git get-tar-commit-id < .whl/src.tar) || { echo "accelerator.sh: .whl/src.tar is not a git archive"; exit 2; }
  src=/tmp/rotary-src/$commit
  [ -d "$src" ] || { mkdir -p "$src" && tar xf .whl/src.tar -C "$src"; }
  cd "$src" && ROTARY_FROM_ARCHIVE=1 ROTARY_DEPLOY_COMMIT=$commit ROTARY_DEPLOY_DIRTY=0 exec bash scripts/accelerator.sh "$@"
fi
[ -n "${ROTARY_DEPLOY_COMMIT:-}" ] || echo "accelerator.sh: note: no .whl/src.tar, so results name the copy's .git commit (dirty)"
out=${OUT:-build/accelerator}
work=${WORK:-/tmp/rotary-work}
results="$work/results-$part"
mkdir -p "$out" "$work" "$results"
[ -f /tmp/gpu/env.sh ] && source /tmp/gpu/env.sh
# The serve wheels (GPU_EXTRA_WHEELS, see docs/gpu-verification.md) bring numpy 1.26 for Triton's python backend:
# keep it out of everything else's path, in its own folder that only `serve` puts first.
np1=/tmp/gpu/numpy1
if ls -d /tmp/gpu/site/numpy-1.* > /dev/null 2>&1; then
  mkdir -p "$np1" && mv /tmp/gpu/site/numpy /tmp/gpu/site/numpy-1.* /tmp/gpu/site/numpy.libs "$np1"/ 2>/dev/null
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py() { python3 "$@"; }
run() { echo "+ $*"; local t0=$SECONDS; "$@"; local rc=$?; echo "  (exit $rc, $((SECONDS - t0)) s)"; return 0; }
small="$work/small-fp16-past.onnx"; static="$work/small-fp16-static.onnx"; portable="$work/small-fp16-portable.onnx"
bench() {  # name, then benchmark arguments
  local name=$1; shift
  run py -m runtime.commands.benchmark "$small" --context 1024 --new-tokens 32 --warmup 3 --iters 10 \
    --json "$results/bench-$name.json" "$@" 2>&1 | grep -v "^  " | tail -14
}

case "$part" in
tests)
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv | tee "$results/gpu.txt"
  py -c "import torch, onnx, onnxruntime as o; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| onnx', onnx.__version__, '| onnxruntime', o.__version__, o.get_available_providers())" | tee -a "$results/gpu.txt"
  py -c "import tensorrt_rtx as t; print('tensorrt_rtx', t.__version__)" 2>&1 | tee -a "$results/gpu.txt"
  run py -m pytest -m gpu -v -rs -s -p no:cacheprovider tests/gpu 2>&1 | tee "$results/pytest-gpu.txt" | grep -E "PASS|FAIL|SKIP|ERROR|passed|failed|parity|portable static" | tail -40
  ;;
export)
  [ -f "$small" ] || run py -m runtime.commands.export_model --preset small --with-past --dtype fp16 --no-verify --output "$small" > "$results/export-past.log" 2>&1
  [ -f "$static" ] || run py -m runtime.commands.export_model --preset small --static-cache 2048 --dtype fp16 --no-verify --output "$static" > "$results/export-static.log" 2>&1
  [ -f "$portable" ] || run py -m runtime.commands.export_model --preset small --static-cache 2048 --portable --dtype fp16 --no-verify --output "$portable" > "$results/export-portable.log" 2>&1
  ls -la "$work"
  ;;
parity)
  for graph in ${GRAPHS:-past static portable}; do
    model="$work/small-fp16-$graph.onnx"
    run py -m runtime.commands.check_parity "$model" --backend onnxruntime-cuda --generate 64 --batch 1,3 \
      --seq 1,17,128,513 --json "$results/parity-small-fp16-$graph.json" > "$results/parity-$graph.log" 2>&1
    tail -2 "$results/parity-$graph.log"
  done
  ;;
bench-static)  # the static decoders side by side, batch 1, 8, 32
  bench static --backend ${BACKENDS:-onnxruntime-cuda-static,onnxruntime-cuda-static-portable,onnxruntime-cuda,torch} --batch 1,8,32
  ;;
bench-compile)  # the gpt-fast recipe (compiles once per batch size)
  bench compile-static --backend torch-compile-static --batch ${BATCHES:-1,8,32}
  ;;
bench-dynamic)  # torch.compile with dynamic shapes, as the earlier baseline
  bench compile-dynamic --backend torch-compile --batch 1 --new-tokens 16 --iters 3
  ;;
generate)
  ids=$(py -c "import random; random.seed(0); print(','.join(str(random.randrange(32000)) for _ in range(1024)))")
  for model in "$static" "$portable"; do
    name=$(basename "$model" .onnx)
    for attempt in 1 2; do
      run py -m runtime.commands.generate --model "$model" --backend onnxruntime-cuda --prompt-ids "$ids" \
        --max-new-tokens 64 --json "$results/generate-$name-$attempt.json" > "$results/generate-$name-$attempt.log" 2>&1
      tail -1 "$results/generate-$name-$attempt.log"
    done
  done
  run py scripts/profile_decode.py "$static" --backend onnxruntime-cuda --context 1024 --json "$results/profile-static.json" 2>&1 | tail -2
  run py scripts/profile_decode.py "$portable" --backend onnxruntime-cuda --context 1024 --json "$results/profile-portable.json" 2>&1 | tail -2
  ;;
trt)
  run py -m runtime.commands.build_engine "$portable" --output "$work/small-fp16-portable.engine" --batch 1:1:32 \
    --seq 1:1:1024 --no-cache --json "$results/build-portable.json" 2>&1 | tail -3
  run py -m runtime.commands.build_engine "$small" --output "$work/small-fp16-past.engine" --batch 1:1:8 \
    --seq 1:128:1024 --past 0:128:1024 --no-cache --json "$results/build-past.json" 2>&1 | tail -3
  ;;
hbm)  # the bandwidth a batch-1 step can reach at best: a copy, each 7b GEMV, their chain in one CUDA graph (cuBLAS, and the candidate Triton GEMV)
  run py scripts/hbm_bandwidth.py --preset ${PRESET:-7b} --triton --json "$results/hbm-bandwidth.json"
  ;;
profile)  # a served step's time split without Triton: decoder alone, engine, driver with timed sends
  run py scripts/profile_engine.py --batches 1,8,32 --steps 300 --serve-seconds 2 --senders ${SENDERS:-1,4} \
    --json "$results/profile-engine.json" 2>&1 | grep -E "^batch|^prefill|^engine churn|^served|error"
  ;;
admission)  # what one admission adds to a step of 31 decoding rows, in line and beside the step
  run py scripts/profile_admission.py --widths ${WIDTHS:-1,16,128} --json "$results/admission-inline.json" 2>&1 | grep -vE "^$|plugin EP"
  run py scripts/profile_admission.py --widths ${WIDTHS:-1,16,128} --beside --json "$results/admission-beside.json" 2>&1 | grep -vE "^$|plugin EP"
  run py scripts/profile_admission.py --widths ${WIDTHS:-1,16,128} --beside --nucleus --trace-steps 0 \
    --json "$results/admission-beside-nucleus.json" 2>&1 | grep -vE "^$|plugin EP"
  ;;
reference)  # the decoder alone at the lengths a served batch holds: the served step ratio's reference (run beside `serve`)
  run py scripts/decoder_at_served_contexts.py --json "$results/decoder-served-contexts.json" 2>&1 | grep -vE "^$|plugin EP"
  ;;
serve)  # `small` fp16 served (static-cache graph, CUDA graphs), then loaded at 1, 8, 32 and 64 clients (GPUS: --gpus)
  rm -f "$results/serve-ready${TAG:-}.json"  # python3 itself in the background, so $! is serve and SIGTERM reaches it
  PYTHONPATH="$np1:$PYTHONPATH" python3 -m runtime.commands.serve --preset small --dtype fp16 --device ${DEVICE:-cuda} --max-rows ${ROWS:-32} --generate-instances ${INSTANCES:-1} ${GPUS:+--gpus $GPUS} \
    --max-prompt-tokens 512 --max-new-tokens-limit 512 --queue 256 --json "$results/serve-ready${TAG:-}.json" \
    --log "$results/tritonserver${TAG:-}.log" --port ${PORT:-8000} --grpc-port $((${PORT:-8000} + 1)) \
    --metrics-port $((${PORT:-8000} + 2)) > "$results/serve${TAG:-}.log" 2>&1 &
  server=$!
  for _ in $(seq 300); do [ -f "$results/serve-ready${TAG:-}.json" ] || ! kill -0 $server 2>/dev/null && break; sleep 1; done
  cat "$results/serve${TAG:-}.log"; grep -a "generate:" "$results/tritonserver${TAG:-}.log" | cut -c1-400
  if [ -f "$results/serve-ready${TAG:-}.json" ]; then
    for protocol in ${PROTOCOLS:-grpc openai}; do  # one server, the same seeded requests through each protocol
      name=loadtest${TAG:-}$([ "$protocol" = grpc ] || echo "-$protocol")
      run py -m runtime.commands.loadtest --url http://127.0.0.1:${PORT:-8000} --protocol "$protocol" \
        --concurrency ${LEVELS:-1,8,32,64} --requests-per-client ${PER_CLIENT:-16} --workers ${WORKERS:-8} \
        --max-prompt-tokens 128 --max-new-tokens 256 --json "$results/$name.json" --plot "$results/$name.png" 2>&1 | tail -8
    done
  else
    tail -30 "$results/tritonserver${TAG:-}.log"
  fi
  client=
  if [ -n "${CUT:-}" ] && [ -f "$results/serve-ready${TAG:-}.json" ]; then  # SIGTERM while CUT clients stream
    python3 -m runtime.commands.loadtest --url http://127.0.0.1:${PORT:-8000} --concurrency $CUT --requests-per-client 20 \
      --workers 8 --max-prompt-tokens 128 --max-new-tokens 512 --timeout 60 --json "$results/loadtest-cut${TAG:-}.json" \
      > "$results/loadtest-cut${TAG:-}.log" 2>&1 &
    client=$!  # python3 itself, so that kill reaches it
    # CUT_AFTER counts from when half the clients stream (the server's active rows), not from the start
    python3 -c "
import time, urllib.request
for _ in range(600):
    text = urllib.request.urlopen('http://127.0.0.1:$((${PORT:-8000} + 2))/metrics', timeout=5).read().decode()
    rows = sum(float(l.rsplit(' ', 1)[-1]) for l in text.splitlines() if l.startswith('rotary_generate_active_rows{'))
    if rows >= $CUT / 2:
        print('cut: active rows', rows); break
    time.sleep(0.1)
else:
    print('cut: the clients never reached', $CUT / 2, 'active rows')"
    sleep ${CUT_AFTER:-2}
  fi
  t0=$(date +%s.%N); kill -TERM $server 2>/dev/null; wait $server; rc=$?
  echo "serve exit $rc, $(python3 -c "print(round($(date +%s.%N) - $t0, 1))") s after SIGTERM" | tee -a "$results/serve${TAG:-}.log"
  tail -3 "$results/serve${TAG:-}.log"
  if [ -n "$client" ]; then
    timeout 90 tail --pid=$client -f /dev/null; kill $client 2>/dev/null
    py -c "import json; l = json.load(open('$results/loadtest-cut${TAG:-}.json'))['levels'][0]; \
print('cut:', l['requests'], 'requests,', l['tokens'], 'tokens,', l['errors'], 'errors:', l['error_messages'])" 2>/dev/null \
      || tail -5 "$results/loadtest-cut${TAG:-}.log"
  fi
  reference="$work/results-reference/decoder-served-contexts.json"  # issue 20's targets, once `reference` has run
  [ -f "$reference" ] && [ -f "$results/loadtest${TAG:-}.json" ] \
    && run py scripts/check_targets.py serve "$results/loadtest${TAG:-}.json" "$reference"
  ;;
aiperf)  # aiperf at 32 concurrency against serve's OpenAI API (staged by scripts/stage_aiperf.sh), then loadtest
  rm -f "$results/serve-ready.json"
  PYTHONPATH="$np1:$PYTHONPATH" python3 -m runtime.commands.serve --preset small --dtype fp16 --device cuda --max-rows 32 \
    --max-prompt-tokens 512 --max-new-tokens-limit 512 --queue 256 --json "$results/serve-ready.json" \
    --log "$results/tritonserver.log" > "$results/serve.log" 2>&1 &
  server=$!
  for _ in $(seq 300); do [ -f "$results/serve-ready.json" ] || ! kill -0 $server 2>/dev/null && break; sleep 1; done
  if [ -f "$results/serve-ready.json" ]; then
    run env PYTHONPATH=/tmp/aiperf/site python3 -m aiperf profile --model rotary --url http://127.0.0.1:8003 \
      --endpoint-type completions --streaming --concurrency ${CONCURRENCY:-32} --request-count ${REQUESTS:-512} \
      --tokenizer models/byte_tokenizer --use-server-token-count --isl 64 --osl 128 --random-seed 0 --ui-type none \
      --output-artifact-dir "$results/aiperf" > "$results/aiperf.log" 2>&1
    grep -E "Time to First Token|Inter Token Latency|Output Token Throughput \(tokens/sec\)|Request Error Rate" "$results/aiperf.log"
    run py -m runtime.commands.loadtest --url http://127.0.0.1:8000 --protocol openai --concurrency ${CONCURRENCY:-32} \
      --requests ${REQUESTS:-512} --workers 8 --max-prompt-tokens 64 --max-new-tokens 128 --json "$results/loadtest-openai.json" 2>&1 | tail -2
  else
    tail -30 "$results/serve.log"
  fi
  kill -TERM $server 2>/dev/null; wait $server; echo "serve exit $?"
  ;;
export-large)  # ~1B and 7B fp16 static-cache graphs written from the seed (start it in the background: setsid)
  for preset in ${PRESETS:-1b 7b}; do touch "$work/exporting-$preset"; done  # bench-large waits on these
  for preset in ${PRESETS:-1b 7b}; do
    graph="$work/$preset-fp16-static.onnx"
    [ -f "$graph" ] || run py -m runtime.commands.export_model --preset "$preset" --static-cache 1088 --dtype fp16 \
      --no-verify --output "$graph" --json "$results/export-$preset.json" > "$results/export-$preset.log" 2>&1
    rm -f "$work/exporting-$preset"; tail -2 "$results/export-$preset.log"
  done
  ;;
bench-large)  # those graphs (exported first if missing) against the gpt-fast recipe on the same weights, context 1024
  for preset in ${PRESETS:-1b 7b}; do
    graph="$work/$preset-fp16-static.onnx"
    while [ -f "$work/exporting-$preset" ]; do sleep 2; done  # an export-large started in the background
    [ -f "$graph" ] || PRESETS=$preset bash "$0" export-large
    run timeout ${LIMIT:-540} python3 -m runtime.commands.benchmark "$graph" --backend ${BACKENDS:-onnxruntime-cuda-static,torch-compile-static} \
      --batch ${BATCHES:-1,32} --context 1024 --new-tokens 32 --warmup 3 --iters 5 --json "$results/bench-$preset${TAG:-}.json" \
      2>&1 | tee "$results/bench-$preset${TAG:-}.log" | grep -v "^  " | tail -12
  done
  ;;
fused)  # triton-fused (needs only PyTorch and Triton): its GPU tests, its step's profile (PROFILE_ARGS: e.g. --sweep;
  # PROFILE_LINES: how many lines of its output to show), and at 7b batch 1 against the gpt-fast recipe on the same
  # fp16 weights in one run (BACKENDS: e.g. triton-fused alone; BENCH_FLAGS: e.g. --no-overlap for the engine's plain loop; TAG: a suffix for its file)
  run py -m pytest -m gpu -q -s -p no:cacheprovider tests/gpu/test_gpu.py -k "fused_batch1 or gemv" 2>&1 \
    | tee "$results/pytest-fused.txt" | grep -E "parity|passed|failed"
  run py scripts/profile_fused.py --preset ${PRESET:-7b} ${PROFILE_ARGS:-} --json "$results/profile-fused.json" 2>&1 \
    | grep -v -i warn | tail -${PROFILE_LINES:-12}
  run timeout ${LIMIT:-400} python3 -m runtime.commands.benchmark --preset ${PRESET:-7b} --dtype fp16 \
    --backend ${BACKENDS:-triton-fused,torch-compile-static} --batch 1 --context 1024 --new-tokens 32 --warmup 3 --iters 5 \
    ${BENCH_FLAGS:-} --json "$results/bench-fused-${PRESET:-7b}${TAG:-}.json" 2>&1 | tee "$results/bench-fused.log" | grep -v "^  " | tail -6
  [ "${PRESET:-7b}" = 7b ] && [ -z "${BACKENDS:-}" ] \
    && run py scripts/check_targets.py fused "$results/bench-fused-7b${TAG:-}.json"  # issue 24's target (needs both backends)
  ;;
esac
tar czf "$out/$part.tgz" -C "$results" . 2>/dev/null
