#!/usr/bin/env bash
# `npm run bench [-- --json] [suite ...]`: benchmarks (see bench/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
COCOON_SKIP_BASE_IMAGES=${COCOON_SKIP_BASE_IMAGES:-} bash scripts/setup.sh
exec node_modules/.bin/node --disable-warning=ExperimentalWarning bench/run.ts "$@"
