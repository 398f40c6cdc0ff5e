#!/usr/bin/env bash
# The test suite: installs what is missing, then runs every test of the workspace and the main
# job once. Tests that need root (liblxc containers) run when this is root, as in CI, and print
# why they skip otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ]; then
  bash scripts/setup.sh
else
  echo "test.sh: not root: skipping package installation; root-only tests will skip" >&2
fi

echo "== cargo test --workspace"
cargo test --workspace 2>&1 | tee /tmp/gatevisor-test.log
grep -q "test result: FAILED" /tmp/gatevisor-test.log && exit 1

if [ "$(id -u)" = 0 ]; then
  echo "== main job, once"
  bash scripts/run.sh --once
else
  echo "== main job skipped: needs root"
fi
