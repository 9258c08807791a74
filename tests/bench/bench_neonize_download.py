"""What neonize's media download copies on the Python side, and what a 64 MiB file costs a worker.

`NeonizeBackend.fetch_media` calls neonize's ``NewClient.download_any``. After the Go call returns,
neonize (0.5.2) does, in Python:

1. ``consume_bytes_struct`` (the ctypes errcheck of ``DownloadAny``): ``ctypes.string_at`` copies Go's C
   buffer (a serialized ``DownloadReturnFunction``) into ``bytes``, then frees the C buffer;
2. ``DownloadReturnFunction.FromString``: upb parses it into its arena (a copy);
3. ``media.Binary``: a new ``bytes`` of the payload (a copy; every access copies again).

Without a network the Go side cannot run, so this reproduces the moment it returns: a C buffer
(malloc'd here, laid out as Go's) holding a serialized ``DownloadReturnFunction`` of ``--mib`` MiB, then
neonize's own ``download_any`` and ``consume_bytes_struct`` run on it (the Go call is the only stand-in),
then the bytes go out as ``fetch_media`` writes them (1 MiB memoryview slices). Each step is also run
alone, its resident-memory growth measured (VmRSS, VmHWM reset through /proc/self/clear_refs), which
counts the copies. For comparison, the `direct` path reads the payload out of the C buffer in place.

    .venv/bin/python tests/bench/bench_neonize_download.py [--mib 64] [--idle-mib 74] [--no-record]
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import hashlib
import inspect
import os
import time
from types import SimpleNamespace
from typing import Any

MiB = 1 << 20
CHUNK = 1 << 20  # what fetch_media hands the store per write
LIBC = ctypes.CDLL(None)
LIBC.malloc.restype = ctypes.c_void_p
LIBC.malloc.argtypes = [ctypes.c_size_t]
LIBC.free.argtypes = [ctypes.c_void_p]


def status(field: str) -> int:
    """A /proc/self/status figure in bytes (VmRSS: now, VmHWM: the peak since the last reset)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    """VmHWM := VmRSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def go_return(size: int, bytes_cls: Any) -> tuple[Any, str]:
    """What Go's DownloadAny hands back: a malloc'd BytesReturn {ptr, size} whose data is a serialized
    DownloadReturnFunction {Binary: payload} (field 1, length-delimited); the payload's SHA-256."""
    header = b"\x0a" + varint(size)
    total = len(header) + size
    data = LIBC.malloc(total)
    struct = LIBC.malloc(ctypes.sizeof(bytes_cls))
    if not data or not struct:
        raise MemoryError("malloc failed")
    ctypes.memmove(data, header, len(header))
    digest = hashlib.sha256()
    piece = os.urandom(CHUNK)  # one random MiB, varied per slice: no page of the payload is left untouched
    for offset in range(0, size, CHUNK):
        part = (offset.to_bytes(8, "little") + piece[8:])[: min(CHUNK, size - offset)]
        ctypes.memmove(data + len(header) + offset, part, len(part))
        digest.update(part)
    ret = ctypes.cast(struct, ctypes.POINTER(bytes_cls))
    ret.contents.ptr, ret.contents.size = data, total
    return ret, digest.hexdigest()


def free_go_return(ret: Any) -> None:
    LIBC.free(ret.contents.ptr)
    LIBC.free(ctypes.cast(ret, ctypes.c_void_p).value)


def write_like_fetch_media(data: Any, fd: int) -> str:
    """fetch_media's loop: memoryview slices of at most 1 MiB, no copy; hashed to check the bytes."""
    digest = hashlib.sha256()
    view = memoryview(data)
    for start in range(0, len(view), CHUNK):
        chunk = view[start:start + CHUNK]
        os.write(fd, chunk)
        digest.update(chunk)
    return digest.hexdigest()


@dataclasses.dataclass
class Step:
    name: str
    grew: int  # VmRSS after the step minus before it
    peak: int  # VmHWM during the step minus VmRSS before it


def measure(name: str, fn: Any, *args: Any) -> tuple[Any, Step]:
    before = status("VmRSS")
    reset_peak()
    result = fn(*args)
    return result, Step(name, status("VmRSS") - before, status("VmHWM") - before)


def check_the_source(nc: Any, binder: Any) -> None:
    """The reproduction follows neonize's code as installed; stop if a new neonize changed it."""
    download = inspect.getsource(nc.NewClient.download_any)
    consume = inspect.getsource(binder.consume_bytes_struct)
    for needle, text in (("DownloadReturnFunction.FromString(protobytes)", download),
                         ("return media.Binary", download), ("self.__client.DownloadAny", download),
                         ("ctypes.string_at(contents.ptr, contents.size)", consume),
                         ("gocode.FreeBytesStruct(result)", consume)):
        if needle not in text:
            raise SystemExit(f"neonize changed: {needle!r} is no longer in its download path; update this bench")
    if binder.gocode.DownloadAny.errcheck is not binder.consume_bytes_struct:
        raise SystemExit("neonize changed: DownloadAny's errcheck is not consume_bytes_struct")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=64, help="payload size (media_max_bytes is 64 MiB)")
    ap.add_argument("--idle-mib", type=float, default=74.0,
                    help="RSS of an idle neonize worker (BENCHMARKS.md neonize_memory: 73.7 MiB)")
    ap.add_argument("--no-record", action="store_true", help="print only; do not write results/")
    args = ap.parse_args()
    size = args.mib * MiB

    import neonize
    import neonize._binder as binder
    import neonize.client as nc
    from neonize.proto.Neonize_pb2 import DownloadReturnFunction
    from neonize.proto.waE2E.WAWebProtobufsE2E_pb2 import Message

    check_the_source(nc, binder)
    sink = os.open(os.devnull, os.O_WRONLY)

    # Step by step: how much each of neonize's steps adds to the resident set.
    ret, want = go_return(size, binder.Bytes)
    raw, s1 = measure("string_at (consume_bytes_struct)", ctypes.string_at, ret.contents.ptr, ret.contents.size)
    free_go_return(ret)  # consume_bytes_struct frees Go's buffer right after the copy
    parsed, s2 = measure("DownloadReturnFunction.FromString", DownloadReturnFunction.FromString, raw)
    binary, s3 = measure("media.Binary", getattr, parsed, "Binary")
    again, s3b = measure("media.Binary (a second access)", getattr, parsed, "Binary")
    assert binary is not again  # each access is a fresh copy
    del again, raw, parsed
    got, s4 = measure("fetch_media writes (1 MiB memoryview slices)", write_like_fetch_media, binary, sink)
    assert got == want, "the bytes changed on the way"
    del binary
    steps = [s1, s2, s3, s3b, s4]
    copies = sum(1 for s in (s1, s2, s3) if s.peak >= 0.9 * size)

    # End to end: neonize's own download_any (the Go call is the only stand-in) and fetch_media's writes.
    baseline = status("VmRSS")
    ret, want = go_return(size, binder.Bytes)
    with_c_buffer = status("VmRSS")

    class GoSide:
        """neonize's `self.__client`: the DownloadAny symbol, whose ctypes errcheck turns Go's buffer into bytes."""

        def DownloadAny(self, uuid: bytes, message: bytes, length: int) -> bytes:  # noqa: N802 - Go's name
            return binder.consume_bytes_struct(ret, None, None)  # string_at, then Go's FreeBytesStruct

    stand_in = SimpleNamespace(uuid=b"bench", _NewClient__client=GoSide())
    reset_peak()
    started = time.perf_counter()
    data = nc.NewClient.download_any(stand_in, Message())  # type: ignore[arg-type]
    got = write_like_fetch_media(data, sink)
    took = time.perf_counter() - started
    neonize_peak = status("VmHWM") - baseline
    assert got == want
    del data

    # The alternative: the payload read in place from Go's buffer (what a direct ctypes call could do).
    baseline_direct = status("VmRSS")
    ret, want = go_return(size, binder.Bytes)
    reset_peak()
    started = time.perf_counter()
    header = 1 + len(varint(size))
    view = memoryview((ctypes.c_char * size).from_address(ret.contents.ptr + header)).cast("B")
    got = write_like_fetch_media(view, sink)
    view.release()
    free_go_return(ret)
    took_direct = time.perf_counter() - started
    direct_peak = status("VmHWM") - baseline_direct
    assert got == want
    os.close(sink)

    from waportd.config import Config

    limit = Config().memory_limit
    python_x = neonize_peak / size
    go_x = 2  # estimate: whatsmeow's decrypted media + its marshalled DownloadReturnFunction (Go heap)
    worst = args.idle_mib + (python_x + go_x) * args.mib

    print(f"neonize {neonize.__version__}: NewClient.download_any of a {args.mib} MiB file, Python side "
          f"(the Go call stood in for; {os.cpu_count()} cores)")
    for s in steps:
        print(f"  {s.name:48} +{s.grew / MiB:7.1f} MiB resident, peak +{s.peak / MiB:7.1f} MiB")
    print(f"  copies of the payload made in Python: {copies} (string_at, the upb parse, .Binary); "
          f"fetch_media's slices add none")
    print(f"  Go's C buffer (allocated by Go before Python sees it): {(with_c_buffer - baseline) / MiB:.1f} MiB")
    print(f"  peak above the baseline before Go's answer: {neonize_peak / MiB:.1f} MiB ({python_x:.2f}x the file: "
          f"the string_at bytes, upb's parse and .Binary alive at once; Go's C buffer is freed after the first "
          f"copy), {took * 1000:.0f} ms")
    print(f"  in place from Go's buffer instead (a direct ctypes call, not neonize's): peak "
          f"{direct_peak / MiB:.1f} MiB, {took_direct * 1000:.0f} ms")
    print(f"  Go heap (not measurable without WhatsApp): >= ~{go_x}x the file while DownloadAny runs (the "
          f"decrypted media, its marshalled answer); Go returns it to the OS only minutes later")
    print(f"memory_limit: default {limit} ({'off' if not limit else f'{limit / MiB:.0f} MiB'}); an idle neonize "
          f"worker is ~{args.idle_mib:.0f} MiB RSS")
    print(f"  one {args.mib} MiB download: ~{args.idle_mib:.0f} + {python_x * args.mib:.0f} (Python) + "
          f"~{go_x * args.mib} (Go) = ~{worst:.0f} MiB at its peak; two at once (mediafetch runs 2): "
          f"~{args.idle_mib + 2 * (python_x + go_x) * args.mib:.0f} MiB")
    for candidate in (256, 512, 768):
        largest = max(0.0, (candidate - args.idle_mib) / (python_x + go_x))
        print(f"  memory_limit {candidate} MiB: a download of up to ~{largest:.0f} MiB fits (one at a time); "
              f"{'a 64 MiB one can get the worker restarted' if largest < 64 else '64 MiB fits'}")

    if not args.no_record:
        from common import record

        record("neonize_download", {
            "file_mib": args.mib, "python_copies": copies,
            "python_peak_mib": round(neonize_peak / MiB, 1), "python_peak_x": round(python_x, 2),
            "c_buffer_mib": round((with_c_buffer - baseline) / MiB, 1),
            "steps_peak_mib": {key: round(s.peak / MiB, 1) for key, s in zip(
                ("1_string_at", "2_from_string", "3_binary", "3b_binary_again", "4_fetch_media_writes"), steps,
                strict=True)},
            "in_place_peak_mib": round(direct_peak / MiB, 1),
            "neonize_ms": round(took * 1000), "in_place_ms": round(took_direct * 1000),
            "go_heap_x_estimate": go_x, "idle_worker_mib": args.idle_mib,
            "worst_one_download_mib": round(worst), "memory_limit_default": limit,
            "note": "Python side of neonize's download_any with the Go call stood in for (no network); "
                    "Go heap is an estimate",
        })


if __name__ == "__main__":
    main()
