#!/usr/bin/env bash
# Installs everything (scripts/install.sh), then runs every test:
#   1. C++: configure and build (Release, build/), then ctest (GoogleTest);
#   2. the C++ consumer path: cmake --install into build/install-prefix, then examples/cpp is
#      configured with find_package(divkit) against that prefix, built and run;
#   3. Python: pytest tests/python against the package installed in .venv.
# Exits non-zero on the first failure. Extra arguments go to pytest (e.g. -x, -k jsd).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"

timings=()
current=""
phase() {  # phase NAME COMMAND...: runs COMMAND, records its wall time
  current="$1"
  shift
  local start=$SECONDS
  echo "=== [tests] $current"
  "$@"
  timings+=("$(printf '  %-46s %5ds' "$current" $((SECONDS - start)))")
}
report() {
  local rc=$?
  echo "=== [tests] timings"
  ((${#timings[@]} == 0)) || printf '%s\n' "${timings[@]}"
  if ((rc != 0)); then
    echo "=== [tests] FAILED in: $current (exit status $rc)" >&2
  else
    echo "=== [tests] all passed"
  fi
}
trap report EXIT

phase "install (scripts/install.sh)" bash scripts/install.sh

# Keep the generator of an existing build tree; otherwise prefer Ninja when it is on PATH.
generator=()
if [[ ! -f build/CMakeCache.txt ]] && command -v ninja >/dev/null 2>&1; then
  generator=(-G Ninja)
fi
phase "C++ configure (build/, Release)" \
  cmake -S . -B build "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DDIVKIT_BUILD_TESTS=ON -DDIVKIT_BUILD_BENCH=ON -DDIVKIT_BUILD_PYTHON=OFF \
    -DDIVKIT_SANITIZE=OFF
phase "C++ build" cmake --build build
phase "C++ tests (ctest)" ctest --test-dir build --output-on-failure

prefix="$ROOT/build/install-prefix"
consumer() {
  rm -rf "$prefix" build/examples-cpp
  cmake --install build --prefix "$prefix" >/dev/null
  cmake -S examples/cpp -B build/examples-cpp "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_PREFIX_PATH="$prefix" >/dev/null
  cmake --build build/examples-cpp
  build/examples-cpp/distill_logits
}
phase "C++ consumer (examples/cpp via find_package)" consumer

phase "Python tests (pytest tests/python)" .venv/bin/python -m pytest tests/python -q "$@"
