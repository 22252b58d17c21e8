#!/usr/bin/env bash
# The whole test suite (every tier: fast, slow and recipe), on CPU, after an idempotent
# set-up. Plain `pytest` runs the fast tier only. Extra args go to pytest.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/scripts/setup.sh"
cd "$repo"
export JAX_PLATFORMS=cpu TF_CPP_MIN_LOG_LEVEL=2 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec python -m pytest -m "" "$@"
