#!/usr/bin/env bash
# The CUDA check, for a machine with an NVIDIA GPU: the GPU tests, `lungmae train` on the GPU (bf16 AMP) and the
# MAE step benchmark on the GPU. Logs and the benchmark's JSON go to $OUT (default /tmp/gpu_check).
# Needs torch with CUDA, pytest, numpy, scipy, pyyaml, tqdm, opacus (and monai for the benchmark's reference).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
lungmae() { "$PY" -c 'import sys; from lungmae_cli.main import main; sys.exit(main(sys.argv[1:]))' "$@"; }
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))' \
    2>&1 | tee -a "$OUT/gpu.txt"
echo "== pytest tests/gpu"
"$PY" -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/pytest_gpu.log" || status=1
echo "== lungmae train --device cuda"
start=$(date +%s)
lungmae train --device cuda --scans 64 --workers 8 --workdir /tmp/train_gpu --quiet 2>&1 | tee "$OUT/train_gpu.log" \
    || status=1
echo "lungmae train on cuda: $(( $(date +%s) - start )) s" | tee -a "$OUT/train_gpu.log"
echo "== benchmarks/mae_step.py --device cuda"
# bf16 autocast as training runs on a GPU: the MFU against a bf16 matmul (MONAI's MAE fails under autocast and
# is left out there); then fp32 for the comparison with MONAI
"$PY" benchmarks/mae_step.py --configs tiny paper-p16 paper-p8 --device cuda --amp bf16 \
    --json "$OUT/mae_step_cuda.json" 2>&1 | tee "$OUT/mae_step_cuda.log" || status=1
"$PY" benchmarks/mae_step.py --configs paper-p16 paper-p8 --device cuda --amp none \
    --json "$OUT/mae_step_cuda_fp32.json" 2>&1 | tee "$OUT/mae_step_cuda_fp32.log" || status=1
exit $status
