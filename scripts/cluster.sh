#!/usr/bin/env bash
# `npm run cluster -- up --hosts 3` / `npm run cluster -- down`: a Cocoon cluster on this machine
# (PostgreSQL, an S3-protocol server, N hosts; docs/cluster.md). Same as `cocoon cluster …`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec node_modules/.bin/node --disable-warning=ExperimentalWarning src/cli/main.ts cluster "$@"
