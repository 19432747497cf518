"""fio job specifications and one runner for all of them.

A job is a pattern (block size, direction, one pass or timed) plus an
iodepth and a number of connections. With N connections fio runs N jobs
(processes, each with its own NBD connection or file descriptor), each over
its own 1/N of the image, and the figures are their sum. The images they
run on are made by `fill_random`.
"""

import json
import os
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class Pattern:
    key: str
    rw: str  # fio rw=
    bs: str
    timed: bool  # timed (runtime) or one pass over the region
    unit: str  # "MiB/s" or "IOPS"
    write: bool
    text: str


PATTERNS = {
    "w4k": Pattern("w4k", "randwrite", "4k", True, "IOPS", True, "4 KiB random write"),
    "w1m": Pattern("w1m", "write", "1m", True, "MiB/s", True, "1 MiB sequential write"),
    # One pass, a 4 KiB write at the start of every 256 KiB chunk, in order:
    # with a snapshot held, every write is the first one to its chunk.
    "c4k": Pattern("c4k", "write:252k", "4k", False, "IOPS", True,
                   "4 KiB write, one per 256 KiB chunk (one pass)"),
    # One pass of 1 MiB sequential writes over the whole image.
    "c1m": Pattern("c1m", "write", "1m", False, "MiB/s", True, "1 MiB sequential write (one pass)"),
    "r1m": Pattern("r1m", "read", "1m", True, "MiB/s", False, "1 MiB sequential read"),
    "r4k": Pattern("r4k", "randread", "4k", True, "IOPS", False, "4 KiB random read"),
}


def fill_random(path, size):
    """`size` bytes of random data at `path`, written in 4 MiB writes and
    made durable."""
    with open("/dev/urandom", "rb") as src, open(path, "wb") as dst:
        left = size
        while left:
            n = min(left, 4 << 20)
            dst.write(src.read(n))
            left -= n
        dst.flush()
        os.fsync(dst.fileno())


def run_fio(target, pattern, iodepth, conns, size, runtime, ramp, extra=(), log=None):
    """Runs one fio job; returns a dict of figures (summed over the
    connections)."""
    region = size // conns
    args = ["fio", "--name=bench", "--output-format=json", "--group_reporting",
            f"--rw={pattern.rw}", f"--bs={pattern.bs}", f"--iodepth={iodepth}",
            f"--numjobs={conns}", f"--size={region}", f"--offset_increment={region}",
            "--norandommap", "--randrepeat=1", "--invalidate=0", *target, *extra]
    if pattern.timed:
        args += ["--time_based", f"--runtime={runtime}", f"--ramp_time={ramp}"]
    elif pattern.rw.startswith("write:"):
        # Sequential with holes: fio would wrap around the region until it
        # had moved `size` bytes; stop after one pass.
        step = parse_size(pattern.bs) + parse_size(pattern.rw.split(":")[1])
        args += [f"--io_size={region // step * parse_size(pattern.bs)}"]
    if log is not None:
        log.write(" ".join(args) + "\n")
        log.flush()
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"fio failed ({proc.returncode}): {' '.join(args)}\n{proc.stderr[-2000:]}")
    out = proc.stdout
    # fio may print warnings before the JSON.
    data = json.loads(out[out.index("{"):])
    job = data["jobs"][0]
    d = job["write"] if pattern.write else job["read"]
    if job.get("error"):
        raise RuntimeError(f"fio job error {job['error']}: {' '.join(args)}")
    clat = d["clat_ns"]
    pct = clat.get("percentile", {})
    return {
        "mib_s": d["bw_bytes"] / 2**20,
        "iops": d["iops"],
        "ios": d["total_ios"],
        "seconds": d["runtime"] / 1000.0,
        "clat_mean_us": clat["mean"] / 1000.0,
        "clat_p50_us": pct.get("50.000000", 0) / 1000.0,
        "clat_p99_us": pct.get("99.000000", 0) / 1000.0,
        "clat_max_us": clat["max"] / 1000.0,
        "usr_cpu": job["usr_cpu"],
        "sys_cpu": job["sys_cpu"],
    }


def parse_size(text):
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    if text[-1].lower() in units:
        return int(text[:-1]) * units[text[-1].lower()]
    return int(text)


def figure(result, pattern):
    return result["mib_s"] if pattern.unit == "MiB/s" else result["iops"]
