#!/bin/bash
# Line coverage of vmm's code by each fuzz target's corpus (fuzz/corpus/<target> plus the
# seeds): `cargo fuzz coverage` builds the target with -C instrument-coverage and runs every
# input once, then llvm-cov reports the files the target is meant to exercise. Needs the
# llvm-tools-preview component (`rustup component add llvm-tools-preview`, done here when
# missing). `fuzz/coverage.sh [TARGET...]`; docs/security.md has the last figures.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
export RUSTC_BOOTSTRAP=1
sysroot=$(rustc --print sysroot)
host=$(rustc -vV | sed -n 's/^host: //p')
cov="$sysroot/lib/rustlib/$host/bin/llvm-cov"
if [[ ! -x $cov ]]; then
  rustup component add llvm-tools-preview >&2
fi
# The files each target is for (regular expressions on paths under src/).
declare -A files=(
  [machine_text]='^(spec|validate|contract)/|^diag\.rs'
  [plan_reorder]='^graph/(mod|place|layout|diff)'
  [virtio_pci]='^hw/transport/virtio_pci\.rs'
  [queue_chains]='^devices/(net/(chain|rx|tx)|block/mod|console/mod|rng)'
  [pio_devices]='^devices/legacy/|^hw/(hotplug|platform)\.rs'
  [control_request]='^reconcile/protocol\.rs'
  [vhost_user]='^vhost_user/(mod|relay)|served\.rs'
)
targets=${*:-$(cargo fuzz list)}
for t in $targets; do
  mkdir -p "corpus/$t" coverage
  cargo fuzz coverage "$t" "corpus/$t" "seeds/$t" > "coverage/$t.log" 2>&1 || {
    tail -n 20 "coverage/$t.log" >&2
    exit 1
  }
  bin=target/$host/coverage/$host/release/$t
  echo "== $t"
  "$cov" report "$bin" -instr-profile="coverage/$t/coverage.profdata" \
      --ignore-filename-regex='(\.cargo|rustc|/fuzz/)' 2>/dev/null |
    awk -v re="${files[$t]:-.}" 'NR > 2 && $1 ~ re && $8 > 0 {
      printf "  %-34s %6s lines %6.2f%%\n", $1, $8, 100 * ($8 - $9) / $8
      n += $8; m += $9 }
      END { if (n) printf "  %-34s %6s lines %6.2f%%\n", "(these files)", n, 100 * (n - m) / n }'
done
