#!/usr/bin/env bash
# The GPU check of divkit's CUDA kernels, in two steps:
#
#   scripts/gpu_check.sh --prepare
#       on a development machine (Debian packages libhwy-dev, libopenblas-dev, nvcc on PATH):
#       copies Highway's and OpenBLAS's headers and libraries, and the CUDA sources compiled
#       for sm_80 and sm_90 (for a GPU machine without nvcc), into the git-ignored .gpu-deps/.
#   scripts/gpu_check.sh [OUT_DIR]
#       on the GPU machine (CUDA driver, Python with torch+CUDA, nanobind, CMake, ninja; no
#       package registry, no Debian dev packages): builds divkit against .gpu-deps/, runs the GPU
#       tests (tests/gpu), compute-sanitizer memcheck on a small case when it is installed, and
#       the benchmark (tests/gpu/bench_gpu.py). Writes logs, gpu_check.json, gpu_bench.json and
#       gpu_bench.md into OUT_DIR (default: $OUT, else gpu-check-out/). About 8 minutes at most.
#
# Options for the check: --build-only (configure and build, then stop; used to test the build
# with the carried dependencies on a machine without a GPU). Environment: PYTHON (default
# python3), GPU_CHECK_BUILD_TIMEOUT (seconds, default 300).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEPS="$ROOT/.gpu-deps"
PY="${PYTHON:-python3}"

# The CUDA sources of the library (compiled into the prebuilt archive by --prepare).
CUDA_SOURCES=(src/core/cuda_runtime.cu src/divergence/divergence_cuda.cu)

sources_stamp() {
  # Everything the prebuilt CUDA objects depend on: the .cu files and the headers under src/
  # and include/.
  (cd "$ROOT" && cat "${CUDA_SOURCES[@]}" $(find src include -name '*.h' | sort) | sha256sum |
    cut -d' ' -f1)
}

prepare() {
  set -e
  local multiarch=x86_64-linux-gnu
  local lib=/usr/lib/$multiarch
  local blas_inc=/usr/include/$multiarch/openblas-pthread
  rm -rf "$DEPS"
  mkdir -p "$DEPS/include" "$DEPS/lib/pkgconfig" "$DEPS/bin"
  # Highway: headers and shared libraries (Debian ships no static libhwy).
  cp -r /usr/include/hwy "$DEPS/include/"
  cp -L "$lib/libhwy.so.1" "$lib/libhwy_contrib.so.1" "$DEPS/lib/"
  ln -s libhwy.so.1 "$DEPS/lib/libhwy.so"
  ln -s libhwy_contrib.so.1 "$DEPS/lib/libhwy_contrib.so"
  # OpenBLAS (CBLAS): headers, the shared library (36 MB; the static one is 58 MB) and the
  # Fortran runtime it needs.
  cp "$blas_inc"/*.h "$DEPS/include/"
  cp -L "$lib/libopenblas.so.0" "$DEPS/lib/"
  ln -s libopenblas.so.0 "$DEPS/lib/libopenblas.so"
  cp -L "$lib/libgfortran.so.5" "$lib/libquadmath.so.0" "$DEPS/lib/"
  local hwy_version
  hwy_version="$(pkg-config --modversion libhwy)"
  cat >"$DEPS/lib/pkgconfig/libhwy.pc" <<EOF
prefix=\${pcfiledir}/../..
Name: libhwy
Description: Highway (copied by gpu_check.sh --prepare)
Version: $hwy_version
Libs: -L\${prefix}/lib -lhwy
Cflags: -I\${prefix}/include -DHWY_SHARED_DEFINE
EOF
  cat >"$DEPS/lib/pkgconfig/libhwy-contrib.pc" <<EOF
prefix=\${pcfiledir}/../..
Name: libhwy-contrib
Description: Highway contrib (copied by gpu_check.sh --prepare)
Version: $hwy_version
Requires: libhwy
Libs: -L\${prefix}/lib -lhwy_contrib
Cflags: -I\${prefix}/include
EOF
  cat >"$DEPS/lib/pkgconfig/openblas.pc" <<EOF
prefix=\${pcfiledir}/../..
Name: openblas
Description: OpenBLAS (copied by gpu_check.sh --prepare)
Version: $(pkg-config --modversion openblas)
Libs: -L\${prefix}/lib -lopenblas
Cflags: -I\${prefix}/include
EOF
  # pkg-config itself (CMake finds the libraries through it), in case the GPU machine lacks it.
  local pkgconf
  pkgconf="$(readlink -f "$(command -v pkg-config)")"
  cp -L "$pkgconf" "$DEPS/bin/pkg-config"
  for so in $(ldd "$pkgconf" | awk '/libpkgconf/ {print $3}'); do cp -L "$so" "$DEPS/lib/"; done
  # The CUDA sources compiled here, for a GPU machine without nvcc.
  if command -v nvcc >/dev/null; then
    local obj="$DEPS/obj"
    mkdir -p "$obj"
    for src in "${CUDA_SOURCES[@]}"; do
      nvcc -std=c++20 -O3 -DNDEBUG -DDIVKIT_HAS_CUDA=1 --expt-relaxed-constexpr \
        -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
        -gencode arch=compute_90,code=compute_90 -Xcompiler=-fPIC \
        -Werror all-warnings -Xcompiler=-Wall,-Wextra,-Wno-unused-parameter,-Werror \
        -I"$ROOT/src" -I"$ROOT/include" -c "$ROOT/$src" -o "$obj/$(basename "$src").o"
    done
    ar rcs "$DEPS/lib/libdivkit_cuda.a" "$obj"/*.o
    rm -rf "$obj"
    # The toolkit's root, from nvcc's own report (nvcc may be a wrapper script on PATH).
    local top
    top="$(nvcc -v -x cu -E /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)"
    cp -L "$(find "$top/" -name libcudart_static.a | head -1)" "$DEPS/lib/"
    sources_stamp >"$DEPS/cuda_sources.sha256"
  else
    echo "gpu_check --prepare: no nvcc here; the GPU machine must have nvcc" >&2
  fi
  du -sh "$DEPS"
  echo "prepared $DEPS (carry it with the tree: carry=[\".gpu-deps\"])"
}

log() { echo "[gpu_check $(date -u +%H:%M:%S)] $*"; }

build() {
  local build_dir="$1"
  [ -d "$DEPS" ] || {
    echo "gpu_check: $DEPS is missing; run scripts/gpu_check.sh --prepare first" >&2
    return 1
  }
  export PKG_CONFIG_PATH="$DEPS/lib/pkgconfig"
  export PKG_CONFIG_LIBDIR="$DEPS/lib/pkgconfig"  # only the carried packages
  export LD_LIBRARY_PATH="$DEPS/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  local pkgconfig_exe
  pkgconfig_exe="$(command -v pkg-config || echo "$DEPS/bin/pkg-config")"
  local cuda_args=(-DDIVKIT_CUDA=ON)
  if ! command -v nvcc >/dev/null; then
    [ -f "$DEPS/lib/libdivkit_cuda.a" ] || {
      echo "gpu_check: no nvcc and no prebuilt $DEPS/lib/libdivkit_cuda.a" >&2
      return 1
    }
    if [ "$(sources_stamp)" != "$(cat "$DEPS/cuda_sources.sha256")" ]; then
      echo "gpu_check: the CUDA sources changed since --prepare; rerun it" >&2
      return 1
    fi
    cuda_args=(-DDIVKIT_CUDA=OFF -DDIVKIT_CUDA_PREBUILT="$DEPS/lib/libdivkit_cuda.a"
      -DDIVKIT_CUDA_PREBUILT_RUNTIME="$DEPS/lib/libcudart_static.a")
  fi
  local nanobind_dir
  nanobind_dir="$("$PY" -m nanobind --cmake_dir)" || return 1
  cmake -S "$ROOT" -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DDIVKIT_NATIVE_SIMD=ON -DDIVKIT_BUILD_TESTS=OFF -DDIVKIT_BUILD_BENCH=OFF \
    -DDIVKIT_BUILD_PYTHON=ON -DPython_EXECUTABLE="$(command -v "$PY")" \
    -Dnanobind_DIR="$nanobind_dir" -DCMAKE_PREFIX_PATH="$DEPS" -Dhwy_DIR=/nonexistent \
    -DPKG_CONFIG_EXECUTABLE="$pkgconfig_exe" -DCMAKE_BUILD_RPATH="$DEPS/lib" \
    "${cuda_args[@]}" || return 1
  cmake --build "$build_dir" -j "$(nproc)" || return 1
  ln -sf "$build_dir"/src/python/_C*.so "$ROOT/python/divkit/"
}

check() {
  local out="$1" build_only="$2"
  mkdir -p "$out"
  local build_dir="$ROOT/build-gpu"
  local t0=$SECONDS status=0
  declare -A result
  log "machine: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
  nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || true
  log "build (log: build.log)"
  if timeout "${GPU_CHECK_BUILD_TIMEOUT:-300}" "$ROOT/scripts/gpu_check.sh" --build-into "$build_dir" >"$out/build.log" 2>&1; then
    result[build]=ok
  else
    result[build]=failed
    status=1
    tail -30 "$out/build.log"
  fi
  result[build_s]=$((SECONDS - t0))
  export LD_LIBRARY_PATH="$DEPS/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
  if [ "${result[build]}" = ok ]; then
    "$PY" -c "import divkit, divkit._C as C; print('divkit', divkit.__file__, 'cuda_built', C.cuda_built(), 'devices', C.cuda_devices())" 2>&1 | tee "$out/info.txt"
  fi
  if [ "$build_only" = 1 ] || [ "${result[build]}" != ok ]; then
    :
  else
    log "GPU tests (log: tests.log)"
    local runner=("$PY" -m pytest "$ROOT/tests/gpu" -q -p no:cacheprovider
      --junitxml="$out/tests.xml")
    # Without pytest on the machine: the stand-in runner of tests/gpu.
    "$PY" -c "import pytest" 2>/dev/null ||
      runner=("$PY" "$ROOT/tests/gpu/mini_pytest.py" "$ROOT"/tests/gpu/test_*.py)
    if timeout 150 "${runner[@]}" >"$out/tests.log" 2>&1; then
      result[tests]=ok
    else
      result[tests]=failed
      status=1
    fi
    tail -5 "$out/tests.log"
    if command -v compute-sanitizer >/dev/null; then
      log "compute-sanitizer memcheck (log: memcheck.log)"
      if timeout 90 compute-sanitizer --tool memcheck --error-exitcode 3 \
        "$PY" "$ROOT/tests/gpu/memcheck_case.py" >"$out/memcheck.log" 2>&1; then
        result[memcheck]=ok
      else
        result[memcheck]=failed
        status=1
      fi
      tail -3 "$out/memcheck.log"
    else
      result[memcheck]="skipped: compute-sanitizer not installed"
    fi
    log "benchmark (log: bench.log)"
    local left=$((470 - (SECONDS - t0)))
    if [ "$left" -gt 60 ] && timeout "$left" "$PY" "$ROOT/tests/gpu/bench_gpu.py" --out "$out" \
      --budget-s $((left - 60)) >"$out/bench.log" 2>&1; then
      result[bench]=ok
    else
      result[bench]="failed or out of time ($left s left)"
      status=1
    fi
    tail -12 "$out/bench.log"
  fi
  result[total_s]=$((SECONDS - t0))
  {
    echo "{"
    local first=1
    for k in "${!result[@]}"; do
      [ $first = 1 ] || echo ","
      first=0
      printf '  "%s": "%s"' "$k" "${result[$k]}"
    done
    echo
    echo "}"
  } >"$out/gpu_check.json"
  cat "$out/gpu_check.json"
  return $status
}

case "${1:-}" in
  --prepare) prepare ;;
  --build-only) check "${2:-${OUT:-$ROOT/gpu-check-out}}" 1 ;;
  --build-into) build "$2" ;;
  -h | --help) sed -n 2,17p "$0" ;;
  *) check "${1:-${OUT:-$ROOT/gpu-check-out}}" 0 ;;
esac
