#!/usr/bin/env python3
"""Writes an uncompressed initramfs (cpio "newc") for the vmm test guests.

Usage: mkinitramfs.py OUT BUSYBOX INIT [DEST=SRC ...]

The archive holds /init, a static busybox with a symlink per applet in /bin, the usual mount
points, and extras (DEST=SRC): a file SRC becomes the file DEST; a directory SRC adds its whole
tree (directories, files, symlinks) under DEST (`/=DIR` merges DIR into the root). Missing parent
directories of extras are created. Uncompressed on purpose: under PVM, unpacking a gzip
initramfs costs ~45 s of emulated kernel time. Deterministic: fixed mtimes, owners and order.
"""
import os
import stat
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


def join(dest, rel):
    return "/".join(p for p in (dest.strip("/"), rel) if p)


def extra(out, dirs, dest, src):
    """Adds the file or tree SRC as DEST, after any missing parent directories."""
    def parents(name):
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in dirs:
                dirs.add(d)
                entry(out, d, 0o040755)

    def add(name, path):
        st = os.lstat(path)
        parents(name)
        if stat.S_ISLNK(st.st_mode):
            entry(out, name, 0o120777, os.readlink(path).encode())
        elif stat.S_ISDIR(st.st_mode):
            if name not in dirs:
                dirs.add(name)
                entry(out, name, 0o040000 | (st.st_mode & 0o7777))
        elif stat.S_ISREG(st.st_mode):
            entry(out, name, 0o100000 | (st.st_mode & 0o777), open(path, "rb").read())
        else:
            sys.exit(f"mkinitramfs.py: {path}: not a file, directory or symlink")

    if not os.path.isdir(src) or os.path.islink(src):
        add(dest.strip("/"), src)
        return
    if dest.strip("/"):
        add(dest.strip("/"), src)
    for top, subdirs, files in os.walk(src):
        subdirs.sort()
        rel = os.path.relpath(top, src)
        rel = "" if rel == "." else rel
        for n in sorted(subdirs + files):
            add(join(dest, join(rel, n)), os.path.join(top, n))


def main():
    out_path, busybox, init = sys.argv[1:4]
    extras = [a.split("=", 1) for a in sys.argv[4:]]
    applets = subprocess.run([busybox, "--list"], check=True, capture_output=True, text=True).stdout.split()
    tmp = out_path + ".tmp"
    with open(tmp, "wb") as out:
        dirs = {""}
        for d in ["bin", "dev", "proc", "sys", "tmp", "mnt", "root", "etc"]:
            dirs.add(d)
            entry(out, d, 0o040755)
        entry(out, "dev/console", 0o020600, rdev=(5, 1))  # init's stdio before devtmpfs
        entry(out, "bin/busybox", 0o100755, open(busybox, "rb").read())
        for a in sorted(set(applets)):
            if a != "busybox":
                entry(out, "bin/" + a, 0o120777, b"busybox")
        entry(out, "init", 0o100755, open(init, "rb").read())
        for dest, src in extras:
            extra(out, dirs, dest, src)
        entry(out, "TRAILER!!!", 0)
    os.replace(tmp, out_path)


if __name__ == "__main__":
    main()
