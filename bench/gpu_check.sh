#!/usr/bin/env bash
# GPU checks that the CPU-only development machine and CI cannot run, end to end from a fresh install:
#   1. the environment (GPU, driver, torch CUDA, onnxruntime providers, TensorRT) -> env.txt
#   2. the test files with GPU paths (TensorRT builder/runner, export incl. the ORT CUDA provider, CUDA bench)
#   3. training on the GPU with train.deterministic: uninterrupted vs SIGTERM to the process group (loader worker
#      included) at step 20 + resume, compared bit for bit; with 2+ GPUs the same under torchrun (NCCL)
#   4. a fp32 ONNX export checked on ONNX Runtime's CUDA provider (TF32 off; a CPU fallback fails the step)
#   5. TensorRT fp16 export with parity, `mffzoo bench infer` (s, b) and `mffzoo bench train` (s, b; vs HF under
#      the same precision and its fp32 default)
#   6. MFU of ViT-B/16 pretraining as recipes/vitb.yaml runs it with train.compile=true (compile time apart, the
#      eager twin and the HF peer under the same precision in the same run) -> mfu-vitb.log
# Results: one folder, $OUT (default gpu-check/): a log per step, summary.txt (step, status, seconds), JSON of
# the benchmarks. Exit 0 when every step ran and passed, 1 otherwise (summary.txt says which). Without a CUDA GPU
# it prints a "skip:" line and exits 0.
#
#   bash bench/gpu_check.sh --install   # first: pip install -e '.[gpu,bench]' pytest ([gpu-cu12] for CUDA 12 torch)
#   bash bench/gpu_check.sh             # when that is installed already
#   OUT=results/h100 bash bench/gpu_check.sh
# ([gpu] brings onnxruntime-gpu, which conflicts with the CPU onnxruntime of [onnx]/[test]: do not add those;
# --install removes a CPU onnxruntime first.)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-gpu-check}

if [ "${1:-}" = "--install" ]; then
  extra=gpu
  cuda_major=$("$PY" -c "import torch; print((torch.version.cuda or '').split('.')[0])" 2>/dev/null || true)
  [ "$cuda_major" = "12" ] && extra=gpu-cu12
  "$PY" -m pip uninstall -y -q onnxruntime >/dev/null 2>&1 || true
  "$PY" -m pip install -q -e ".[$extra,bench]" pytest || { echo "error: pip install -e '.[$extra,bench]' failed"; exit 1; }
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "skip: no CUDA GPU visible to torch; run bench/gpu_check.sh on a machine with an NVIDIA GPU"
  exit 0
fi

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export MFFZOO_HOME="$OUT/zoo" MFFZOO_DEMO_DATA="$OUT/demo-data" PYTHONUNBUFFERED=1
: > "$OUT/summary.txt"
rc=0
# step NAME EXPECTED_RC CMD...: run CMD, log to $OUT/NAME.log, record status and seconds
step() {
  local name=$1 want=$2; shift 2
  local t0=$SECONDS
  echo "== $name: $*"
  "$@" > "$OUT/$name.log" 2>&1
  local got=$?
  local status=ok
  if [ "$got" != "$want" ]; then status="FAILED (exit $got, expected $want)"; rc=1; fi
  printf '%-22s %-34s %5ss\n' "$name" "$status" "$((SECONDS - t0))" | tee -a "$OUT/summary.txt"
  tail -n 3 "$OUT/$name.log"
}
same_weights() {  # two run directories end with bit-identical model weights
  "$PY" - "$1" "$2" <<'EOF'
import sys, torch
from mffzoo.train.checkpoint import CheckpointManager
from mffzoo.zoo import load_checkpoint_file
a, b = (load_checkpoint_file(CheckpointManager(f"{d}/checkpoints").list()[0]) for d in sys.argv[1:3])
bad = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
print(f"steps {a['global_step']} / {b['global_step']}:", "bit-identical" if not bad else f"differ in {bad[:5]}")
sys.exit(1 if bad or a["global_step"] != b["global_step"] else 0)
EOF
}

step env 0 "$PY" - <<'EOF'
import subprocess, sys, torch
print(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap", "--format=csv"],
                     capture_output=True, text=True).stdout.strip())
print("torch", torch.__version__, "CUDA", torch.version.cuda, "GPUs", torch.cuda.device_count(),
      torch.cuda.get_device_name())
from mffzoo.export.sidecar import tool_versions
print("versions", tool_versions())
import onnxruntime as ort
print("onnxruntime providers", ort.get_available_providers())
ok = "CUDAExecutionProvider" in ort.get_available_providers()
try:
    import tensorrt
    print("tensorrt", tensorrt.__version__)
except Exception as exc:  # the PyPI stub raises at import when NVIDIA's wheels are missing
    print("tensorrt does not import:", exc)
    ok = False
sys.exit(0 if ok else 1)
EOF
cp "$OUT/env.log" "$OUT/env.txt"

step tests 0 "$PY" -m pytest -q -rs tests/test_export_trt.py tests/test_export.py tests/test_bench_train.py

demo=(recipes/demo.yaml --set train.device=cuda --set train.epochs=1 --set train.deterministic=true
      --set publish.tag=null --set log.vis_every_epochs=0)
step train-ref 0 "$PY" -m mffzoo train "${demo[@]}" --output "$OUT/train-ref"
step train-sigterm 143 env MFFZOO_TEST_SIGNAL_AT_STEP=20 setsid -w "$PY" -m mffzoo train "${demo[@]}" \
  --output "$OUT/train-resumed"
step train-resume 0 "$PY" -m mffzoo train "${demo[@]}" --output "$OUT/train-resumed"
step train-exact 0 same_weights "$OUT/train-ref" "$OUT/train-resumed"
if [ "$("$PY" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  trun=("$PY" -m torch.distributed.run --standalone --nproc_per_node=2 -m mffzoo train "${demo[@]}"
        --set train.batch_per_device=32)
  step ddp-ref 0 "${trun[@]}" --output "$OUT/ddp-ref"
  step ddp-sigterm 1 env MFFZOO_TEST_SIGNAL_AT_STEP=20:TERM:parent setsid -w "${trun[@]}" --output "$OUT/ddp-resumed"
  step ddp-resume 0 "${trun[@]}" --output "$OUT/ddp-resumed"
  step ddp-exact 0 same_weights "$OUT/ddp-ref" "$OUT/ddp-resumed"
fi

step onnx-cuda-fp32 0 "$PY" -m mffzoo export mff_vit_small --random-init --profile onnx-fp32 -o "$OUT/vits-fp32.onnx"
step onnx-cuda-provider 0 "$PY" -c "
import json, sys
r = json.load(open('$OUT/vits-fp32.onnx.parity.json'))
print('providers', r['providers'], 'notes', r['notes'])
sys.exit(0 if r['providers'][:1] == ['CUDAExecutionProvider'] and not r['notes'] else 1)"

backends=cuda-eager,cuda-fp16,cuda-bf16,cuda-compile-fp16
if "$PY" -c "import tensorrt" 2>/dev/null; then
  backends=$backends,trt-fp16,trt-fp32
  step trt-export 0 "$PY" -m mffzoo export mff_vit_small --random-init --profile trt-fp16 -o "$OUT/vits-fp16.engine"
fi
for m in mff_vit_small mff_vit_base; do
  step "bench-infer-${m#mff_vit_}" 0 "$PY" -m mffzoo bench infer "$m" --random-init --batch 64 --backends "$backends" \
    --json "$OUT/bench-infer-$m.json"
done
step bench-train 0 "$PY" -m mffzoo bench train --device cuda --models s,b --peers auto,hf \
  --json "$OUT/bench-train.json"
# ViT-B/16 pretraining as the recipe runs it, compiled; micro-batch 128 (compute-bound already, and leaves the
# peer's fp32 reference row room on a 40 GB card; the recipe's 512 is its 8-GPU setting)
step bench-train-vitb 0 "$PY" -m mffzoo bench train --recipe recipes/vitb.yaml --device cuda \
  --set train.compile=true --set train.batch_per_device=128 --peers auto,hf --steps 10 --warmup 3 \
  --json "$OUT/bench-train-vitb.json"
step mfu-vitb 0 "$PY" - "$OUT/bench-train-vitb.json" <<'EOF'
import json, sys
rows = json.load(open(sys.argv[1]))
for r in rows:
    mfu = f"{100 * r['mfu']:.1f}% of {r['peak_tflops']:g}" if r.get("mfu") else "- (no peak known for this GPU)"
    comp = f", compile {r['compile_s']:.0f} s" if r.get("compile_s") is not None else ""
    print(f"{r['model']} {r['impl']} ({r['precision']}, batch {r['batch']}): {r['img_s']:.1f} img/s, "
          f"{(r.get('tflops') or 0):.1f} TFLOP/s, MFU {mfu}, x{r['ratio'] or 0:.2f} vs {r['peer']}, "
          f"x{r['ratio_fastest'] or 0:.2f} vs fastest peer {r['fastest_peer']}{comp}")
ok = any(r["impl"] == "mffzoo-compile" and r.get("flops_per_step") and r.get("compile_s") is not None for r in rows)
sys.exit(0 if ok else 1)
EOF

echo "results in $OUT (summary.txt):"
cat "$OUT/summary.txt"
exit $rc
