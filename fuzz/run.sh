#!/bin/bash
# Runs every fuzz target for FUZZ_SECONDS each (default 20) and fails on the first crash;
# `fuzz/run.sh --long [SECONDS]` is a campaign (default 3600 s per target). Seeds are
# committed under fuzz/seeds/<target>; what the fuzzer adds goes to fuzz/corpus/<target>
# (not committed) and crashes to fuzz/artifacts/<target>. Needs cargo-fuzz (installed here
# when missing) and, on the stable toolchain, RUSTC_BOOTSTRAP=1 for its -Z flags.
# FUZZ_TARGETS="a b" runs only those. Each run appends a line to corpus/ledger.tsv (date,
# target, wall seconds, CPU seconds of all its threads, executions): the campaign figures in
# docs/security.md are sums of that ledger.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
secs=${FUZZ_SECONDS:-20}
if [[ ${1:-} == --long ]]; then
  secs=${2:-3600}
fi
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked --quiet
fi
targets=${FUZZ_TARGETS:-$(cargo fuzz list)}
cargo fuzz build 2>&1 | grep -E "^(error|warning)" -A5 || true
for t in $targets; do
  mkdir -p "corpus/$t" "seeds/$t"
  echo "fuzz: $t for ${secs}s" >&2
  TIMEFORMAT='%R %U %S'
  if ! { time cargo fuzz run "$t" "corpus/$t" "seeds/$t" -- \
      -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
      2> "corpus/$t.log"; } 2> "corpus/$t.time"; then
    ip tuntap del dev vmmfz0 mode tap 2>/dev/null || true
    tail -n 60 "corpus/$t.log" >&2
    echo "fuzz: $t found a crash (fuzz/artifacts/$t); make it a regression test" >&2
    exit 1
  fi
  # The vhost_user target's TAP.
  ip tuntap del dev vmmfz0 mode tap 2>/dev/null || true
  read -r wall user sys < <(tail -n 1 "corpus/$t.time")
  execs=$(grep -E "^stat::number_of_executed_units" "corpus/$t.log" | awk '{print $2}')
  printf '%s\t%s\t%s\t%s\t%s\n' "$(date -u +%FT%TZ)" "$t" "$wall" \
    "$(awk -v u="$user" -v s="$sys" 'BEGIN { print u + s }')" "${execs:-0}" >> corpus/ledger.tsv
  grep -E "^stat::number_of_executed_units|^stat::new_units_added|cov:" "corpus/$t.log" | tail -n 3 >&2 || true
done
echo "fuzz: every target ran ${secs}s without a crash" >&2
