#!/bin/bash
# Builds the tiny test guests: tests/guest/tiny/build.sh OUTDIR
# writes OUTDIR/NAME.elf for every guest NAME below, with gcc/as/ld only: static ELF64
# files linked at 0x100000 by pvh.ld (PVH note) or elf64.ld (64-bit entry).
# Silent on success; stops at the first error with the tool's message and a non-zero
# status. Every run rebuilds everything (well under a second), the output is the same
# bytes each time, and each file is written under a temporary name and renamed, so
# concurrent runs never leave or see a half-written guest.
set -euo pipefail
if [[ $# -ne 1 ]]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$1"
out=$(cd "$1" && pwd)
cd "$here"   # sources are named relative to here, which keeps paths out of the output

pvh_guests=(hello-pvh reset pciscan rtc echo spin triple-fault bad-fetch)
elf64_guests=(hello-elf64 cpuid)

build() { # NAME LINKER-SCRIPT
  local tmp="$out/.$1.elf.$$"
  if ! gcc -nostdlib -static -no-pie -Wa,--noexecstack -Wl,--build-id=none \
      -Wl,-T,"$2" -o "$tmp" "$1.S"; then
    rm -f "$tmp"
    echo "build.sh: building $1 failed" >&2
    exit 1
  fi
  mv -f "$tmp" "$out/$1.elf"
}
for g in "${pvh_guests[@]}"; do build "$g" pvh.ld; done
for g in "${elf64_guests[@]}"; do build "$g" elf64.ld; done
