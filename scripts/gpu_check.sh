#!/usr/bin/env bash
# The GPU path, checked in one call on a lent GPU (README, "On a GPU"):
#   1. the CUDA tests: CUDA-graph replay equals eager (static, dynamic, sampling), greedy exact
#      against plain decoding, no recompiles, tree auto switching between captured graphs;
#   2. the cost benchmark on the default pair's architectures with random weights (the real weights
#      cannot travel there), turned into predicted tokens/s with the acceptance measured on a CPU;
#   3. one short table: plain decoding against the GPU's memory-bandwidth limit, a 16-node verify
#      against a plain step, predicted speedups per tree.
# Runs from the source tree (PYTHONPATH; nothing installed), with the torch the machine has.
# Writes gpu-costs.json and gpu-check.txt under $OUT when set.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
BANDWIDTH_GBS="${BANDWIDTH_GBS:-4800}"  # H200: 4.8 TB/s
DEVICE="${DEVICE:-cuda}"  # DEVICE=cpu with TARGET/DRAFT set to tiny checkpoints: a dry run of the script itself
TARGET="${TARGET:-scripts/configs/qwen2.5-coder-1.5b-instruct}"
DRAFT="${DRAFT:-scripts/configs/qwen2.5-coder-0.5b-instruct}"
PROFILE="${PROFILE:-docs/bench-amx-int.json}"  # tau and draft levels per step, measured on a CPU
SYSTEMS="plain;1,1,1,1,1@0.3;1,1,1,1,1,1,1,1@0.5;dynamic@0.3;dynamic:depth=8,width=2,k=4,nodes=15@0.3"
{
python -c "import torch; print('torch', torch.__version__, 'on', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
python -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py 2>&1 | tail -15
python bench.py --cost-only --device "$DEVICE" --dtype bfloat16 --checkpoint "$TARGET" --draft "$DRAFT" \
    --systems "$SYSTEMS" --acceptance-from "$PROFILE" --out "$OUT/gpu-costs.json" | grep -v '^{'
python - "$OUT/gpu-costs.json" "$BANDWIDTH_GBS" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
costs, weights = r["costs_ms"], r["meta"]["memory"]["target"]["weights"]
limit_ms = weights / (float(sys.argv[2]) * 1e9) * 1e3
graph = "graph_step" in costs["plain"]
plain = costs["plain"]["graph_step"] if graph else costs["plain"]["verify"]
wide = next(n for n in costs if "nodes=15" in n)
print(f"plain step {plain:.2f} ms ({'CUDA graph' if graph else 'eager verify'}); bandwidth limit for {weights / 1e9:.2f} GB of target weights "
      f"at {sys.argv[2]} GB/s: {limit_ms:.2f} ms ({limit_ms / plain:.0%} of it)")
print(f"verify of 16 nodes / plain verify: {costs[wide]['verify'] / costs['plain']['verify']:.2f}x (eager, per phase)")
print("| set/system | step ms | tau | predicted tok/s | speedup |\n|---|---|---|---|---|")
for key, p in r["predicted"].items():
    print(f"| {key} | {p['step_ms']:.2f} | {p['tau']:.2f} | {p['tokens_per_s']:.0f} | {p['speedup']:.2f}x |")
PY
} 2>&1 | tee "$OUT/gpu-check.txt"
