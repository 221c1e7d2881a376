#!/usr/bin/env bash
# GPU checks that the CPU-only development machine and CI cannot run: the TensorRT builder/runner tests, a real
# TensorRT export of ViT-S with its parity check, `mffzoo bench infer` on the GPU (eager vs fp16/bf16 vs
# compiled vs TensorRT) and `mffzoo bench train` on the GPU (vs the HF peer, with TFLOP/s and MFU). Results go to $OUT (default: gpu-check/). Exits 0 with a "skip:" line without a GPU.
#
#   bash bench/gpu_check.sh            # on a CUDA machine with: pip install -e '.[gpu]' pytest
# ([gpu] brings onnxruntime-gpu, which conflicts with the CPU onnxruntime of [onnx]/[test]: do not add those.)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "skip: no CUDA GPU visible to torch; run bench/gpu_check.sh on a machine with an NVIDIA GPU"
  exit 0
fi
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
rc=0
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv | tee "$OUT/gpu.txt"
backends=cuda-eager,cuda-fp16,cuda-bf16,cuda-compile-fp16
if "$PY" -c "import tensorrt" 2>/dev/null; then
  backends=$backends,trt-fp16,trt-fp32
  "$PY" -m pytest -q -rs tests/test_export_trt.py 2>&1 | tee "$OUT/trt-tests.txt" || rc=1
  "$PY" -m mffzoo export mff_vit_small --random-init --profile trt-fp16 -o "$OUT/vits-fp16.engine" 2>&1 \
    | tee "$OUT/trt-export.txt" || rc=1
else
  echo "note: tensorrt is not importable: TensorRT checks skipped (pip install 'mffzoo[gpu]')" | tee "$OUT/trt-tests.txt"
fi
for m in mff_vit_small mff_vit_base; do
  "$PY" -m mffzoo bench infer "$m" --random-init --batch 64 --backends "$backends" --json "$OUT/bench-$m.json" 2>&1 \
    | tee "$OUT/bench-$m.txt" || rc=1
done
"$PY" -m mffzoo bench train --device cuda --models s,b --json "$OUT/bench-train.json" 2>&1 \
  | tee "$OUT/bench-train.txt" || rc=1
exit $rc
