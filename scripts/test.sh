#!/usr/bin/env bash
# `npm test`: install what is missing, type-check, run every test (real QEMU, buildah, HTTP),
# then check that the suite left no QEMU process and no temporary directory behind.
#
#   npm test                         # everything
#   npm test -- 'test/vmm/*.test.ts' # some files
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
node=node_modules/.bin/node

echo "typecheck: tsc --noEmit" >&2
"$node" node_modules/typescript/bin/tsc --noEmit -p .

leftovers() {
  # QEMU processes and temp dirs that Cocoon's tests make carry this marker in their paths.
  # One sorted list: comm below needs it.
  {
    pgrep -f 'qemu-system.*cocoon-' | sed 's/^/qemu pid /' || true
    find "${TMPDIR:-/tmp}" -maxdepth 1 -type d -name 'cocoon-*' 2>/dev/null
  } | LC_ALL=C sort
}
before=$(leftovers)

files=("$@")
[ ${#files[@]} -gt 0 ] || files=('test/**/*.test.ts')
status=0
# One file at a time: VM tests are CPU-heavy under TCG (two cores on CI), and some files check
# machine-wide state (buildah storage, QEMU processes) that another file running beside them
# would disturb.
NODE_ENV=test "$node" --disable-warning=ExperimentalWarning --test --test-concurrency=1 \
  --test-timeout=900000 --test-reporter=spec "${files[@]}" || status=$?

after=$(leftovers)
left=$(LC_ALL=C comm -13 <(echo "$before") <(echo "$after") | grep . || true)
if [ -n "$left" ]; then
  echo "test suite left these behind (a test does not clean up):" >&2
  echo "$left" >&2
  status=1
fi
exit $status
