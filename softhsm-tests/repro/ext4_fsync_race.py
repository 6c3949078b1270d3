#!/usr/bin/env python3
"""Shows ext4 acknowledging an fsync whose data it then drops, with no lavd
and no SQLite involved (docs/RELIABILITY.md, "An fsync that ext4 acknowledged
and then lost").

Each round makes a fresh ext4 file system in an image on a loop device,
mounted errors=remount-ro, as store_faults.rs does. A writer process appends
4,120 bytes (one SQLite WAL frame, its number repeated) and fsyncs, again and again, and prints
each append's end offset once its fsync has returned success. This process
raises an ext4 error (/sys/fs/ext4/<dev>/trigger_fs_error, the kernel's own
error path, which aborts the journal and turns the file system read-only),
stops the writer, unmounts, runs e2fsck -fy, mounts again and reads the
file. A round is LOST when any acknowledged append does not read back
byte for byte (short, or zeros at the right size): the kernel said the
data was on disk, and it was not.

Modes:
  (none)          the error is raised while the writer runs;
  --double-fsync  the writer acknowledges an append only after a second
                  fsync also succeeds (can a program detect the loss?);
  --stop          the writer is stopped (SIGSTOP, every thread seen stopped,
                  so no system call of its is in flight) while the error is
                  raised, then continued: how store_faults.rs injects it.
                  Unlike a freeze, this flushes nothing the writer wrote
                  without fsync;
  --freeze        the error is raised between `fsfreeze -f` and
                  `fsfreeze -u` (which also writes back every dirty page).

Run as root, beside some CPU load (the race is narrow on an idle machine):

    for j in 1 2 3; do timeout 600 bash -c 'while :; do :; done' & done
    python3 softhsm-tests/repro/ext4_fsync_race.py 50
    python3 softhsm-tests/repro/ext4_fsync_race.py 50 --stop
    pkill -f 'while :; do :; done'

Exits 1 when a round lost acknowledged data, 0 otherwise.
"""

import os
import random
import signal
import subprocess
import sys
import tempfile
import time

FRAME = 4120


def frame(i):
    """Append number `i`'s bytes (as the writer makes them): its number,
    repeated, so that a frame read back as zeros or as another is seen."""
    return (i.to_bytes(8, "big") * 515)[:FRAME]

WRITER = r"""
import os, sys
def frame(i):
    return (i.to_bytes(8, "big") * 515)[:4120]
fd = os.open(sys.argv[1], os.O_RDWR)
twice = sys.argv[2] == "1"
end = 0
print(end, flush=True)
while True:
    try:
        os.pwrite(fd, frame(end // 4120), end)
        os.fsync(fd)
        if twice:
            os.fsync(fd)
    except OSError:
        break
    end += 4120
    print(end, flush=True)
"""


def sh(*args):
    return subprocess.run(list(args), capture_output=True, text=True, check=False)


def must(*args):
    r = sh(*args)
    if r.returncode != 0:
        sys.exit(f"{' '.join(args)}: {r.stderr.strip()}")
    return r.stdout.strip()


def stopped(pid):
    """Whether every thread of `pid` is stopped (state T or t)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        if state not in ("T", "t"):
            return False
    return True


def round_(work, mode):
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
        # Made and synced before the writer starts, so that every round has
        # the file whatever the error strikes.
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.fsync(fd)
        os.close(fd)
        dirfd = os.open(mnt, os.O_RDONLY)
        os.fsync(dirfd)
        os.close(dirfd)
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, path, "1" if mode == "--double-fsync" else "0"],
            stdout=subprocess.PIPE,
            text=True,
        )
        # Its first line (offset 0) once it runs.
        first = writer.stdout.readline()
        time.sleep(random.uniform(0.05, 0.3))
        if mode == "--stop":
            writer.send_signal(signal.SIGSTOP)
            while not stopped(writer.pid):
                time.sleep(0.001)
        if mode == "--freeze":
            must("fsfreeze", "-f", mnt)
        with open(f"/sys/fs/ext4/{os.path.basename(dev)}/trigger_fs_error", "w") as f:
            f.write("ext4_fsync_race.py")
        if mode == "--freeze":
            must("fsfreeze", "-u", mnt)
        if mode == "--stop":
            writer.send_signal(signal.SIGCONT)
        acked = [int(line) for line in (first + writer.communicate()[0]).split()]
        must("umount", mnt)
        fsck = sh("e2fsck", "-fy", dev)
        if fsck.returncode not in (0, 1):
            sys.exit(f"e2fsck exited {fsck.returncode}: {fsck.stdout}{fsck.stderr}")
        must("mount", dev, mnt)
        with open(path, "rb") as f:
            kept = f.read()
        must("umount", mnt)
    finally:
        sh("umount", "-l", mnt)
        sh("losetup", "-d", dev)
    last = acked[-1] if acked else 0
    # Every acknowledged append, byte for byte: not only the size (an
    # extent left unwritten reads back as zeros at the right size).
    bad = [i for i in range(last // FRAME) if kept[i * FRAME:(i + 1) * FRAME] != frame(i)]
    if bad:
        print(f"LOST: {len(bad)} of {last // FRAME} acknowledged appends (first: {bad[0]}), "
              f"{len(kept)} bytes kept")
        return True
    return False


def main():
    args = sys.argv[1:]
    modes = [a for a in args if a.startswith("--")]
    if len(modes) > 1 or modes and modes[0] not in ("--double-fsync", "--stop", "--freeze"):
        sys.exit("usage: ext4_fsync_race.py [ROUNDS] [--double-fsync | --stop | --freeze]")
    mode = modes[0] if modes else ""
    counts = [a for a in args if not a.startswith("--")]
    rounds = int(counts[0]) if counts else 25
    if os.geteuid() != 0:
        sys.exit("run as root: it mounts a loop device")
    lost = 0
    with tempfile.TemporaryDirectory() as work:
        for _ in range(rounds):
            lost += round_(work, mode)
    print(f"{lost} of {rounds} rounds lost data an fsync had acknowledged {mode}".rstrip())
    sys.exit(1 if lost else 0)


if __name__ == "__main__":
    main()
