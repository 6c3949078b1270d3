#!/usr/bin/env python3
"""Shows ext4 acknowledging an fsync whose data it then drops, with no lavd
and no SQLite involved (docs/RELIABILITY.md, "An fsync that ext4 acknowledged
and then lost").

Each round makes a fresh ext4 file system in an image on a loop device,
mounted errors=remount-ro, as store_faults.rs does. One thread appends 4,120
bytes (one SQLite WAL frame) and fsyncs, again and again, noting each
fsync's result and when it returned. The main thread raises an ext4 error
(/sys/fs/ext4/<dev>/trigger_fs_error, the kernel's own error path, which
aborts the journal and turns the file system read-only), then the round
unmounts, runs e2fsck -fy, mounts again and reads the file's size. A round
is LOST when the size is below the end of the last append whose fsync
returned success: the kernel said the data was on disk, and it was not.

With --freeze the error is raised between `fsfreeze -f` and `fsfreeze -u`,
so no fsync is in flight while the journal aborts: store_faults.rs injects
its fault that way.

Run as root, beside some CPU load (the race is narrow on an idle machine):

    for j in 1 2 3; do timeout 600 bash -c 'while :; do :; done' & done
    python3 softhsm-tests/repro/ext4_fsync_race.py 50
    python3 softhsm-tests/repro/ext4_fsync_race.py 50 --freeze
    pkill -f 'while :; do :; done'

Exits 1 when a round lost acknowledged data, 0 otherwise.
"""

import os
import random
import subprocess
import sys
import tempfile
import threading
import time

FRAME = 4120


def sh(*args):
    return subprocess.run(list(args), capture_output=True, text=True, check=False)


def must(*args):
    r = sh(*args)
    if r.returncode != 0:
        sys.exit(f"{' '.join(args)}: {r.stderr.strip()}")
    return r.stdout.strip()


def round_(work, freeze):
    image = os.path.join(work, "ext4.img")
    mnt = os.path.join(work, "mnt")
    os.makedirs(mnt, exist_ok=True)
    with open(image, "wb") as f:
        f.truncate(256 << 20)
    must("mkfs.ext4", "-q", "-F", image)
    dev = must("losetup", "-f", "--show", image)
    try:
        must("mount", "-o", "errors=remount-ro", dev, mnt)
        path = os.path.join(mnt, "f")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        acked = []  # (end offset, monotonic time fsync returned)
        stop = threading.Event()

        def writer():
            end = 0
            while not stop.is_set():
                try:
                    os.pwrite(fd, os.urandom(FRAME), end)
                    os.fsync(fd)
                except OSError:
                    return
                end += FRAME
                acked.append((end, time.monotonic()))

        thread = threading.Thread(target=writer)
        thread.start()
        time.sleep(random.uniform(0.05, 0.3))
        raised = time.monotonic()
        if freeze:
            must("fsfreeze", "-f", mnt)
        with open(f"/sys/fs/ext4/{os.path.basename(dev)}/trigger_fs_error", "w") as f:
            f.write("ext4_fsync_race.py")
        if freeze:
            must("fsfreeze", "-u", mnt)
        stop.set()
        thread.join()
        os.close(fd)
        must("umount", mnt)
        fsck = sh("e2fsck", "-fy", dev)
        if fsck.returncode not in (0, 1):
            sys.exit(f"e2fsck exited {fsck.returncode}: {fsck.stdout}{fsck.stderr}")
        must("mount", dev, mnt)
        size = os.path.getsize(path)
        must("umount", mnt)
    finally:
        sh("umount", "-l", mnt)
        sh("losetup", "-d", dev)
    last = acked[-1][0] if acked else 0
    if size < last:
        late = [round((t - raised) * 1000, 2) for end, t in acked if end > size]
        print(
            f"LOST: {last - size} acknowledged bytes ({(last - size) // FRAME} appends), "
            f"their fsyncs returned {late} ms after the error was raised"
        )
        return True
    return False


def main():
    args = sys.argv[1:]
    freeze = "--freeze" in args
    args = [a for a in args if a != "--freeze"]
    rounds = int(args[0]) if args else 25
    if os.geteuid() != 0:
        sys.exit("run as root: it mounts a loop device")
    lost = 0
    with tempfile.TemporaryDirectory() as work:
        for _ in range(rounds):
            lost += round_(work, freeze)
    print(f"{lost} of {rounds} rounds lost data an fsync had acknowledged"
          f"{' (error raised while frozen)' if freeze else ''}")
    sys.exit(1 if lost else 0)


if __name__ == "__main__":
    main()
