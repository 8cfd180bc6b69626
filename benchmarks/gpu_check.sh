#!/usr/bin/env bash
# One command for a GPU host: install the GPU stack, run the tests that skip without a GPU,
# build the TensorRT FP16 engine from the bundle and check its parity, benchmark inference
# and the daemon on CUDA at 512² and 4M (2048²) frames, and write one results file.
#
#   benchmarks/gpu_check.sh [--cpu-dry-run] [--bundle DIR] [--out FILE] [--no-install]
#
# On a host where `nvidia-smi -L` lists a GPU it runs for real; elsewhere (or with
# --cpu-dry-run) it runs every step's CPU side with the current Python (no installs, small
# sizes) so that the script itself is checked. Each step has its own time limit; together
# they stay under 8 minutes on a GPU host (the engine build is the longest: ~1-2 min).
#
# Versions (what PyPI serves, checked with `pip install --dry-run --report`): torch==2.13.0
# (PyPI's Linux wheel is the CUDA 13 build), onnxruntime-gpu==1.31.1 (CUDA 13, with its
# [cuda,cudnn] extras), tensorrt-cu13==10.16.1.11 (TensorRT 10, the API the backend uses).
# They go into their own virtual environment ($XTALSYM_GPU_VENV, default .gpu-venv):
# onnxruntime-gpu and the CPU onnxruntime both install the `onnxruntime` module and must not
# share one.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
ORT_GPU_SPEC="${ORT_GPU_SPEC:-onnxruntime-gpu[cuda,cudnn]==1.31.1}"
TRT_SPEC="${TRT_SPEC:-tensorrt-cu13==10.16.1.11}"
VENV="${XTALSYM_GPU_VENV:-$ROOT/.gpu-venv}"
BUNDLE=""
OUT=""
DRY=0
INSTALL=1

while [ $# -gt 0 ]; do
    case "$1" in
        --cpu-dry-run) DRY=1 ;;
        --no-install) INSTALL=0 ;;
        --bundle) BUNDLE="$2"; shift ;;
        --out) OUT="$2"; shift ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

if [ "$DRY" = 0 ] && ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check.sh: no NVIDIA GPU here (nvidia-smi -L failed): running the CPU dry run" >&2
    DRY=1
fi
# the limits are sized for a GPU host; a (shared) CPU host running the dry run gets more
TIME_SCALE="${GPU_CHECK_TIME_SCALE:-$([ "$DRY" = 1 ] && echo 4 || echo 1)}"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
OUT="${OUT:-$ROOT/benchmarks/results/gpu_check-$(hostname -s)-$STAMP$([ "$DRY" = 1 ] && echo -cpu-dry-run).md}"
mkdir -p "$(dirname "$OUT")"
BUNDLE="${BUNDLE:-$ROOT/reference_index}"
T_START=$(date +%s)

log() { echo "$*" | tee -a "$OUT"; }
# step NAME SECONDS COMMAND...: runs it with a time limit (x TIME_SCALE), its output into the results file
step() {
    local name="$1" limit=$(( $2 * TIME_SCALE )); shift 2
    local t0=$(date +%s)
    log ""
    log "## $name"
    log ""
    log '```'
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUT"
    local rc=${PIPESTATUS[0]}
    log '```'
    log "($name: exit $rc, $(( $(date +%s) - t0 )) s$([ "$rc" = 124 ] && echo ", TIME LIMIT ${limit} s"))"
    return 0
}

: > "$OUT"
log "# xtalsym GPU check $([ "$DRY" = 1 ] && echo '(CPU dry run: no GPU here)')"
log ""
log "- date: $STAMP, host $(hostname -s), $(nproc) CPUs, uptime: $(uptime)"
log "- commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown), bundle: $BUNDLE"
if [ "$DRY" = 0 ]; then
    log "- GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)"
fi

if [ "$DRY" = 1 ]; then
    PY="${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || command -v python3)}"
    DEVICE=cpu
    log "- Python: $PY (no installs in the dry run)"
else
    DEVICE=cuda
    PY="$VENV/bin/python"
    if [ "$INSTALL" = 1 ]; then
        INSTALLER="$(mktemp)"
        cat > "$INSTALLER" <<INSTALL_EOF
set -e
[ -x "$PY" ] || python3 -m venv "$VENV"
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet "$TORCH_SPEC"
echo "$TORCH_SPEC" > "$VENV/constraints.txt"
# the project's dependencies from pyproject.toml: core + ml (without onnxruntime) + daemon + test
DEPS=\$("$PY" -c "
import tomllib
p = tomllib.load(open('$ROOT/pyproject.toml', 'rb'))['project']
deps = p['dependencies'] + [d for e in ('ml', 'daemon', 'test') for d in p['optional-dependencies'][e]]
print(' '.join(d for d in deps if not d.startswith(('onnxruntime', 'torch'))))")
"$PY" -m pip install --quiet -c "$VENV/constraints.txt" \$DEPS psutil "$ORT_GPU_SPEC" "$TRT_SPEC"
"$PY" -m pip install --quiet --no-deps -e "$ROOT"
"$PY" -c "import torch, onnxruntime, tensorrt; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available()); print('onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers()); print('tensorrt', tensorrt.__version__)"
INSTALL_EOF
        step "install ($TORCH_SPEC, $ORT_GPU_SPEC, $TRT_SPEC)" 300 bash "$INSTALLER"
        rm -f "$INSTALLER"
    fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# the tests that skip without a GPU (CUDA backends, TensorRT, FAISS on the GPU), skip reasons shown
step "tests that need a GPU" 150 "$PY" -m pytest "$ROOT/tests" -q -rs -p no:cacheprovider -k "cuda or tensorrt or gpu"

# TensorRT FP16 engine from the bundle, then parity against ONNX Runtime CPU fp32 on real shaped DPs
step "TensorRT FP16 engine + parity" 240 "$PY" - "$BUNDLE" "$DEVICE" <<'EOF'
import sys, time
import numpy as np
from xtalsym import bundle as bundles
from xtalsym.inference import BackendUnavailable, make_backend
from xtalsym.offline import dataset as ds, evaluate as ev, structures

b = bundles.load_bundle(sys.argv[1])
device = sys.argv[2]
config = ev.build_config_from({"dataset_config": b.settings["dataset_config"]})
records, _ = ds.collect_records([structures.shipped_structures_dir()])
x = np.stack([ds.make_sample(structures.label(r), config)[1].transpose(0, 3, 1, 2) for r in records])
masks = np.array([[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 1, 1]], bool)
present = masks[np.arange(len(x)) % len(masks)]
reference = make_backend(b, "onnxruntime", device="cpu", precision="fp32").run(x, present)
candidates = [("tensorrt", "cuda"), ("onnxruntime", "cuda"), ("torch", "cuda")] if device == "cuda" else [("torch", "cpu")]
for name, dev in candidates:
    try:
        t0 = time.perf_counter()
        backend = make_backend(b, name, device=dev)
        built = time.perf_counter() - t0
    except BackendUnavailable as exc:
        print(f"{name} on {dev}: unavailable: {exc}")
        continue
    r = backend.run(x, present)
    dp = float(np.abs(r.probabilities - reference.probabilities).max())
    top1 = float((r.probabilities.argmax(1) == reference.probabilities.argmax(1)).mean())
    ok = dp <= (1e-2 if backend.precision == "fp16" else 1e-4) and top1 >= 0.999
    print(f"{backend!r}: ready in {built:.1f} s; vs onnxruntime cpu fp32 on {len(x)} shipped structures "
          f"(1-3 views): max |dp| {dp:.2e}, top-1 agreement {top1:.3f} -> {'PARITY OK' if ok else 'PARITY FAILED'}")
    if getattr(backend, "engine_path", None):
        print(f"  engine: {backend.engine_path}")
    backend.close()
EOF

if [ "$DRY" = 1 ]; then
    step "benchmarks/inference.py (cpu, dry run)" 120 "$PY" "$ROOT/benchmarks/inference.py" --bundle "$BUNDLE" \
        --device cpu --backends onnxruntime --batch-sizes 1,8 --seconds 1 --threads 1 --per-view
    step "benchmarks/daemon.py 512² (cpu, dry run)" 240 "$PY" "$ROOT/benchmarks/daemon.py" --bundle "$BUNDLE" \
        --images 24 --pixels 512 --rates 0 --paths view --backend onnxruntime --device cpu
    step "benchmarks/daemon.py 4M (cpu, dry run)" 240 "$PY" "$ROOT/benchmarks/daemon.py" --bundle "$BUNDLE" \
        --images 6 --pixels 2048 --rates 0 --paths view --backend onnxruntime --device cpu
else
    W=$(nproc)
    step "benchmarks/inference.py (cuda)" 120 "$PY" "$ROOT/benchmarks/inference.py" --bundle "$BUNDLE" \
        --device cuda --backends tensorrt,onnxruntime,torch --batch-sizes 1,8,32,128 --seconds 2 --per-view
    # targets on one GPU: >= 5,000 frames/s at 512², p99 <= 50 ms (the CPU workers calibrate + shape)
    step "benchmarks/daemon.py 512² (cuda)" 150 "$PY" "$ROOT/benchmarks/daemon.py" --bundle "$BUNDLE" \
        --images 3000 --pixels 512 --rates 0,2500 --paths view --backend tensorrt --device cuda --workers "$W"
    step "benchmarks/daemon.py 4M (cuda)" 120 "$PY" "$ROOT/benchmarks/daemon.py" --bundle "$BUNDLE" \
        --images 600 --pixels 2048 --rates 0 --paths view --backend tensorrt --device cuda --workers "$W"
fi

log ""
log "total: $(( $(date +%s) - T_START )) s; results in $OUT"
