#!/usr/bin/env python3
"""Writes an uncompressed initramfs (cpio "newc") for the vmm test guest.

Usage: mkinitramfs.py OUT BUSYBOX INIT [DEST=SRC ...]

The archive holds /init, a static busybox with a symlink per applet in /bin, the usual mount
points, and extra files (DEST=SRC). Uncompressed on purpose: under PVM, unpacking a gzip
initramfs costs ~45 s of emulated kernel time. Deterministic: fixed mtimes, owners and order.
"""
import os
import subprocess
import sys


def entry(out, name, mode, data=b"", rdev=(0, 0), ino=[1000]):
    ino[0] += 1
    name_b = name.encode() + b"\0"
    fields = [ino[0], mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name_b), 0]
    out.write(b"070701" + b"".join(b"%08X" % f for f in fields))
    out.write(name_b)
    out.write(b"\0" * ((4 - (110 + len(name_b)) % 4) % 4))
    out.write(data)
    out.write(b"\0" * ((4 - len(data) % 4) % 4))


def main():
    out_path, busybox, init = sys.argv[1:4]
    extras = [a.split("=", 1) for a in sys.argv[4:]]
    applets = subprocess.run([busybox, "--list"], check=True, capture_output=True, text=True).stdout.split()
    tmp = out_path + ".tmp"
    with open(tmp, "wb") as out:
        for d in ["bin", "dev", "proc", "sys", "tmp", "mnt", "root", "etc"]:
            entry(out, d, 0o040755)
        entry(out, "dev/console", 0o020600, rdev=(5, 1))  # init's stdio before devtmpfs
        entry(out, "bin/busybox", 0o100755, open(busybox, "rb").read())
        for a in sorted(set(applets)):
            if a != "busybox":
                entry(out, "bin/" + a, 0o120777, b"busybox")
        entry(out, "init", 0o100755, open(init, "rb").read())
        for dest, src in extras:
            mode = os.stat(src).st_mode & 0o777
            entry(out, dest.lstrip("/"), 0o100000 | mode, open(src, "rb").read())
        entry(out, "TRAILER!!!", 0)
    os.replace(tmp, out_path)


if __name__ == "__main__":
    main()
