#!/usr/bin/env bash
# Build and install Horovod 0.28.1 (PyTorch + Gloo, no MPI) into a Python env.
#
# Why a patch is needed: 0.28.1 is Horovod's last release and pins C++14 in
# both CMakeLists.txt and horovod/torch/CMakeLists.txt, but torch >= 2.1 headers
# need C++17. Patching only the torch file breaks the link (duplicate
# gloo::rendezvous::Store::kDefaultTimeout), so both are switched to C++17; the
# CUDA kernels' C++11 is raised to C++17 too (GCC 14 host compilers reject 11).
#
# Current toolchains need three more things, all applied on every build:
#   - cffi importable before setup.py runs (it is in Horovod's setup_requires,
#     which setuptools can no longer fetch by itself);
#   - CMAKE_POLICY_VERSION_MINIMUM=3.5: the vendored gloo declares
#     cmake_minimum_required(2.8.12), which CMake 4 refuses;
#   - the standard headers GCC 13 no longer includes transitively (<cstdint>,
#     <stdexcept>, <string>, ...), force-included into every C++ file through
#     CXXFLAGS (harmless on older GCC).
# Each step says what it does; a failed step names itself, the first compiler
# errors and, where it recognises them, the cause and the fix.
#
# Usage: scripts/build_horovod.sh [PYTHON]
#   PYTHON defaults to <repo root>/.venv/bin/python; torch must already be
#   installed there (the Horovod extension is compiled against it).
#
# Environment:
#   SPARKML_DIST_CACHE      cache root (default ~/.cache/sparkml_dist); built
#                           wheels go to $SPARKML_DIST_CACHE/wheels, build logs
#                           to $SPARKML_DIST_CACHE.
#   MAKEFLAGS               -j2 unless it names a job count.
#   HOROVOD_FORCE_BUILD=1   ignore the installed and cached wheels and build.
#   HOROVOD_GPU_OPERATIONS  passed through to the build. A GPU cluster builds
#   HOROVOD_NCCL_HOME       with HOROVOD_GPU_OPERATIONS=NCCL (and, if NCCL is
#   HOROVOD_CUDA_HOME       not in a default location, HOROVOD_NCCL_HOME).
#                           When HOROVOD_GPU_OPERATIONS=NCCL is set, a cached or
#                           installed wheel without NCCL support is rebuilt, and
#                           the build needs nvcc (on PATH or in HOROVOD_CUDA_HOME)
#                           and a CUDA build of torch.
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

# Horovod's requirements (cffi: for setup.py too); installed normally if absent.
install_runtime_deps() {
    local missing=()
    local pair module package
    for pair in cloudpickle:cloudpickle psutil:psutil yaml:pyyaml packaging:packaging cffi:cffi; do
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

force_build="${HOROVOD_FORCE_BUILD:-0}"

# 1. Nothing to do if a usable Horovod is already installed.
if [[ "$force_build" != 1 ]] && horovod_ok; then
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
if [[ "$force_build" != 1 ]] && ((${#cached[@]})); then
    install_wheel "${cached[0]}"
    if horovod_ok; then
        report_success
        exit 0
    fi
    # Typically: wheel compiled against another torch version (ABI mismatch),
    # or a CPU-only wheel while NCCL was requested.
    log "cached wheel ${cached[0]} does not work with this environment; rebuilding"
fi

# 3. Build from the sdist, one named step at a time.
current_step=""
step() { current_step="$1"; log "step: $1"; }

# Known causes, recognised in the build log (extended regexps), with their fix; one per line,
# pattern and message separated by a tab.
known_causes() {
    local gxx
    gxx="$(g++ -dumpfullversion 2>/dev/null || echo "this g++")"
    cat <<EOF
Compatibility with CMake < 3.5 has been removed	CMake 4 refuses gloo's old cmake_minimum_required even with CMAKE_POLICY_VERSION_MINIMUM=${CMAKE_POLICY_VERSION_MINIMUM:-unset}; use CMake 3.x (pip install 'cmake<4') or a CMake >= 4.0, which reads that variable
is not a member of 'std'|'u?int(8|16|32|64)_t' (was not declared|does not name a type)|'std::string' has not been declared	a standard header is missing for this GCC; the force-included ones are '${std_headers:-none}': add the one the error names to HOROVOD_EXTRA_HEADERS
No module named '?cffi	cffi is not importable by $PYTHON: $PYTHON -m pip install cffi
unsupported GNU version|unsupported (host )?compiler	this nvcc does not support g++ $gxx; point CUDAHOSTCXX at a g++ it supports
nccl\.h: No such file|Could NOT find NCCL|cannot find -lnccl	NCCL not found: set HOROVOD_NCCL_HOME to the folder holding include/nccl.h and lib/libnccl.so
No CMAKE_CUDA_COMPILER could be found|nvcc: (command )?not found	nvcc not found: put the CUDA toolkit's bin on PATH or set HOROVOD_CUDA_HOME
Killed signal terminated program	the compiler ran out of memory: lower MAKEFLAGS (e.g. -j1)
EOF
}

diagnose() {
    local pattern message
    while IFS=$'\t' read -r pattern message; do
        if grep -qE "$pattern" "$1"; then echo "$message"; fi
    done < <(known_causes)
}

fail() {
    local why="$1"
    printf '[build_horovod] ERROR: step "%s" failed: %s\n' "$current_step" "$why" >&2
    if [[ -s "$build_log" ]]; then
        local errors
        errors="$(grep -m8 -E "(error|Error|ERROR)[: ]" "$build_log" || true)"
        if [[ -n "$errors" ]]; then
            printf '[build_horovod] first errors in %s:\n%s\n' "$build_log" "$errors" >&2
        else
            printf '[build_horovod] last lines of %s:\n' "$build_log" >&2
            tail -n 15 "$build_log" >&2
        fi
        local cause
        cause="$(diagnose "$build_log")"
        [[ -n "$cause" ]] && printf '[build_horovod] likely cause and fix: %s\n' "$cause" >&2
    fi
    exit 1
}

: >"$build_log"
step "checking build tools"
missing_tools=()
for tool in gcc g++ cmake; do
    command -v "$tool" >/dev/null 2>&1 || missing_tools+=("$tool")
done
if ((${#missing_tools[@]})); then
    fail "missing build tools: ${missing_tools[*]}. On Debian/Ubuntu install them with: apt-get install -y build-essential cmake"
fi
cmake_version="$(cmake --version | head -n1 | awk '{print $3}')"
gcc_version="$(g++ -dumpfullversion 2>/dev/null || g++ -dumpversion)"
log "cmake $cmake_version, g++ $gcc_version"
if [[ "${HOROVOD_GPU_OPERATIONS:-}" == [Nn][Cc][Cc][Ll] ]]; then
    nvcc_bin="$(command -v nvcc || true)"
    [[ -z "$nvcc_bin" && -n "${HOROVOD_CUDA_HOME:-}" && -x "$HOROVOD_CUDA_HOME/bin/nvcc" ]] \
        && nvcc_bin="$HOROVOD_CUDA_HOME/bin/nvcc"
    [[ -n "$nvcc_bin" ]] \
        || fail "HOROVOD_GPU_OPERATIONS=NCCL needs nvcc: put the CUDA toolkit's bin on PATH or set HOROVOD_CUDA_HOME"
    log "nvcc: $nvcc_bin ($("$nvcc_bin" --version | grep -o 'release [0-9.]*' || echo 'version unknown'))"
    torch_cuda="$("$PYTHON" -c 'import torch; print(torch.version.cuda or "")' 2>/dev/null || true)"
    [[ -n "$torch_cuda" ]] \
        || fail "HOROVOD_GPU_OPERATIONS=NCCL needs a CUDA build of torch, but $PYTHON has a CPU-only torch"
    log "torch built with CUDA $torch_cuda"
fi

# The toolchain fixes (see the header).
export CMAKE_POLICY_VERSION_MINIMUM="${CMAKE_POLICY_VERSION_MINIMUM:-3.5}"
std_headers="cstdint stdexcept string limits ${HOROVOD_EXTRA_HEADERS:-}"
include_flags=""
for h in $std_headers; do include_flags+=" -include $h"; done
export CXXFLAGS="${CXXFLAGS:-}${include_flags}"
log "CMAKE_POLICY_VERSION_MINIMUM=$CMAKE_POLICY_VERSION_MINIMUM; CXXFLAGS=$CXXFLAGS"
"$PYTHON" -c "import cffi" >/dev/null 2>&1 \
    || fail "cffi is not importable by $PYTHON (Horovod's setup.py needs it): $PYTHON -m pip install cffi"

work_dir="$(mktemp -d "${TMPDIR:-/tmp}/build_horovod.XXXXXX")"
trap 'rm -rf "$work_dir"' EXIT

log "building horovod $HOROVOD_VERSION from source (several minutes); log: $build_log"
start_s=$SECONDS

step "downloading the horovod $HOROVOD_VERSION sdist"
"$PYTHON" -m pip download --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" \
        -d "$work_dir/sdist" >>"$build_log" 2>&1 \
    || fail "pip could not download horovod==$HOROVOD_VERSION (network or index settings)"

shopt -s nullglob
sdists=("$work_dir/sdist/horovod-${HOROVOD_VERSION}.tar.gz")
shopt -u nullglob
((${#sdists[@]})) && [[ -f "${sdists[0]}" ]] \
    || fail "pip did not produce horovod-${HOROVOD_VERSION}.tar.gz"
mkdir -p "$work_dir/src"
tar -xzf "${sdists[0]}" -C "$work_dir/src" || fail "the sdist does not unpack"
src_dir="$work_dir/src/horovod-${HOROVOD_VERSION}"
[[ -d "$src_dir" ]] || fail "unexpected sdist layout: $src_dir missing"

step "patching CMake files for C++17"
cmake_files=("$src_dir/CMakeLists.txt" "$src_dir/horovod/torch/CMakeLists.txt")
for f in "${cmake_files[@]}"; do
    [[ -f "$f" ]] || fail "expected file missing from sdist: $f"
    sed -i -E \
        -e 's/(CMAKE_CXX_STANDARD[[:space:]]+)14([^0-9]|$)/\117\2/g' \
        -e 's/-std=c\+\+14/-std=c++17/g' \
        "$f"
    if grep -nE 'CMAKE_CXX_STANDARD[[:space:]]+14([^0-9]|$)|c\+\+14' "$f"; then
        fail "C++14 setting still present in $f after patching"
    fi
    grep -qE 'CMAKE_CXX_STANDARD[[:space:]]+17' "$f" \
        || fail "patch did not apply: no CMAKE_CXX_STANDARD 17 in $f (sdist changed?)"
done
cuda_cmake="$src_dir/horovod/common/ops/cuda/CMakeLists.txt"
[[ -f "$cuda_cmake" ]] || fail "expected file missing from sdist: $cuda_cmake"
sed -i -E 's/(CMAKE_CUDA_STANDARD[[:space:]]+)11([^0-9]|$)/\117\2/' "$cuda_cmake"
grep -qE 'CMAKE_CUDA_STANDARD[[:space:]]+17' "$cuda_cmake" \
    || fail "patch did not apply: no CMAKE_CUDA_STANDARD 17 in $cuda_cmake (sdist changed?)"

# Called from a recipe of `make VAR=value ...`, MAKEFLAGS holds the caller's flags and
# variables (nothing the compile needs) but no job count: then the compile gets -j2 alone.
make_flags="${MAKEFLAGS:-}"
[[ " $make_flags" =~ [[:space:]](-j|--jobs)|^[[:space:]][a-zA-Z]*j ]] || make_flags="-j2"
step "compiling (MAKEFLAGS=$make_flags)"
if ! env \
        HOROVOD_WITH_PYTORCH=1 \
        HOROVOD_WITH_GLOO=1 \
        HOROVOD_WITHOUT_MPI=1 \
        HOROVOD_WITHOUT_TENSORFLOW=1 \
        HOROVOD_WITHOUT_MXNET=1 \
        MAKEFLAGS="$make_flags" \
        "$PYTHON" -m pip wheel --no-build-isolation --no-deps -v \
            -w "$work_dir/dist" "$src_dir" >>"$build_log" 2>&1; then
    fail "the compile failed after $((SECONDS - start_s)) s"
fi

shopt -s nullglob
built=("$work_dir/dist/horovod-${HOROVOD_VERSION}-"*.whl)
shopt -u nullglob
((${#built[@]} == 1)) || fail "expected exactly one horovod wheel in $work_dir/dist"
log "build finished in $((SECONDS - start_s)) s"

step "caching and installing the wheel"
cp -f "${built[0]}" "$wheel_dir/"
wheel="$wheel_dir/$(basename "${built[0]}")"
log "cached $wheel"

install_wheel "$wheel"
horovod_ok || fail "horovod installed but 'import horovod.torch' fails or lacks Gloo/NCCL support"
report_success
