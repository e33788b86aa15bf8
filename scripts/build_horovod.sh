#!/usr/bin/env bash
# Build and install Horovod 0.28.1 (PyTorch + Gloo, no MPI) into a Python env.
#
# Why a patch is needed: 0.28.1 is Horovod's last release and pins C++14 in
# both CMakeLists.txt and horovod/torch/CMakeLists.txt, but torch >= 2.1 headers
# need C++17. Patching only the torch file breaks the link (duplicate
# gloo::rendezvous::Store::kDefaultTimeout), so both are switched to C++17.
#
# Usage: scripts/build_horovod.sh [PYTHON]
#   PYTHON defaults to <repo root>/.venv/bin/python; torch must already be
#   installed there (the Horovod extension is compiled against it).
#
# Environment:
#   SPARKML_DIST_CACHE      cache root (default ~/.cache/sparkml_dist); built
#                           wheels go to $SPARKML_DIST_CACHE/wheels, build logs
#                           to $SPARKML_DIST_CACHE.
#   MAKEFLAGS               defaults to -j2.
#   HOROVOD_GPU_OPERATIONS  passed through to the build. A GPU cluster builds
#   HOROVOD_NCCL_HOME       with HOROVOD_GPU_OPERATIONS=NCCL (and, if NCCL is
#   HOROVOD_CUDA_HOME       not in a default location, HOROVOD_NCCL_HOME).
#                           When HOROVOD_GPU_OPERATIONS=NCCL is set, a cached or
#                           installed wheel without NCCL support is rebuilt.
set -euo pipefail

readonly HOROVOD_VERSION="0.28.1"

log() { printf '[build_horovod] %s\n' "$*" >&2; }
die() { printf '[build_horovod] ERROR: %s\n' "$*" >&2; exit 1; }

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python_arg="${1:-$repo_root/.venv/bin/python}"
# Accept a bare command name (e.g. python3) as well as a path.
if [[ "$python_arg" != */* ]]; then
    python_arg="$(command -v "$python_arg" || true)"
fi
[[ -n "$python_arg" && -x "$python_arg" ]] \
    || die "Python interpreter not found or not executable: ${1:-$repo_root/.venv/bin/python}"
# Absolute path without resolving symlinks (a venv's python is a symlink and
# must stay the venv's python).
PYTHON="$(cd "$(dirname "$python_arg")" && pwd)/$(basename "$python_arg")"

cache_dir="${SPARKML_DIST_CACHE:-$HOME/.cache/sparkml_dist}"
wheel_dir="$cache_dir/wheels"
mkdir -p "$wheel_dir"

py_tag="$("$PYTHON" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')"
build_log="$cache_dir/build_horovod-${HOROVOD_VERSION}-${py_tag}.log"

# Pass GPU build settings through explicitly (only when the caller set them).
for var in HOROVOD_GPU_OPERATIONS HOROVOD_NCCL_HOME HOROVOD_CUDA_HOME; do
    if [[ -n "${!var:-}" ]]; then
        export "${var?}"
        log "passing $var=${!var} to the build"
    fi
done

# Succeeds when horovod.torch imports, is the expected version, was built
# with Gloo and, if NCCL was requested, with NCCL.
horovod_ok() {
    HVD_EXPECTED_VERSION="$HOROVOD_VERSION" "$PYTHON" - <<'EOF' >/dev/null 2>&1
import os, sys
import horovod
import horovod.torch as hvd  # horovod.torch has no __version__ of its own
if horovod.__version__ != os.environ["HVD_EXPECTED_VERSION"]:
    sys.exit(1)
if not hvd.gloo_built():
    sys.exit(1)
if os.environ.get("HOROVOD_GPU_OPERATIONS", "").upper() == "NCCL" and not hvd.nccl_built():
    sys.exit(1)
EOF
}

# Horovod's runtime requirements; installed normally (with their deps) if absent.
install_runtime_deps() {
    local missing=()
    local pair module package
    for pair in cloudpickle:cloudpickle psutil:psutil yaml:pyyaml packaging:packaging; do
        module="${pair%%:*}"
        package="${pair#*:}"
        if ! "$PYTHON" -c "import $module" >/dev/null 2>&1; then
            missing+=("$package")
        fi
    done
    if ((${#missing[@]})); then
        log "installing Horovod runtime dependencies: ${missing[*]}"
        "$PYTHON" -m pip install "${missing[@]}"
    fi
}

install_wheel() {
    log "installing $(basename "$1")"
    "$PYTHON" -m pip install --no-deps --force-reinstall "$1"
}

report_success() {
    "$PYTHON" -c "import horovod, horovod.torch as hvd; print('horovod', horovod.__version__, 'with torch + gloo OK in', '$PYTHON')"
}

# 1. Nothing to do if a usable Horovod is already installed.
if horovod_ok; then
    log "horovod $HOROVOD_VERSION already importable in $PYTHON; nothing to do"
    report_success
    exit 0
fi

"$PYTHON" -c "import torch" >/dev/null 2>&1 \
    || die "torch is not importable with $PYTHON; install torch first (Horovod compiles against it)"

install_runtime_deps

# 2. Reuse a cached wheel for this Python tag, if there is one and it works.
shopt -s nullglob
cached=("$wheel_dir/horovod-${HOROVOD_VERSION}-${py_tag}-${py_tag}-"*.whl)
shopt -u nullglob
if ((${#cached[@]})); then
    install_wheel "${cached[0]}"
    if horovod_ok; then
        report_success
        exit 0
    fi
    # Typically: wheel compiled against another torch version (ABI mismatch),
    # or a CPU-only wheel while NCCL was requested.
    log "cached wheel ${cached[0]} does not work with this environment; rebuilding"
fi

# 3. Build from the sdist.
missing_tools=()
for tool in gcc g++ cmake; do
    command -v "$tool" >/dev/null 2>&1 || missing_tools+=("$tool")
done
if ((${#missing_tools[@]})); then
    die "missing build tools: ${missing_tools[*]}. On Debian/Ubuntu install them with: apt-get install -y build-essential cmake"
fi

work_dir="$(mktemp -d "${TMPDIR:-/tmp}/build_horovod.XXXXXX")"
trap 'rm -rf "$work_dir"' EXIT

: >"$build_log"
log "building horovod $HOROVOD_VERSION from source (several minutes); log: $build_log"
start_s=$SECONDS

log "downloading the horovod $HOROVOD_VERSION sdist"
"$PYTHON" -m pip download --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" \
        -d "$work_dir/sdist" >>"$build_log" 2>&1 \
    || die "downloading the horovod sdist failed; see $build_log"

shopt -s nullglob
sdists=("$work_dir/sdist/horovod-${HOROVOD_VERSION}.tar.gz")
shopt -u nullglob
((${#sdists[@]})) && [[ -f "${sdists[0]}" ]] \
    || die "pip did not produce horovod-${HOROVOD_VERSION}.tar.gz; see $build_log"
mkdir -p "$work_dir/src"
tar -xzf "${sdists[0]}" -C "$work_dir/src"
src_dir="$work_dir/src/horovod-${HOROVOD_VERSION}"
[[ -d "$src_dir" ]] || die "unexpected sdist layout: $src_dir missing"

log "patching CMake files for C++17"
cmake_files=("$src_dir/CMakeLists.txt" "$src_dir/horovod/torch/CMakeLists.txt")
for f in "${cmake_files[@]}"; do
    [[ -f "$f" ]] || die "expected file missing from sdist: $f"
    sed -i -E \
        -e 's/(CMAKE_CXX_STANDARD[[:space:]]+)14([^0-9]|$)/\117\2/g' \
        -e 's/-std=c\+\+14/-std=c++17/g' \
        "$f"
    if grep -nE 'CMAKE_CXX_STANDARD[[:space:]]+14([^0-9]|$)|c\+\+14' "$f"; then
        die "C++14 setting still present in $f after patching"
    fi
    grep -qE 'CMAKE_CXX_STANDARD[[:space:]]+17' "$f" \
        || die "patch did not apply: no CMAKE_CXX_STANDARD 17 in $f (sdist changed?)"
done

log "compiling (MAKEFLAGS=${MAKEFLAGS:--j2})"
if ! env \
        HOROVOD_WITH_PYTORCH=1 \
        HOROVOD_WITH_GLOO=1 \
        HOROVOD_WITHOUT_MPI=1 \
        HOROVOD_WITHOUT_TENSORFLOW=1 \
        HOROVOD_WITHOUT_MXNET=1 \
        MAKEFLAGS="${MAKEFLAGS:--j2}" \
        "$PYTHON" -m pip wheel --no-build-isolation --no-deps -v \
            -w "$work_dir/dist" "$src_dir" >>"$build_log" 2>&1; then
    die "horovod build failed after $((SECONDS - start_s)) s; see $build_log"
fi

shopt -s nullglob
built=("$work_dir/dist/horovod-${HOROVOD_VERSION}-"*.whl)
shopt -u nullglob
((${#built[@]} == 1)) || die "expected exactly one horovod wheel in $work_dir/dist; see $build_log"
log "build finished in $((SECONDS - start_s)) s"

cp -f "${built[0]}" "$wheel_dir/"
wheel="$wheel_dir/$(basename "${built[0]}")"
log "cached $wheel"

install_wheel "$wheel"
horovod_ok || die "horovod installed but 'import horovod.torch' fails or lacks Gloo/NCCL support; see $build_log"
report_success
