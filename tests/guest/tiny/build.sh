#!/bin/bash
# Builds the tiny test guests: tests/guest/tiny/build.sh OUTDIR
# writes OUTDIR/NAME.elf for every guest NAME below, with gcc/as/ld only: static ELF64
# files linked at 0x100000 by pvh.ld (PVH note) or elf64.ld (64-bit entry). C guests
# (NAME.c) are freestanding, entered through c64.S (elf64.S calling c_main).
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

pvh_guests=(hello-pvh reset pciscan rtc echo spin triple-fault bad-fetch hotplug)
elf64_guests=(hello-elf64 cpuid)
c_guests=(blk stress)

cflags=(-ffreestanding -fno-pic -fno-stack-protector -mno-red-zone -mgeneral-regs-only
  -fno-asynchronous-unwind-tables -O2 -Wall -Wextra)

build() { # NAME LINKER-SCRIPT SOURCE...
  local name=$1 ld=$2 tmp="$out/.$1.elf.$$"
  shift 2
  if ! gcc -nostdlib -static -no-pie -Wa,--noexecstack -Wl,--build-id=none \
      -Wl,-T,"$ld" -o "$tmp" "$@"; then
    rm -f "$tmp"
    echo "build.sh: building $name failed" >&2
    exit 1
  fi
  mv -f "$tmp" "$out/$name.elf"
}
for g in "${pvh_guests[@]}"; do build "$g" pvh.ld "$g.S"; done
for g in "${elf64_guests[@]}"; do build "$g" elf64.ld "$g.S"; done
for g in "${c_guests[@]}"; do build "$g" elf64.ld "${cflags[@]}" c64.S "$g.c"; done
