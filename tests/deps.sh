#!/bin/bash
# Installs what the test suite needs on a fresh Debian bookworm machine (idempotent, quiet when
# all is there): Debian packages for the test guests and tools, QEMU from bookworm-backports (the
# QEMU/TCG guest of tests/guest/qemu), and the Tombi TOML language server.
# Needs root for apt-get; without root it only reports what is missing.
set -euo pipefail
installed() { [[ $(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null) == installed ]]; }
# busybox-static, kmod (depmod, modprobe) and xz-utils also build the QEMU guest's initramfs.
# libseccomp-dev and libcap-ng-dev build virtiofsd (below).
debs=(linux-source-6.12 build-essential flex bison bc libelf-dev libssl-dev xz-utils patch
      busybox-static kmod acpica-tools libseccomp-dev libcap-ng-dev)
missing=()
for p in "${debs[@]}"; do
  installed "$p" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) == 0 ]]; then
    echo "deps: installing ${missing[*]}" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  else
    echo "deps: missing Debian packages (install as root): ${missing[*]}" >&2
  fi
fi
# QEMU (qemu-system-x86_64, and qemu-storage-daemon from qemu-utils) comes from bookworm-backports:
# the machines' preinstalled qemu-utils 10.0 is from there, and bookworm's QEMU 7.2 does not go
# with it (an older QEMU counts as missing). Backports is not in a fresh machine's apt sources:
# it is derived from debian.sources, the recipe of ENVIRONMENT.md.
missing=()
for p in qemu-system-x86 qemu-utils; do
  installed "$p" && dpkg --compare-versions "$(dpkg-query -W -f='${Version}' "$p")" ge 1:10 ||
    missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) == 0 ]]; then
    echo "deps: installing ${missing[*]} from bookworm-backports" >&2
    list=/etc/apt/sources.list.d/backports.sources
    if [[ ! -e $list ]] && ! grep -rqsE --include='*.list' --include='*.sources' \
         '^[^#]*\<bookworm-backports\>' /etc/apt/sources.list /etc/apt/sources.list.d/; then
      tmp=$(mktemp)
      if [[ -r /etc/apt/sources.list.d/debian.sources ]]; then
        awk 'BEGIN{RS="";ORS="\n\n"} NR==1{sub(/Suites:[^\n]*/,"Suites: bookworm-backports");print}' \
          /etc/apt/sources.list.d/debian.sources > "$tmp"
      else   # an older image with only /etc/apt/sources.list
        printf '%s\n' "Types: deb" "URIs: http://deb.debian.org/debian" "Suites: bookworm-backports" \
          "Components: main" "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg" > "$tmp"
      fi
      install -m 0644 "$tmp" "$list" && rm -f "$tmp"
    fi
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      -t bookworm-backports "${missing[@]}" >&2
  else
    echo "deps: missing Debian packages (install as root, from bookworm-backports): ${missing[*]}" >&2
  fi
fi
if ! command -v tombi >/dev/null 2>&1; then
  echo "deps: installing tombi (pip)" >&2
  python3 -m pip install --quiet --disable-pip-version-check tombi >&2 ||
    echo "deps: could not install tombi; the editor test will be skipped" >&2
fi
# vhost-user daemons from crates.io (`cargo install --locked`), built once into a cache outside
# target/ ($VMM_TOOLS, default ~/.cache/vmm-tools; tests find them there: tests/common/tools.rs).
tools=${VMM_TOOLS:-$HOME/.cache/vmm-tools}
for spec in virtiofsd@1.14.0; do
  name=${spec%@*}
  if [[ ! -x $tools/bin/$name ]]; then
    echo "deps: building $spec (cargo install --locked, once)" >&2
    cargo install --quiet --locked --root "$tools" "$spec" >&2 ||
      echo "deps: could not build $spec; the tests that need it will fail under VMM_NO_SKIP" >&2
  fi
done
