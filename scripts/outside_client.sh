#!/usr/bin/env bash
# The OpenAI-compatible endpoint under NVIDIA's aiperf, next to loadtest over gRPC and OpenAI, on one
# `serve` (preset tiny, this machine's CPU unless DEVICE=cuda). Needs `make setup aiperf`.
#   scripts/outside_client.sh [OUT]          (default build/outside-client)
# Environment: CONCURRENCY (8), REQUESTS (64), ISL (16), OSL (64), PORT (8100), PRESET (tiny), DEVICE (cpu),
# AIPERF (.venv-aiperf/bin/aiperf). aiperf counts tokens with models/byte_tokenizer (token id = UTF-8
# byte, this model's text encoding) and the server's usage figures (--use-server-token-count).
set -euo pipefail
out=${1:-build/outside-client}
port=${PORT:-8100}; concurrency=${CONCURRENCY:-8}; requests=${REQUESTS:-64}
aiperf=${AIPERF:-.venv-aiperf/bin/aiperf}; py=${PY:-.venv/bin/python}
mkdir -p "$out"
rm -f "$out/serve-ready.json"
$py -m runtime.commands.serve --preset "${PRESET:-tiny}" --device "${DEVICE:-cpu}" --port "$port" \
  --grpc-port $((port + 1)) --metrics-port $((port + 2)) --openai-port $((port + 3)) \
  --json "$out/serve-ready.json" > "$out/serve.log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server' EXIT
for _ in $(seq 300); do [ -f "$out/serve-ready.json" ] && break; kill -0 $server || { cat "$out/serve.log"; exit 1; }; sleep 1; done
echo "+ aiperf: concurrency $concurrency, $requests requests, ISL ${ISL:-16}, OSL ${OSL:-64}"
"$aiperf" profile --model rotary --url "http://127.0.0.1:$((port + 3))" --endpoint-type completions --streaming \
  --concurrency "$concurrency" --request-count "$requests" --tokenizer models/byte_tokenizer --use-server-token-count \
  --isl "${ISL:-16}" --osl "${OSL:-64}" --random-seed 0 --ui-type none --output-artifact-dir "$out/aiperf" \
  > "$out/aiperf.log" 2>&1 || { tail -30 "$out/aiperf.log"; exit 1; }
grep -E "Time to First Token|Inter Token Latency|Output Token Throughput \(tokens/sec\)|Request Error Rate" "$out/aiperf.log"
for protocol in grpc openai; do
  $py -m runtime.commands.loadtest --url "http://127.0.0.1:$port" --protocol $protocol --concurrency "$concurrency" \
    --requests "$requests" --max-prompt-tokens "${ISL:-16}" --max-new-tokens "${OSL:-64}" --json "$out/loadtest-$protocol.json"
done
