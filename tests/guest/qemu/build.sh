#!/bin/bash
# Builds the QEMU/TCG test guest into OUTDIR:
#   vmlinuz          Debian's stock 6.12 amd64 kernel, unmodified
#   initramfs.cpio   busybox + ./init + the virtio modules, uncompressed
#   config           the kernel's config (for reference)
# Usage: build.sh OUTDIR
#
# The kernel is the package Debian's `linux-image-6.12-amd64` metapackage depends on (bookworm
# ships 6.12 through bookworm-security), or VMM_QEMU_KERNEL=PACKAGE[=VERSION] to pin one. Its .deb
# and the extracted kernel + modules are cached in ${VMM_GUEST_DIR:-~/.cache/vmm-guest}/qemu,
# the output in OUTDIR; re-runs are instant when nothing changed (kernel version, this script,
# init, mkinitramfs.py, busybox). Modules: those listed below plus their dependencies, taken
# from the package, decompressed (busybox insmod cannot read .ko.xz) and indexed with depmod so
# busybox modprobe works in the guest. Installs missing Debian tools when run as root.
# Progress goes to stderr.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[[ $# == 1 ]] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
mkdir -p "$1"
out=$(cd "$1" && pwd)
cache=${VMM_GUEST_DIR:-$HOME/.cache/vmm-guest}/qemu
mkinitramfs=$here/../mkinitramfs.py
busybox=/bin/busybox
# Drivers for virtio-pci block, net, console and rng devices (built-in ones are kept too, in
# case a later kernel makes them modular), and for the device wave (virtio-iommu first: VIOT
# endpoints defer their probe until it exists). Their dependencies are added automatically.
# ./init loads the same list.
modules=(virtio_pci virtio_blk virtio_net virtio_console virtio_rng
  virtio_iommu virtio_balloon virtio_input evdev virtio_pmem nd_pmem 9pnet_virtio 9p virtiofs
  vmw_vsock_virtio_transport virtio_scsi sd_mod virtio_snd virtio_gpu xhci_pci usbhid usb_storage)

# The kernel package and version, from the local apt lists (no network).
resolve() {
  if [[ -n ${VMM_QEMU_KERNEL:-} ]]; then
    pkg=${VMM_QEMU_KERNEL%%=*}
    ver=${VMM_QEMU_KERNEL#*=}
    [[ $ver != "$VMM_QEMU_KERNEL" ]] ||
      ver=$(apt-cache show --no-all-versions "$pkg" 2>/dev/null | sed -n 's/^Version: //p' | head -n 1)
  else
    # "Depends: linux-image-6.12.117+deb12-amd64 (= 6.12.117-1~deb12u1)"
    local dep
    dep=$(apt-cache show --no-all-versions linux-image-6.12-amd64 2>/dev/null | sed -n 's/^Depends: //p' | head -n 1)
    pkg=$(sed -nE 's/^(linux-image-[^ ,]+).*/\1/p' <<<"$dep")
    ver=$(sed -nE 's/^[^ ]+ \(= ([^)]+)\).*/\1/p' <<<"$dep")
  fi
  [[ -n $pkg && -n $ver ]]
}
# apt-cache takes ~0.6 s here (no pkgcache.bin): reuse the last answer while the lists are unchanged.
lists=$( (echo "${VMM_QEMU_KERNEL:-}"; stat -c '%n %Y %s' /var/lib/apt/lists/*Packages* 2>/dev/null) | sha256sum | cut -c1-16)
if read -r l pkg ver 2>/dev/null < "$out/.kernel" && [[ $l == "$lists" && -n $ver ]]; then
  :
else
  if ! resolve; then
    if [[ $(id -u) == 0 ]]; then
      echo "qemu guest: no 6.12 kernel in the apt lists; apt-get update" >&2
      apt-get update -qq >&2
    fi
    resolve || { echo "qemu guest: cannot find the kernel package (linux-image-6.12-amd64) with apt-cache" >&2; exit 1; }
  fi
  echo "$lists $pkg $ver" > "$out/.kernel.$$" && mv "$out/.kernel.$$" "$out/.kernel"
fi
bbsum=$(sha256sum "$busybox" | cut -c1-64)
stage_key=$(printf '%s\n' "$pkg=$ver" "${modules[@]}" | cat - "$here/build.sh" | sha256sum | cut -c1-16)
key=$(printf '%s\n' "$stage_key" "$bbsum" | cat - "$here/init" "$mkinitramfs" | sha256sum | cut -c1-16)
done_already() { [[ -s $out/vmlinuz && -s $out/initramfs.cpio && $(cat "$out/.key" 2>/dev/null) == "$key" ]]; }
if done_already; then exit 0; fi
exec 9>"$out/.lock"; flock 9   # concurrent runs with the same OUTDIR: one builds, the others wait
if done_already; then exit 0; fi

need=()
for p in busybox-static kmod xz-utils python3; do
  [[ $(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null) == installed ]] || need+=("$p")
done
if ((${#need[@]})); then
  if [[ $(id -u) != 0 ]]; then echo "qemu guest: missing Debian packages: ${need[*]}" >&2; exit 1; fi
  echo "qemu guest: installing ${need[*]}" >&2
  apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi
PATH=$PATH:/usr/sbin:/sbin   # depmod

# 1. The kernel and the module tree, cached per package version, module list and script.
mkdir -p "$cache"
exec 8>"$cache/.lock"; flock 8
kdir=$cache/kernel-$stage_key
if [[ ! -e $kdir/done ]]; then
  deb=$cache/debs/${pkg}_${ver}_amd64.deb
  if [[ ! -s $deb ]]; then
    echo "qemu guest: downloading $pkg $ver (~100 MB)" >&2
    dl=$(mktemp -d "$cache/download.XXXXXX")
    sandbox=()
    [[ $(id -u) != 0 ]] || sandbox=(-o APT::Sandbox::User=root)   # no _apt warning in a root-only dir
    if ! (cd "$dl" && apt-get download -qq "${sandbox[@]}" "$pkg=$ver" >&2); then
      rm -rf "$dl"
      # Stale apt lists name a version the archive no longer has: update them once and start over.
      if [[ $(id -u) == 0 && -z ${VMM_QEMU_RETRY:-} && -z ${VMM_QEMU_KERNEL:-} ]]; then
        echo "qemu guest: download failed; apt-get update and retry" >&2
        apt-get update -qq >&2
        rm -f "$out/.kernel"
        exec 8>&- 9>&-
        VMM_QEMU_RETRY=1 exec "$here/build.sh" "$out"
      fi
      echo "qemu guest: cannot download $pkg $ver (apt-get update may help)" >&2
      exit 1
    fi
    mkdir -p "$cache/debs"
    mv "$dl"/*.deb "$deb"
    rm -rf "$dl"
  fi
  echo "qemu guest: extracting $pkg and selecting modules" >&2
  rm -rf "$kdir"
  tmp=$(mktemp -d "$cache/extract.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  dpkg-deb -x "$deb" "$tmp/pkg"
  kvers=("$tmp"/pkg/lib/modules/*)
  [[ ${#kvers[@]} == 1 && -d ${kvers[0]} ]] || { echo "qemu guest: expected one module tree in $deb" >&2; exit 1; }
  kver=$(basename "${kvers[0]}")
  depmod -b "$tmp/pkg" "$kver"
  mods=$tmp/stage/lib/modules/$kver
  mkdir -p "$mods"
  for m in "${modules[@]}"; do
    # Lines "insmod /path/x.ko.xz" (dependencies first) or "builtin x"; -C /dev/null: ignore the
    # host's /etc/modprobe.d.
    deps=$(modprobe -C /dev/null -d "$tmp/pkg" -S "$kver" --show-depends "$m") ||
      { echo "qemu guest: no module $m in $pkg" >&2; exit 1; }
    while read -r what path _; do
      [[ $what == insmod ]] || continue
      rel=${path#"$tmp/pkg/lib/modules/$kver/"}
      mkdir -p "$mods/$(dirname "$rel")"
      case $rel in
        *.ko.xz) xz -dc "$path" > "$mods/${rel%.xz}" ;;
        *.ko) cp "$path" "$mods/$rel" ;;
        *) echo "qemu guest: unexpected module file $rel" >&2; exit 1 ;;
      esac
    done <<<"$deps"
  done
  cp "$tmp/pkg/lib/modules/$kver"/modules.{order,builtin,builtin.modinfo} "$mods/"
  depmod -b "$tmp/stage" "$kver"
  cp "$tmp/pkg/boot/vmlinuz-$kver" "$tmp/vmlinuz"
  cp "$tmp/pkg/boot/config-$kver" "$tmp/config"
  rm -rf "$kdir.new" && mkdir -p "$kdir.new"
  mv "$tmp/stage" "$tmp/vmlinuz" "$tmp/config" "$kdir.new/"
  echo "$pkg $ver $kver" > "$kdir.new/done"
  mv -T "$kdir.new" "$kdir"
  rm -rf "$tmp"
  trap - EXIT
fi
flock -u 8

# 2. The initramfs and the outputs.
echo "qemu guest: initramfs" >&2
python3 "$mkinitramfs" "$out/initramfs.cpio" "$busybox" "$here/init" "/=$kdir/stage"
cp "$kdir/vmlinuz" "$out/vmlinuz.tmp" && mv "$out/vmlinuz.tmp" "$out/vmlinuz"
cp "$kdir/config" "$out/config"
echo "$key" > "$out/.key"
echo "qemu guest: ready in $out ($(cut -d' ' -f1,2 "$kdir/done"))" >&2
