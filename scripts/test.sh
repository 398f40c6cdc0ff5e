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

# As root the emulated-gateway scenarios of qemu-tests run too (a QEMU gateway per scenario; the
# gateway base image is built once into /var/cache/gatevisor and reused by later runs).
if [ "$(id -u)" = 0 ]; then
  export GATEVISOR_QEMU_TESTS=1
fi

# The fuzz targets (tests/fuzz.rs, vmm's hostile-driver proptests, dns-filter's parser): cases
# per target in this run.
export PROPTEST_CASES="${PROPTEST_CASES:-1000}"

echo "== cargo test --workspace"
cargo test --workspace 2>&1 | tee /tmp/gatevisor-test.log
grep -q "test result: FAILED" /tmp/gatevisor-test.log && exit 1

if [ "$(id -u)" = 0 ]; then
  echo "== main job, once"
  bash scripts/run.sh --once
else
  echo "== main job skipped: needs root"
fi

passed=$(sed -n 's/^test result: .*ok\. \([0-9]*\) passed.*/\1/p; s/^test result: FAILED\. \([0-9]*\) passed.*/\1/p' /tmp/gatevisor-test.log | awk "{s+=\$1} END {print s+0}")
failed=$(sed -n 's/^test result: .* \([0-9]*\) failed.*/\1/p' /tmp/gatevisor-test.log | awk "{s+=\$1} END {print s+0}")
echo "total: ${passed:-0} passed, ${failed:-0} failed"
