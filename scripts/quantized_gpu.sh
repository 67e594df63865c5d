#!/usr/bin/env bash
# Issue 14 on the GPU: the `small` preset with fp16 activations and fp16 / int8 / int4 (blocks of 32)
# weights. Parts, each bounded, results as JSON in ${OUT:-build/quantized}, graphs in ${WORK:-/tmp/rotary-q}:
#   export   portable graphs with past (TensorRT, onnxruntime-cuda) and static-cache graphs (MatMulNBits)
#   parity   check-parity on onnxruntime-cuda: against the float32 PyTorch model (--against float,
#            teacher-forced top-1 over --generate 64) and against the fake-quantized weights (tight)
#   bench    benchmark decode on onnxruntime-cuda-static, batch 1 and 32, context 1024
#   build    build-engine with TensorRT-RTX for the int8 and int4 portable graphs (builds; does not run on cc 9.0)
#   summary  one table (weight bytes, top-1 against float, decode ms/token, engine builds) -> summary.json
#   train    train PRESET on byte-level text (scripts/train_reference.py) into $CHECKPOINT, with held-out
#            prompts in $OUT/prompts.json; later parts then export and judge that checkpoint
# `all` runs export to summary in order (about 8 minutes on an H100). The reference is the float32 PyTorch
# model that check-parity rebuilds from the preset recorded in each graph, or $CHECKPOINT when set.
# Needs the GPU wheels staged (see docs/gpu-verification.md). PRESET, SCHEMES, BACKEND, BENCH_BACKEND, CHECKPOINT, GENERATE
# and TRAIN_ARGS change what runs (e.g. a CPU dry run: PRESET=tiny BACKEND=onnxruntime
# BENCH_BACKEND=onnxruntime-static). With prompts.json present, --generate uses those texts as prompts.
set -uo pipefail
part=${1:?usage: scripts/quantized_gpu.sh train|export|parity|bench|build|summary|all}
out=${OUT:-build/quantized}
work=${WORK:-/tmp/rotary-q}
mkdir -p "$out" "$work"
[ -f /tmp/gpu/env.sh ] && source /tmp/gpu/env.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PRESET=${PRESET:-small}
SCHEMES=${SCHEMES:-"fp16 int8 int4"}
BACKEND=${BACKEND:-onnxruntime-cuda}
BENCH_BACKEND=${BENCH_BACKEND:-onnxruntime-cuda-static}
CHECKPOINT=${CHECKPOINT:-}
GENERATE=${GENERATE:-64}
name=$PRESET${CHECKPOINT:+-trained}  # graph file names
weights() { if [ -n "$CHECKPOINT" ]; then echo "--checkpoint $CHECKPOINT"; else echo "--preset $PRESET"; fi; }
prompts=()  # --prompt TEXT pairs from prompts.json (train part), else check-parity's random prompts
if [ -f "$out/prompts.json" ] && [ -n "$CHECKPOINT" ]; then
  while IFS= read -r -d '' text; do prompts+=(--prompt "$text"); done < <(python3 -c \
    'import json, sys; [print(t, end="\0") for t in json.load(open(sys.argv[1]))]' "$out/prompts.json")
fi
quantize() { [ "$1" = fp16 ] || echo "--quantize $1"; }  # int4: the default --block-size 32
run() {  # run LIMIT_SECONDS LOG COMMAND ARGS...: a toolkit command, bounded and logged; never stops the script
  local limit=$1 log=$2 command=$3; shift 3
  echo "+ $command $*"; local t0=$SECONDS
  timeout "$limit" python3 -m "runtime.commands.$command" "$@" > "$log" 2>&1; local rc=$?
  echo "  (exit $rc, $((SECONDS - t0)) s; log $log)"; tail -2 "$log"; return 0
}

do_export() {
  for q in $SCHEMES; do
    run 150 "$work/export-$q.log" export_model $(weights) --with-past --dtype fp16 $(quantize "$q") \
      --no-verify --output "$work/$name-$q-past.onnx" --json "$out/export-$q-past.json"
    run 90 "$work/export-$q-static.log" export_model $(weights) --static-cache 1100 --dtype fp16 $(quantize "$q") \
      --no-verify --output "$work/$name-$q-static.onnx" --json "$out/export-$q-static.json"
  done
}

do_parity() {
  for q in $SCHEMES; do
    for kind in past static; do
      graph="$work/$name-$q-$kind.onnx"
      [ -f "$graph" ] || { echo "missing $graph: run the export part"; continue; }
      run 120 "$work/parity-$q-$kind-float.log" check_parity "$graph" $(weights) --backend "$BACKEND" --against float \
        --batch 1,3 --seq 1,17,128 --generate "$GENERATE" "${prompts[@]}" --json "$out/parity-$q-$kind-float.json"
      # against the same fake-quantized weights (tight); the CPU suite checks the static graphs' formula
      [ "$q" = fp16 ] || [ "$kind" = static ] || run 90 "$work/parity-$q-$kind-tight.log" check_parity "$graph" $(weights) \
        --backend "$BACKEND" --batch 1,3 --seq 1,17,128 --json "$out/parity-$q-$kind-tight.json"
    done
  done
}

do_bench() {
  for q in $SCHEMES; do
    graph="$work/$name-$q-static.onnx"  # its metadata names the weights and the quantization to write in memory
    [ -f "$graph" ] || { echo "missing $graph: run the export part"; continue; }
    run 150 "$work/bench-$q.log" benchmark "$graph" --backend "$BENCH_BACKEND" --batch 1,32 \
      --context 1024 --new-tokens 32 --warmup 3 --iters 3 --json "$out/bench-$q.json"
  done
}

do_build() {
  for q in int8 int4; do
    graph="$work/$name-$q-past.onnx"
    [ -f "$graph" ] || { echo "missing $graph: run the export part"; continue; }
    run 240 "$work/build-$q.log" build_engine "$graph" --flavor tensorrt-rtx --output "$work/$name-$q-past.engine" \
      --batch 1:1:8 --seq 1:128:1024 --past 0:128:1024 --timing-cache "$work/timing-rtx.cache" --no-cache \
      --json "$out/build-$q.json"
  done
}

do_summary() {
  python3 - "$out" "$work" "$name" <<'PY'
import json, os, sys
out, work, name = sys.argv[1:4]
def load(name):
    path = os.path.join(out, name)
    return json.load(open(path)) if os.path.exists(path) else None
rows = {}
for q in ("fp16", "int8", "int4"):
    row = {}
    for kind in ("past", "static"):
        export, parity = load(f"export-{q}-{kind}.json"), load(f"parity-{q}-{kind}-float.json")
        tight = load(f"parity-{q}-{kind}-tight.json")
        gen = (parity or {}).get("generation") or {}
        row[kind] = {"precision": export and export["precision"], "weight_bytes": export and export["weight_bytes"],
                     "vs_float_passed": parity and parity["passed"], "vs_float_top1": parity and parity["top1"],
                     "teacher_forced_top1": gen.get("teacher_forced_top1"), "needs": gen.get("min_top1"),
                     "first_divergence": gen.get("first_divergence"), "vs_fake_quantized_passed": tight and tight["passed"]}
    bench = load(f"bench-{q}.json")
    row["decode_ms_p50"] = {f"batch {r['batch']}": r.get("decode_p50_ms") for r in (bench or {}).get("results", [])}
    row["decode_floor_ms"] = {f"batch {r['batch']}": r.get("decode_floor_ms") for r in (bench or {}).get("results", [])}
    build = load(f"build-{q}.json")
    engine = os.path.join(work, f"{name}-{q}-past.engine")
    row["tensorrt_rtx_build"] = build and {"built": True, "seconds": build["build_seconds"],
                                           "engine_bytes": os.path.getsize(engine) if os.path.exists(engine) else None}
    rows[q] = row
from runtime.provenance import write_result
write_result(os.path.join(out, "summary.json"), rows, ["scripts/quantized_gpu.sh", "summary"],
             {"out": out, "work": work, "name": name})
for q, row in rows.items():
    p = row["past"]
    print(f"{q:5} weights {p['weight_bytes']} B (static {row['static']['weight_bytes']} B); "
          f"teacher-forced top-1 vs fp32 {p['teacher_forced_top1']} (needs {p['needs']}); "
          f"decode p50 ms {row['decode_ms_p50']}; TensorRT-RTX build {row['tensorrt_rtx_build']}")
PY
}

do_train() {
  [ -n "$CHECKPOINT" ] || { echo "the train part needs CHECKPOINT=PATH (where to write the weights)"; return 2; }
  echo "+ train_reference.py --preset $PRESET ${TRAIN_ARGS:-}"
  timeout 560 python3 scripts/train_reference.py --preset "$PRESET" --output "$CHECKPOINT" \
    --prompts "$out/prompts.json" --json "$out/train.json" ${TRAIN_ARGS:-} 2>&1 | tee "$work/train.log" | tail -15
}

case "$part" in
train) do_train ;;
export) do_export ;;
parity) do_parity ;;
bench) do_bench ;;
build) do_build ;;
summary) do_summary ;;
all) do_export; do_parity; do_bench; do_build; do_summary ;;
*) echo "unknown part $part: train|export|parity|bench|build|summary|all"; exit 2 ;;
esac
