#!/usr/bin/env bash
# Install everything hvdtrain needs: OpenMPI, a venv with PyTorch/TensorFlow, and a
# Horovod 0.28.1 wheel built from the PyPI sdist with hvdtrain's source fixes.
# Idempotent: a second run reuses the venv and the cached Horovod wheel.
# `make setup`, CI and the Apptainer %post all run this script.
#
# Variables (all optional):
#   HVDTRAIN_VENV           venv to create/use                  (default: <repo>/.venv)
#   HVDTRAIN_CACHE          where built Horovod wheels are kept  (default: ~/.cache/hvdtrain)
#   HVDTRAIN_TORCH_SPEC     pip spec for PyTorch                 (default: torch==2.13.0, the CPU build)
#                           set to "keep" to use the torch already importable in the venv
#                           (e.g. a CUDA build on a GPU cluster, or a container's system torch
#                           with HVDTRAIN_VENV_SYSTEM_SITE=1)
#   HVDTRAIN_TF_SPEC        pip spec for TensorFlow  (default: tensorflow-cpu==2.21.0; "keep" as above)
#   HVDTRAIN_VENV_SYSTEM_SITE=1  create the venv with --system-site-packages (NGC containers)
#   HOROVOD_GPU_OPERATIONS  NCCL on GPU clusters: builds Horovod with NCCL allreduce/allgather/broadcast
#                           (needs nvcc and NCCL; HOROVOD_NCCL_HOME if NCCL is not in a default path)
#   HVDTRAIN_SKIP_APT=1     never call apt-get (OpenMPI must already be installed)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HVDTRAIN_VENV:-$REPO/.venv}"
CACHE="${HVDTRAIN_CACHE:-$HOME/.cache/hvdtrain}"
TORCH_SPEC="${HVDTRAIN_TORCH_SPEC:-torch==2.13.0}"
TF_SPEC="${HVDTRAIN_TF_SPEC:-tensorflow-cpu==2.21.0}"
TF_KERAS_SPEC="tf-keras==2.21.0"
HOROVOD_VERSION="0.28.1"

log() { echo "[setup] $*"; }
die() { echo "[setup] error: $*" >&2; exit 1; }

apt_install() {
    [ "${HVDTRAIN_SKIP_APT:-0}" = 1 ] && die "missing system packages ($*) and HVDTRAIN_SKIP_APT=1"
    command -v apt-get >/dev/null || die "missing system packages ($*) and no apt-get: install them by hand"
    local sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    log "apt-get install $*"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

# 1. System packages: OpenMPI for Horovod's MPI controller and mpi4py; Debian's cmake (3.x) for the build.
need=()
command -v mpicc >/dev/null || need+=(libopenmpi-dev openmpi-bin)
[ -x /usr/bin/cmake ] || need+=(cmake)
[ ${#need[@]} -eq 0 ] || apt_install "${need[@]}"

# 2. The venv and the Python stack.
if [ ! -x "$VENV/bin/python" ]; then
    log "creating venv $VENV"
    venv_flags=()
    [ "${HVDTRAIN_VENV_SYSTEM_SITE:-0}" = 1 ] && venv_flags+=(--system-site-packages)
    python3 -m venv "${venv_flags[@]}" "$VENV"
fi
PY="$VENV/bin/python"
pip_install() {
    # This machine's pip config lists local indexes that may be absent; their warnings are noise.
    local status=0
    "$PY" -m pip install -q --disable-pip-version-check "$@" \
        2> >(grep -v "is ignored: it is neither" >&2) || status=$?
    return "$status"
}
# A pip-installed cmake 4.x in the venv would shadow Debian's and break the bundled gloo.
"$PY" -m pip uninstall -y -q cmake >/dev/null 2>&1 || true

framework_specs=()
# Unquoted on purpose: a spec may carry pip options (--index-url ...).
[ "$TORCH_SPEC" = keep ] || framework_specs+=($TORCH_SPEC)
[ "$TF_SPEC" = keep ] || framework_specs+=($TF_SPEC "$TF_KERAS_SPEC")
log "installing frameworks and hvdtrain (editable)"
pip_install setuptools wheel "${framework_specs[@]}"
pip_install -e "$REPO[dev]"

versions="$(TF_CPP_MIN_LOG_LEVEL=3 "$PY" - 2>/dev/null <<'PY'
import sys, torch, tensorflow as tf
print(f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}-tf{tf.__version__}")
PY
)"

# 3. Horovod: reuse the cached wheel keyed by versions, GPU ops and the patch itself.
patch_hash="$(sha256sum "$REPO/scripts/patch_horovod.py" | cut -c1-12)"
key="horovod${HOROVOD_VERSION}-${versions}-${HOROVOD_GPU_OPERATIONS:-cpu}-patch${patch_hash}"
key="${key//+/_}"
wheel_dir="$CACHE/wheels/$key"
stamp="$VENV/.horovod-build-key"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ]; then
    log "Horovod $key already installed"
else
    if ! ls "$wheel_dir"/horovod-*.whl >/dev/null 2>&1; then
        log "building Horovod $HOROVOD_VERSION ($key) from source; the wheel is cached in $wheel_dir"
        build="$(mktemp -d)"
        trap 'rm -rf "$build"' EXIT
        "$PY" -m pip download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$build"
        tar -xzf "$build/horovod-$HOROVOD_VERSION.tar.gz" -C "$build"
        src="$build/horovod-$HOROVOD_VERSION"
        "$PY" "$REPO/scripts/patch_horovod.py" "$src"
        mkdir -p "$build/wheel"
        (
            cd "$src"
            export PATH="/usr/bin:$PATH"  # Debian's cmake before any other
            export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
            export HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1
            export MAKEFLAGS="-j$(nproc)"
            "$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$build/wheel" . \
                > "$build/build.log" 2>&1 || { tail -40 "$build/build.log" >&2; die "Horovod build failed (log above)"; }
        )
        mkdir -p "$wheel_dir"
        # Publish atomically so a killed build never leaves a half-written wheel in the cache.
        for whl in "$build"/wheel/horovod-*.whl; do
            cp "$whl" "$wheel_dir/.tmp.$(basename "$whl")"
            sync "$wheel_dir/.tmp.$(basename "$whl")"
            mv "$wheel_dir/.tmp.$(basename "$whl")" "$wheel_dir/$(basename "$whl")"
        done
    else
        log "using cached Horovod wheel from $wheel_dir"
    fi
    # --no-deps: pip must not touch the frameworks; Horovod's own dependencies follow.
    pip_install --force-reinstall --no-deps "$wheel_dir"/horovod-*.whl
    echo "$key" > "$stamp"
fi
# Horovod's runtime deps as its metadata lists them (cffi, cloudpickle, psutil, pyyaml, packaging),
# framework extras left out; on every run, so a venv installed before a dependency was added gets it too.
mapfile -t horovod_deps < <("$PY" -c 'from importlib.metadata import requires
print("\n".join(r for r in requires("horovod") or () if "extra ==" not in r))')
[ ${#horovod_deps[@]} -eq 0 ] || pip_install "${horovod_deps[@]}"

# 4. Prove the build has every piece hvdtrain uses.
check="$(TF_CPP_MIN_LOG_LEVEL=3 "$VENV/bin/horovodrun" --check-build 2>/dev/null)"
echo "$check"
for part in PyTorch TensorFlow MPI Gloo; do
    echo "$check" | grep -q "\[X\] $part" || die "Horovod was built without $part (see --check-build above)"
done
if [ -n "${HOROVOD_GPU_OPERATIONS:-}" ]; then
    echo "$check" | grep -q "\[X\] NCCL" || die "HOROVOD_GPU_OPERATIONS=$HOROVOD_GPU_OPERATIONS but Horovod has no NCCL"
fi

# 5. Every process started from the venv selects tf-keras (Keras 2) before TensorFlow loads: Horovod 0.28.1's
#    TensorFlow bindings fail under Keras 3 (SyncBatchNormalization's `fused`, `.ref()` on Keras 3 variables),
#    in users' own Horovod scripts too, not only in hvdtrain's processes. A .pth file runs at interpreter
#    start; a value the user exported wins.
site_dir="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "import os; os.environ.setdefault('TF_USE_LEGACY_KERAS', '1')" > "$site_dir/hvdtrain-tf-keras.pth"

# 6. Every installed package has what it requires: a missing dependency fails here, not at import time.
"$PY" -m pip check --disable-pip-version-check 2> >(grep -v "is ignored: it is neither" >&2) \
    || die "pip check: missing or conflicting packages (listed above)"
log "ready: $VENV"
