#!/usr/bin/env bash
# The test command of README.md: installs what the tests need and is missing, then runs the
# tests. Safe to run again: what is there is kept.
#   - python readers for the interop test (pyarrow, duckdb: other Parquet readers than ours);
#   - Debian's chromium and chromium-driver for the dashboard's browser tests (apt-get);
#   - the tansu Kafka-protocol broker the Kafka tests start (../shared/docs/stack.md), built
#     from crates.io into ~/.local (15-20 min the first time; it builds while fmt and clippy run).
# Then: cargo fmt --check, cargo clippy -D warnings, cargo test (arguments are passed on:
# `scripts/test.sh --test sql`).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.local/bin:$PATH"

echo "== python readers for the interop test"
py_pkgs=(pyarrow==26.0.1 duckdb==2.0.1)
pip_q=(--quiet --disable-pip-version-check)
if ! python3 -c "import pyarrow, duckdb" >/dev/null 2>&1; then
  # A plain pip install where Python allows it; where the system Python is "externally
  # managed" (Debian, PEP 668): a virtual environment under target/, or else a user install.
  if ! python3 -m pip install "${pip_q[@]}" "${py_pkgs[@]}" 2>/dev/null; then
    venv="$PWD/target/python"
    if python3 -m venv "$venv" >/dev/null 2>&1 && "$venv/bin/pip" install "${pip_q[@]}" "${py_pkgs[@]}"; then
      export PATH="$venv/bin:$PATH"
    else
      python3 -m pip install "${pip_q[@]}" --user --break-system-packages "${py_pkgs[@]}"
    fi
  fi
fi
if [ -x target/python/bin/python3 ]; then export PATH="$PWD/target/python/bin:$PATH"; fi
python3 -c "import pyarrow, duckdb; print('   pyarrow', pyarrow.__version__, '| duckdb', duckdb.__version__)"

if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  echo "== $(/usr/bin/chromium --version 2>/dev/null | head -1) + chromedriver"
else
  echo "== installing chromium and chromium-driver (Debian) for the dashboard tests"
  as_root=()
  if [ "$(id -u)" -ne 0 ]; then as_root=(sudo -n); fi
  # A stale mirror list need not stop the install: try it whatever `update` says.
  "${as_root[@]}" apt-get update -qq || echo "apt-get update failed; installing from the cached lists"
  DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq chromium chromium-driver >/dev/null
  /usr/bin/chromium --version
fi

tansu_pid=""
tansu_log="$(mktemp)"
if tansu --version >/dev/null 2>&1; then
  echo "== tansu: $(tansu --version)"
else
  echo "== installing tansu 0.6.0 in the background (log: $tansu_log)"
  cargo install tansu@0.6.0 --locked --features dynostore,libsql --root "$HOME/.local" \
    >"$tansu_log" 2>&1 &
  tansu_pid=$!
fi

rustup component add rustfmt clippy >/dev/null 2>&1 || true
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets -- -D warnings

if [ -n "$tansu_pid" ]; then
  echo "== waiting for the tansu install"
  if ! wait "$tansu_pid"; then
    tail -50 "$tansu_log"
    echo "tansu install failed" >&2
    exit 1
  fi
  tansu --version
fi

echo "== cargo test $*"
cargo test "$@"
