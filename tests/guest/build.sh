#!/bin/bash
# Builds the test guest into $OUT (default: target/guest under the repository):
#   vmlinux          the Linux test kernel (build-kernel.sh, cached by input hash)
#   bzImage          the same kernel as a bzImage
#   initramfs.cpio   busybox + init, uncompressed
# Installs missing Debian packages (busybox-static and the kernel build dependencies) when run
# as root. Progress goes to stderr; re-runs are fast when nothing changed.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${OUT:-$root/target/guest}
mkdir -p "$out"
exec 9>"$out/.lock"; flock 9
if [[ $(dpkg-query -W -f='${db:Status-Status}' busybox-static 2>/dev/null) != installed ]]; then
  echo "installing busybox-static" >&2
  apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox-static >&2
fi
echo "guest: kernel (cached after the first build, ~4 min)" >&2
vmlinux=$(OUT= "$here/build-kernel.sh" | tail -n 1)
ln -sf "$vmlinux" "$out/vmlinux.new" && mv -T "$out/vmlinux.new" "$out/vmlinux"
ln -sf "$(dirname "$vmlinux")/bzImage" "$out/bzImage.new" && mv -T "$out/bzImage.new" "$out/bzImage"
echo "guest: initramfs" >&2
python3 "$here/mkinitramfs.py" "$out/initramfs.cpio" /bin/busybox "$here/init"
echo "guest: ready in $out" >&2
