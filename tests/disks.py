"""Small file systems to fill, for the full-disk tests of the SQLite and PostgreSQL stores.

A tmpfs of a given size is mounted where the test says (as root; else a
loop-mounted ext4 image), then filled with files until writing fails with
ENOSPC, leaving as many bytes free as the test asks.
"""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path


def unmount(where: Path) -> None:
    """Unmount what :func:`mount_small_disk` mounted (lazily if it is still busy)."""
    if subprocess.run(["umount", str(where)], capture_output=True).returncode:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def mount_small_disk(where: Path, megabytes: int = 2) -> tuple[str | None, list[str]]:
    """Mount a tmpfs of ``megabytes`` at ``where``, else a loop-mounted ext4 image twice that size; what got
    mounted (None: nothing) and what failed."""
    tried = []
    for name in ("tmpfs", "ext4 on a loop device"):
        if name == "tmpfs":
            cmd = ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(where)]
        else:
            image = where.parent / "disk.img"
            with image.open("wb") as f:
                f.truncate(2 * megabytes * 1024 * 1024)
            try:
                mkfs = subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], capture_output=True, text=True)
            except FileNotFoundError as exc:
                tried.append(f"{name}: {exc}")
                continue
            if mkfs.returncode != 0:
                tried.append(f"{name}: mkfs.ext4: {mkfs.stderr.strip()}")
                continue
            cmd = ["mount", "-o", "loop", str(image), str(where)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True)
        except FileNotFoundError as exc:
            tried.append(f"{name}: {exc}")
            continue
        if done.returncode == 0:
            return name, tried
        tried.append(f"{name}: {done.stderr.strip() or done.returncode}")
    return None, tried


def fill(where: Path, leave: int) -> list[Path]:
    """Fill the file system at ``where`` with 16 KB files, then delete enough of them to leave ``leave`` bytes."""
    files: list[Path] = []
    chunk = b"\0" * 16384
    for size in (16384, 1024):
        while True:
            p = where / f"filler-{len(files)}"
            try:
                with p.open("wb") as f:
                    f.write(chunk[:size])
            except OSError as exc:
                p.unlink(missing_ok=True)
                if exc.errno != errno.ENOSPC:
                    raise
                break
            files.append(p)
    freed = 0
    while freed < leave and files:
        p = files.pop(0)
        freed += p.stat().st_size
        p.unlink()
    return files
