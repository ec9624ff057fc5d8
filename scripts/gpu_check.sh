#!/usr/bin/env bash
# The GPU check of divkit's CUDA kernels and GPU paths, in two steps:
#
#   scripts/gpu_check.sh --prepare
#       on a development machine (Debian packages libhwy-dev, libopenblas-dev, nvcc on PATH):
#       copies Highway's and OpenBLAS's headers and libraries, and the CUDA sources (every
#       src/**/*.cu) compiled for sm_80 and sm_90 (for a GPU machine without nvcc), into the
#       git-ignored .gpu-deps/.
#   scripts/gpu_check.sh [OUT_DIR]
#       on the GPU machine (CUDA driver, Python with torch+CUDA, nanobind, CMake, ninja; no
#       package registry, no Debian dev packages): checks that torch sees a GPU (else stops at
#       once and says why), builds divkit against .gpu-deps/, checks that the build has CUDA,
#       runs the GPU tests (tests/gpu), compute-sanitizer memcheck on the small cases
#       (tests/gpu/memcheck_*.py) when it is installed, then the benchmarks: the fused heads
#       (bench/gpu_fused.py) and the token divergences (tests/gpu/bench_gpu.py). Writes logs,
#       gpu_check.json, gpu_fused_bench.{json,md} and gpu_bench.{json,md} into OUT_DIR (default:
#       $OUT, else gpu-check-out/). At most 470 s after the start (the last step is cut to fit).
#
# Time budget on one H100 with 16 cores (an estimate: nothing has run on a GPU yet): build
# <= 300 s cap (expected 1-2 min with nvcc, less with the prebuilt objects), tests <= 150 s
# (expected < 60 s), memcheck <= 150 s (every case in one process), fused benchmark <= 150 s
# (expected ~60 s, mostly Liger's Triton compiles), token benchmark: what is left before 470 s.
#
# Options: --build-only (configure and build, then stop; tests the build with the carried
# dependencies on a machine without a GPU); --dry-run (no GPU, no build: runs the test runner
# and both benchmarks in their --dry-run mode on CPU tensors with the divkit found on PYTHONPATH,
# and writes gpu_check.json and the tables, to test the script and its writers). Environment:
# PYTHON (default python3), GPU_CHECK_BUILD_TIMEOUT (seconds, default 300).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEPS="$ROOT/.gpu-deps"
PY="${PYTHON:-python3}"

# The CUDA sources of the library (compiled into the prebuilt archive by --prepare): every .cu
# under src/, so that a family's new kernel file needs no edit here.
mapfile -t CUDA_SOURCES < <(cd "$ROOT" && find src -name '*.cu' | sort)

sources_stamp() {
  # Everything the prebuilt CUDA objects depend on: the .cu files and the headers under src/
  # and include/.
  (cd "$ROOT" && cat "${CUDA_SOURCES[@]}" $(find src include \( -name '*.h' -o -name '*.cuh' \) | sort) | sha256sum |
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

# Results: one "key<TAB>value" line each in $RESULTS, written as JSON at the end by Python
# (values may hold any text: error messages, quotes).
RESULTS=""
record() { printf '%s\t%s\n' "$1" "$2" >>"$RESULTS"; }

write_json() {
  local out="$1"
  "$PY" - "$RESULTS" "$out/gpu_check.json" <<'PYEOF'
import json, sys
rows = [line.rstrip("\n").split("\t", 1) for line in open(sys.argv[1]) if "\t" in line]
result = {k: (int(v) if v.isdigit() else v) for k, v in rows}
with open(sys.argv[2], "w") as f:
    json.dump(result, f, indent=2)
    f.write("\n")
print(json.dumps(result, indent=2))
PYEOF
}

# Whether torch sees a CUDA device: prints the reason and fails when not.
gpu_visible() {
  "$PY" - <<'PYEOF'
import sys
try:
    import torch
except Exception as e:
    print(f"torch cannot be imported: {e!r}")
    sys.exit(1)
if not torch.cuda.is_available():
    print(f"no CUDA device visible to torch (torch {torch.__version__}, built for CUDA "
          f"{torch.version.cuda}; nvidia-smi and the driver decide what it sees)")
    sys.exit(1)
print(f"{torch.cuda.get_device_name(0)} (torch {torch.__version__}, CUDA {torch.version.cuda})")
PYEOF
}

check() {
  local out="$1" mode="$2"  # mode: full | build-only | dry-run
  mkdir -p "$out"
  RESULTS="$out/.gpu_check_results.tsv"
  : >"$RESULTS"
  local build_dir="$ROOT/build-gpu"
  local t0=$SECONDS status=0 reason
  record mode "$mode"
  log "machine: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
  nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || true
  if [ "$mode" = full ]; then
    # No GPU: stop before the build (minutes) and say why.
    if reason="$(gpu_visible 2>&1)"; then
      record gpu "$reason"
    else
      log "no GPU: $reason"
      record gpu "none: $reason"
      record status "failed: no GPU visible to torch"
      record total_s $((SECONDS - t0))
      write_json "$out"
      return 1
    fi
  fi
  if [ "$mode" = dry-run ]; then
    record build "skipped: dry run (the divkit on PYTHONPATH)"
  else
    log "build (log: build.log)"
    if timeout "${GPU_CHECK_BUILD_TIMEOUT:-300}" "$ROOT/scripts/gpu_check.sh" --build-into "$build_dir" >"$out/build.log" 2>&1; then
      record build ok
    else
      record build failed
      status=1
      tail -30 "$out/build.log"
    fi
    record build_s $((SECONDS - t0))
  fi
  export LD_LIBRARY_PATH="$DEPS/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  # The full check imports the tree it built; a dry run imports whatever divkit Python finds
  # (an installed wheel has no _C in the source tree, which would shadow it).
  if [ "$mode" != dry-run ]; then
    export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
  fi
  local built=0
  if [ "$status" = 0 ]; then
    if "$PY" -c "import divkit, divkit._C as C; print('divkit', divkit.__file__, 'cuda_built', C.cuda_built(), 'devices', C.cuda_devices()); raise SystemExit(0 if C.cuda_built() else 3)" >"$out/info.txt" 2>&1; then
      built=1
      record cuda_built yes
    else
      record cuda_built "no: $(tail -1 "$out/info.txt")"
      # The full check needs the CUDA kernels; a build without them would skip their tests.
      if [ "$mode" = full ]; then status=1; fi
    fi
    cat "$out/info.txt"
  fi
  if [ "$mode" = build-only ] || [ "$status" != 0 ]; then
    [ "$status" = 0 ] || record status "failed: build (see build.log, info.txt)"
    record total_s $((SECONDS - t0))
    write_json "$out"
    return $status
  fi
  local dry=()
  [ "$mode" = dry-run ] && dry=(--dry-run)

  log "GPU tests (log: tests.log)"
  local runner=("$PY" -m pytest "$ROOT/tests/gpu" -q -p no:cacheprovider -rs
    --junitxml="$out/tests.xml")
  # Without pytest on the machine: the stand-in runner of tests/gpu.
  "$PY" -c "import pytest" 2>/dev/null ||
    runner=("$PY" "$ROOT/tests/gpu/mini_pytest.py" "$ROOT"/tests/gpu/test_*.py)
  local t_tests=$SECONDS
  if timeout 150 "${runner[@]}" >"$out/tests.log" 2>&1; then
    record tests ok
  else
    record tests "failed (see tests.log)"
    status=1
  fi
  record tests_s $((SECONDS - t_tests))
  tail -5 "$out/tests.log"

  local cases=("$ROOT"/tests/gpu/memcheck_*.py)
  if [ "$mode" = dry-run ]; then
    record memcheck "skipped: dry run"
  elif ! command -v compute-sanitizer >/dev/null; then
    record memcheck "skipped: compute-sanitizer not installed"
  else
    # One process for all the cases: torch's CUDA start-up under the sanitizer costs tens of
    # seconds, paid once. Each case prints a line when done, so the log shows which one failed.
    log "compute-sanitizer memcheck: ${#cases[@]} cases in one process (log: memcheck.log)"
    local mc=ok
    if ! timeout 150 compute-sanitizer --tool memcheck --error-exitcode 3 "$PY" -c \
      'import runpy, sys; [runpy.run_path(p, run_name="__main__") for p in sys.argv[1:]]' \
      "${cases[@]}" >>"$out/memcheck.log" 2>&1; then
      mc="failed (see memcheck.log: the last 'case done' line precedes the failing case)"
      status=1
    fi
    record memcheck "$mc"
    tail -3 "$out/memcheck.log"
  fi

  local left budget
  left=$((470 - (SECONDS - t0)))
  budget=$((left / 2 < 150 ? left / 2 : 150))
  log "fused-head benchmark (log: bench_fused.log; budget ${budget} s)"
  if [ "$budget" -gt 20 ] && timeout $((budget + 30)) "$PY" "$ROOT/bench/gpu_fused.py" --out "$out" \
    --budget-s "$budget" ${dry[@]+"${dry[@]}"} >"$out/bench_fused.log" 2>&1; then
    record bench_fused ok
  else
    record bench_fused "failed or out of time (budget ${budget} s; see bench_fused.log)"
    status=1
  fi
  tail -14 "$out/bench_fused.log"

  left=$((470 - (SECONDS - t0)))
  log "token-divergence benchmark (log: bench.log; ${left} s left)"
  if [ "$left" -gt 60 ] && timeout "$left" "$PY" "$ROOT/tests/gpu/bench_gpu.py" --out "$out" \
    --budget-s $((left - 60)) ${dry[@]+"${dry[@]}"} >"$out/bench.log" 2>&1; then
    record bench ok
  else
    record bench "failed or out of time ($left s left; see bench.log)"
    status=1
  fi
  tail -12 "$out/bench.log"
  record status "$([ "$status" = 0 ] && echo ok || echo failed)"
  record total_s $((SECONDS - t0))
  write_json "$out"
  return $status
}

case "${1:-}" in
  --prepare) prepare ;;
  --build-only) check "${2:-${OUT:-$ROOT/gpu-check-out}}" build-only ;;
  --dry-run) check "${2:-${OUT:-$ROOT/gpu-check-out}}" dry-run ;;
  --build-into) build "$2" ;;
  -h | --help) sed -n 2,30p "$0" ;;
  -*)
    echo "gpu_check: unknown option $1 (see --help)" >&2
    exit 2
    ;;
  *) check "${1:-${OUT:-$ROOT/gpu-check-out}}" full ;;
esac
