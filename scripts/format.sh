#!/usr/bin/env bash
# Formats the whole tree, or checks that it is formatted (CI):
#   C++ / CUDA (*.h *.cc *.cu *.cuh under src include tests bench examples): clang-format 14
#     with .clang-format;
#   Python (python tests bench scripts examples): ruff 0.17.6 with ruff.toml: `ruff check --fix`
#     (safe fixes only: import order, unused imports), then `ruff format`.
# Usage:
#   scripts/format.sh           rewrite the files in place, then list any lint finding left
#   scripts/format.sh --check   change nothing; exit 1 if a file is not formatted or ruff check
#                               reports a finding (prints the files and their diffs)
# The tools are installed when missing, pinned because each version formats a little
# differently: clang-format 14 from Debian (package clang-format-14, Debian 12's clang-format;
# apt-get update runs only then, as root or through sudo), ruff from PyPI into .venv (created
# like scripts/install.sh does if absent).
# Environment:
#   DIVKIT_PYTHON     interpreter that creates .venv when it is absent (default: python3)
#   DIVKIT_SKIP_APT=1 never call apt-get (clang-format 14 must then be on PATH)
#   CLANG_FORMAT      the clang-format 14 binary to use (default: clang-format-14, else a
#                     clang-format whose version is 14)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CLANG_FORMAT_MAJOR=14
RUFF_VERSION=0.17.6
PYTHON="${DIVKIT_PYTHON:-python3}"
CXX_DIRS=(src include tests bench examples)
CXX_GLOBS=('*.h' '*.cc' '*.cu' '*.cuh')
PY_DIRS=(python tests bench scripts examples)

check=0
case "${1:-}" in
  "") ;;
  --check) check=1 ;;
  -h | --help)
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
    ;;
  *)
    echo "usage: scripts/format.sh [--check]" >&2
    exit 2
    ;;
esac

log() { printf '[format] %s\n' "$*"; }

# --- tools ------------------------------------------------------------------------------------
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
apt_install() {  # apt_install PACKAGE...: as scripts/install.sh does it
  if [[ "${DIVKIT_SKIP_APT:-0}" == 1 ]]; then
    echo "[format] error: $* missing, and DIVKIT_SKIP_APT=1" >&2
    exit 1
  fi
  local as_root
  if [[ "$(id -u)" == 0 ]]; then
    as_root=(env DEBIAN_FRONTEND=noninteractive)
  elif command -v sudo >/dev/null 2>&1; then
    as_root=(sudo env DEBIAN_FRONTEND=noninteractive)
  else
    echo "[format] error: Debian packages missing ($*), and neither root nor sudo" >&2
    exit 1
  fi
  log "apt-get install $*"
  "${as_root[@]}" apt-get update
  "${as_root[@]}" apt-get install -y --no-install-recommends "$@"
}
major_of() { "$1" --version 2>/dev/null | sed -n 's/.*version \([0-9][0-9]*\)\..*/\1/p' | head -1; }
find_clang_format() {
  local c
  for c in ${CLANG_FORMAT:-} "clang-format-$CLANG_FORMAT_MAJOR" clang-format; do
    if command -v "$c" >/dev/null 2>&1 && [[ "$(major_of "$c")" == "$CLANG_FORMAT_MAJOR" ]]; then
      command -v "$c"
      return 0
    fi
  done
  return 1
}

cf="$(find_clang_format || true)"
if [[ -z "$cf" ]]; then
  apt_install "clang-format-$CLANG_FORMAT_MAJOR"
  cf="$(find_clang_format || true)"
  if [[ -z "$cf" ]]; then
    echo "[format] error: no clang-format $CLANG_FORMAT_MAJOR after installing it" >&2
    exit 1
  fi
fi

ruff=.venv/bin/ruff
if [[ ! -x "$ruff" ]] || [[ "$("$ruff" --version 2>/dev/null)" != "ruff $RUFF_VERSION" ]]; then
  if [[ ! -x .venv/bin/python ]]; then
    if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1 && ! installed python3-venv; then
      apt_install python3-venv
    fi
    log "creating .venv with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv .venv
  fi
  log "pip install ruff==$RUFF_VERSION"
  .venv/bin/python -m pip --disable-pip-version-check install -q "ruff==$RUFF_VERSION"
fi
log "$("$cf" --version | sed 's/^ *//'), $("$ruff" --version)"

# --- files ------------------------------------------------------------------------------------
existing() { local d; for d in "$@"; do [[ -d "$d" ]] && printf '%s\n' "$d"; done; return 0; }
mapfile -t cxx_dirs < <(existing "${CXX_DIRS[@]}")
mapfile -t py_dirs < <(existing "${PY_DIRS[@]}")
cxx_files=()
if ((${#cxx_dirs[@]})); then
  if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # Tracked and new files, not the git-ignored ones (build trees).
    pathspecs=()
    for d in "${cxx_dirs[@]}"; do for g in "${CXX_GLOBS[@]}"; do pathspecs+=("$d/**/$g"); done; done
    mapfile -t cxx_files < <(git ls-files --cached --others --exclude-standard -- \
      "${pathspecs[@]/#/:(glob)}" | sort -u)
  else
    names=()
    for g in "${CXX_GLOBS[@]}"; do names+=(-o -name "$g"); done
    mapfile -t cxx_files < <(find "${cxx_dirs[@]}" -name 'build*' -prune -o -type f \
      \( "${names[@]:1}" \) -print | sort)
  fi
fi
# git ls-files also lists files deleted in the work tree but not yet in the index.
present=()
for f in "${cxx_files[@]}"; do [[ -f "$f" ]] && present+=("$f"); done
cxx_files=("${present[@]}")

# --- format or check --------------------------------------------------------------------------
status=0
if ((check)); then
  bad=()
  for f in "${cxx_files[@]}"; do
    "$cf" --style=file "$f" | cmp -s - "$f" || bad+=("$f")
  done
  if ((${#bad[@]})); then
    status=1
    echo "[format] clang-format would change ${#bad[@]} file(s):"
    for f in "${bad[@]}"; do
      "$cf" --style=file "$f" | diff -u --label "$f" --label "$f (formatted)" "$f" - || true
    done | head -n 400
  fi
  if ((${#py_dirs[@]})); then
    "$ruff" format --check --diff "${py_dirs[@]}" || status=1
    "$ruff" check --no-fix "${py_dirs[@]}" || status=1
  fi
  if ((status)); then
    echo "[format] not formatted: run scripts/format.sh, and fix what ruff check reports" >&2
  else
    log "C++ (${#cxx_files[@]} files) and Python: formatted, no lint finding"
  fi
  exit "$status"
fi

if ((${#cxx_files[@]})); then
  printf '%s\0' "${cxx_files[@]}" | xargs -0 -n 16 -P "$(nproc 2>/dev/null || echo 2)" \
    "$cf" --style=file -i
  log "clang-format: ${#cxx_files[@]} C++ files"
fi
if ((${#py_dirs[@]})); then
  # Safe fixes first (import order, unused imports), then the formatter, as ruff advises.
  "$ruff" check --fix --exit-zero --quiet "${py_dirs[@]}"
  "$ruff" format --quiet "${py_dirs[@]}"
  log "ruff: fixed and formatted ${py_dirs[*]}"
  "$ruff" check --no-fix "${py_dirs[@]}" || {
    echo "[format] ruff check: the findings above need a hand" >&2
    exit 1
  }
fi
