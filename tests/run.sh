#!/bin/bash
# Runs every vmm test: installs missing dependencies (tests/deps.sh), builds the test guest
# (tests/guest/build.sh, cached), then `cargo test`, then every fuzz target for a bounded time
# (fuzz/run.sh, FUZZ_SECONDS each, default 20), and prints one summary: tests run, failed, and
# skipped (a skipped test says why; VMM_NO_SKIP=1 turns skips into failures), and the fuzzing.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
tests/deps.sh
tests/guest/build.sh || { echo "building the test guest failed" >&2; exit 1; }
mkdir -p target
rm -f target/test-skips.txt
# Lints (Cargo.toml [lints] and clippy's defaults) on every target; the benchmarks are not run
# here, but this keeps them compiling against the code they measure.
cargo clippy --all-targets --features testing --quiet --color never -- -D warnings || { echo "clippy found problems (or the benchmarks do not compile)" >&2; exit 1; }
cargo test --no-fail-fast --color never 2>&1 | tee target/test-output.txt
rc=${PIPESTATUS[0]}
fuzzing="every fuzz target ran ${FUZZ_SECONDS:-20} s without a crash"
if ! fuzz/run.sh 2>&1 | tee target/fuzz-output.txt; then
  fuzzing="FUZZING FAILED (see above; crashes are in fuzz/artifacts)"
  rc=1
fi
read -r passed failed ignored < <(awk '/^test result:/ {
    for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) g += $i }
  } END { print p+0, f+0, g+0 }' target/test-output.txt)
skipped=0
[[ -f target/test-skips.txt ]] && skipped=$(wc -l < target/test-skips.txt)
echo
echo "==================== vmm test summary ===================="
echo "ran $((passed + failed - skipped)) tests: $((passed - skipped)) passed, $failed failed; $skipped skipped, $ignored ignored"
echo "$fuzzing"
if ((skipped)); then
  echo "SKIPPED (not counted as passed):"
  sed 's/^/  /' target/test-skips.txt
fi
exit "$rc"
