#!/bin/bash
# Installs what the test suite needs on a fresh Debian machine (idempotent, quiet when all is
# there): Debian packages for the test guest and tools, and the Tombi TOML language server.
# Needs root for apt-get; without root it only reports what is missing.
set -euo pipefail
debs=(linux-source-6.12 build-essential flex bison bc libelf-dev libssl-dev xz-utils patch
      busybox-static acpica-tools)
missing=()
for p in "${debs[@]}"; do
  [[ $(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null) == installed ]] || missing+=("$p")
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
if ! command -v tombi >/dev/null 2>&1; then
  echo "deps: installing tombi (pip)" >&2
  python3 -m pip install --quiet --disable-pip-version-check tombi >&2 ||
    echo "deps: could not install tombi; the editor test will be skipped" >&2
fi
