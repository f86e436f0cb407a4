#!/usr/bin/env bash
# The GPU check for issue 4, run from the repo root on the GPU machine:
#
#     OUT=/some/folder bash bench/gpu_check.sh [MODEL.onnx]
#
# 1. nvidia-smi; 2. a CUDA build of onnxruntime (already importable, or the
#    parts bench/gpu_prepare.sh made, or pip where a registry is reachable);
# 3. proves a session really runs on CUDAExecutionProvider;
# 4. tests/test_batcher.py, test_service.py, test_process_runner.py and
#    test_inference_service.py (the shared inference service) on CUDA;
# 5. bench/batching_bench.py (offline, in-process, SMTP) on CUDA, then CPU.
# Writes at most 8 flat files to $OUT. Each step has a timeout; the whole
# run is sized for < 6 minutes. Fails fast, saying which step failed.
# CPU_ONLY=1 rehearses the script on a machine without a GPU (tests and
# bench on CPU, no onnxruntime-gpu), e.g. OUT=/tmp/out CPU_ONLY=1 PY=.venv/bin/python.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
T0=$(date +%s)
say() { echo "== [$(($(date +%s) - T0))s] $*" | tee -a "$LOG"; }
die() { say "FAILED: $*"; exit 1; }
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

MODEL=${1:-models/default.onnx}
CPU_ONLY=${CPU_ONLY:-0}
PROVIDERS="cuda cpu"; TEST_PROVIDER=cuda
[ "$CPU_ONLY" = 1 ] && { PROVIDERS=cpu; TEST_PROVIDER=cpu; }
export CPU_ONLY
PY=${PY:-python3}
"$PY" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' 2>>"$LOG" \
  || die "$PY is older than 3.11"

say "1/5 nvidia-smi"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || [ "$CPU_ONLY" = 1 ] || die "nvidia-smi failed (no GPU?)"
head -15 "$OUT/nvidia-smi.txt" | tee -a "$LOG"

say "2/5 a CUDA onnxruntime and triaged's deps"
SITE=/tmp/triaged-site
mkdir -p "$SITE"
has_cuda() { "$PY" -c 'import onnxruntime as o, sys; sys.exit("CUDAExecutionProvider" not in o.get_available_providers())' 2>/dev/null; }
if [ -d .gpu/wheels ] && [ "$CPU_ONLY" != 1 ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .gpu/wheels/*.whl >>"$LOG" 2>&1 \
    || die "installing .gpu/wheels"
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "$CPU_ONLY" = 1 ]; then
  say "CPU_ONLY: keeping the installed onnxruntime"
elif has_cuda; then
  say "onnxruntime with CUDA already importable"
elif [ -f .gpu/ort/PARTS ]; then
  # Parts copied to /tmp/ort by earlier calls, or carried in .gpu/ort.
  "$PY" - <<'EOF' >>"$LOG" 2>&1 || die "reassembling onnxruntime-gpu from .gpu/ort + /tmp/ort (see log)"
import hashlib, io, lzma, sys, tarfile
from pathlib import Path
parts = Path(".gpu/ort/PARTS").read_text().split()
blob = bytearray()
for name in parts:
    found = [p for p in (Path("/tmp/ort") / name, Path(".gpu/ort") / name) if p.exists()]
    if not found:
        sys.exit(f"part {name} missing: was the machine given back between calls? "
                 f"found {sorted(p.name for p in Path('/tmp/ort').glob('part*'))}")
    blob += found[0].read_bytes()
if hashlib.sha256(blob).hexdigest() != Path(".gpu/ort/SHA256").read_text().strip():
    sys.exit("onnxruntime-gpu parts do not match their SHA-256")
with tarfile.open(fileobj=lzma.LZMAFile(io.BytesIO(bytes(blob)))) as tar:
    tar.extractall("/tmp/triaged-site", filter="fully_trusted")
print("onnxruntime-gpu unpacked into /tmp/triaged-site")
EOF
elif timeout 20 "$PY" -m pip download -q --no-deps -d /tmp/probe-dl msgspec >/dev/null 2>&1; then
  # A registry is reachable: the plain route.
  say "pip route: venv /tmp/v with .[dev] and onnxruntime-gpu"
  { python3 -m venv /tmp/v && /tmp/v/bin/pip install -q -e '.[dev]' onnx \
    && /tmp/v/bin/pip uninstall -y -q onnxruntime \
    && /tmp/v/bin/pip install -q 'onnxruntime-gpu[cuda,cudnn]'; } >>"$LOG" 2>&1 || die "pip install"
  PY=/tmp/v/bin/python
else
  die "no CUDA onnxruntime here, no .gpu/ort parts and no registry: run bench/gpu_prepare.sh and follow what it prints"
fi
# CUDA/cuDNN from the nvidia-* wheels the image's PyTorch brought, for the
# case where onnxruntime.preload_dlls() does not find them itself.
NV=$("$PY" - <<'EOF'
import glob, os, site, sys
dirs = set()
for base in site.getsitepackages() + [p for p in sys.path if p.endswith("site-packages")]:
    for lib in glob.glob(os.path.join(base, "nvidia", "**", "lib*.so*"), recursive=True):
        dirs.add(os.path.dirname(lib))
print(":".join(sorted(dirs)))
EOF
)
export LD_LIBRARY_PATH="${NV}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

say "3/5 CUDA provider really used"
timeout 120 "$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import os
import onnxruntime as ort
from classifier.providers import choose_providers, cuda_problem
print("onnxruntime", ort.__version__, ort.__file__)
print("available:", ort.get_available_providers())
problem = cuda_problem(0)
print("cuda problem:", problem)
choice = choose_providers("auto", 0)
print("auto ->", choice)
assert choice.kind == "cuda" or os.environ.get("CPU_ONLY") == "1", "auto did not choose CUDA"
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || die "CUDAExecutionProvider does not come up (see above)"

say "4/5 tests on $TEST_PROVIDER"
TRIAGED_TEST_PROVIDER=$TEST_PROVIDER timeout 300 "$PY" -m pytest -q -p no:cacheprovider -x \
  tests/test_batcher.py tests/test_service.py tests/test_process_runner.py \
  tests/test_inference_service.py \
  > "$OUT/pytest_$TEST_PROVIDER.txt" 2>&1
rc=$?
tail -5 "$OUT/pytest_$TEST_PROVIDER.txt" | tee -a "$LOG"
[ $rc -eq 0 ] || die "tests on $TEST_PROVIDER (rc=$rc, see pytest_$TEST_PROVIDER.txt)"

say "5/5 benchmark: $PROVIDERS"
# About 90 s per provider: both runners, one unpaced SMTP round.
BENCH_ARGS=(--seconds 4 --rounds 3 --offline-seconds 1.5 --runners process,thread
            --smtp --smtp-seconds 8 --smtp-rounds 1 --smtp-rates 0 --out "$OUT")
if [ -f "$MODEL" ] && "$PY" -c "from classifier.model import load_model; load_model('$MODEL')" >>"$LOG" 2>&1; then
  BENCH_ARGS+=(--model "$MODEL")
else
  say "no usable $MODEL: using the standin (same graph shape, random weights)"; BENCH_ARGS+=(--standin)
fi
if [ -d .gpu/corpus ]; then export TRIAGED_BENCH_CORPUS=$PWD/.gpu/corpus; fi
for provider in $PROVIDERS; do
  timeout 150 "$PY" bench/batching_bench.py --provider "$provider" "${BENCH_ARGS[@]}" \
    > "$OUT/bench_$provider.log" 2>&1
  rc=$?
  grep -E "^round|^smtp|Verdict" "$OUT/bench_$provider.log" | tee -a "$LOG"
  [ $rc -eq 0 ] || { tail -20 "$OUT/bench_$provider.log" | tee -a "$LOG"; die "bench on $provider (rc=$rc)"; }
  rm -f "$OUT/bench_$provider.log"  # the .md/.json hold the results
done
say "done: $(ls "$OUT" | tr '\n' ' ')"
