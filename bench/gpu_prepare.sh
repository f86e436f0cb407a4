#!/usr/bin/env bash
# Prepare .gpu/ (git-ignored) HERE, for bench/gpu_check.sh on the GPU machine.
#
# The GPU machine cannot reach any package registry, and each call to it may
# carry at most 64 MiB (working tree included). Its image has Python 3.12,
# PyTorch with CUDA 13 (and so the nvidia-* CUDA 13 / cuDNN 9 libraries),
# numpy, onnx, the CPU onnxruntime, pytest, uvloop, prometheus-client; it
# lacks onnxruntime-gpu and triaged's small pure deps. So this script:
#   - downloads onnxruntime-gpu (CUDA 13 build, cp312), unpacks it, packs it
#     as tar.xz and splits that into parts that fit a call with the tree,
#   - downloads the small wheels (msgspec, structlog, aiosmtpd, atpublic,
#     aiosmtplib, pytest-asyncio),
#   - copies a corpus subset (1,024 SpamAssassin messages under 48 KB).
# Then it prints the device calls to make: one per part (each copies its part
# to /tmp/ort on the warm machine), and a last one that runs gpu_check.sh.
# The machine goes back after 30 s idle: make the calls back to back.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
G=.gpu
ORT_VERSION=${ORT_VERSION:-1.31.1}
DL=${DL:-/tmp/triaged-gpu-dl}

rm -rf "$G" && mkdir -p "$G/wheels" "$G/ort" "$G/corpus" "$DL"
pipdl() {
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "$@"
}

echo "== small wheels"
pin() { "$PY" -m pip show "$1" 2>/dev/null | awk '/^Version:/{print $2}'; }
for pkg in msgspec structlog aiosmtpd atpublic aiosmtplib pytest-asyncio selectolax aiokafka async-timeout; do
  v=$(pin "$pkg"); pipdl -d "$G/wheels" "$pkg${v:+==$v}"
done

echo "== onnxruntime-gpu $ORT_VERSION"
whl=$(ls "$DL"/onnxruntime_gpu-"$ORT_VERSION"-cp312-*.whl 2>/dev/null | head -1 || true)
if [ -z "$whl" ]; then
  pipdl -d "$DL" "onnxruntime-gpu==$ORT_VERSION"
  whl=$(ls "$DL"/onnxruntime_gpu-"$ORT_VERSION"-cp312-*.whl | head -1)
fi
# Unpacked wheel = a directory to put on PYTHONPATH; xz packs the CUDA
# kernels ~20% tighter than the wheel's deflate. The TensorRT provider and
# the transformers/quantization tools are not needed. Cached in $DL.
if [ ! -s "$DL/ort-$ORT_VERSION.tar.xz" ]; then
  rm -rf "$DL/site" && mkdir -p "$DL/site"
  (cd "$DL/site" && unzip -q "$whl" -x 'onnxruntime/transformers/*' 'onnxruntime/quantization/*' \
    'onnxruntime/tools/*' 'onnxruntime/capi/libonnxruntime_providers_tensorrt.so')
  tar -C "$DL/site" -cf - . | xz -T2 -6 > "$DL/ort.tmp" && mv "$DL/ort.tmp" "$DL/ort-$ORT_VERSION.tar.xz"
fi
sha256sum "$DL/ort-$ORT_VERSION.tar.xz" | awk '{print $1}' > "$G/ort/SHA256"

echo "== corpus subset"
"$PY" - <<'EOF'
import shutil
from pathlib import Path
src = Path("data-cache/spamassassin/package/data")
files = sorted(p for p in src.glob("*/*.txt") if p.stat().st_size < 48_000)
step = max(1, len(files) // 1024)
for p in files[::step][:1024]:
    (Path(".gpu/corpus") / p.parent.name).mkdir(parents=True, exist_ok=True)
    shutil.copy(p, Path(".gpu/corpus") / p.parent.name / p.name)
EOF

echo "== split onnxruntime-gpu to fit each call's 64 MiB with the working tree"
# What travels on every call: tracked + untracked-not-ignored files.
tree=$( (git ls-files -z; git ls-files -z -o --exclude-standard) | xargs -0 stat -c %s 2>/dev/null \
  | awk '{s+=$1} END {print s}')
extras=$(du -sb "$G/wheels" "$G/corpus" | awk '{s+=$1} END {print s}')
part=$("$PY" - "$tree" "$extras" "$(stat -c %s "$DL/ort-$ORT_VERSION.tar.xz")" <<'EOF'
import math, sys
tree, extras, ort = map(int, sys.argv[1:])
avail = 62 * 2**20 - tree  # 2 MiB margin under 64 MiB
assert avail > 16 * 2**20, f"working tree too big ({tree} bytes) to carry parts"
n = max(1, math.ceil((ort + extras) / avail))
while math.ceil(ort / n) + extras > avail:  # the last call also carries wheels + corpus
    n += 1
print(math.ceil(ort / n))
EOF
)
split -b "$part" -d -a 1 "$DL/ort-$ORT_VERSION.tar.xz" "$G/ort/part"
ls "$G/ort" | grep '^part' > "$G/ort/PARTS"
echo "working tree $((tree / 1048576)) MiB; wheels + corpus $((extras / 1048576)) MiB; parts of $((part / 1048576)) MiB"
du -sh "$G"/* "$G"/ort/*
parts=$(cat "$G/ort/PARTS")
last=$(echo "$parts" | tail -1)
echo
echo "Device calls (back to back, the machine goes back after 30 s idle):"
for p in $parts; do
  [ "$p" = "$last" ] && break
  echo "  run carry=[\"$G/ort/$p\"] command='mkdir -p /tmp/ort && cp $G/ort/$p /tmp/ort/ && ls -l /tmp/ort'"
done
echo "  run carry=[\"$G/ort/$last\", \"$G/ort/SHA256\", \"$G/ort/PARTS\", \"$G/wheels\", \"$G/corpus\"]" \
  "timeout_s=420 command='bash bench/gpu_check.sh'"
