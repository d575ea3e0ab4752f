#!/usr/bin/env bash
# `npm start`: install what is missing, then run Cocoon with its embedded defaults
# (SQLite and objects under ./.cocoon, QEMU). Environment: see README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec node_modules/.bin/node --disable-warning=ExperimentalWarning src/cli/main.ts serve "$@"
