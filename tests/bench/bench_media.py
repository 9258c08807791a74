"""Media (issue 15): 100 companies sending 100 KiB images through the simulated network, and a sim worker
receiving a 50 MiB document.

    python tests/bench/bench_media.py --companies 100 --messages 4000

- `images`: a burst of image sends (each company its own 100 KiB picture, stored first) through the control
  socket, then the same burst of texts: messages/s from the first send to the last one at the network.
- `copies`: what the workers read per message (/proc/PID/io `rchar`: every read syscall, files and SQLite),
  image burst minus text burst, over the file's size: 1.0 is the store file read once into one buffer.
  zmq sends that buffer's 1 MiB slices with copy=False (no copy in Python; libzmq's `send` to the socket,
  which `rchar`/`wchar` do not count, is the network itself), and the network checks size and SHA-256.
- `receive_50mib`: one sim worker downloads a 50 MiB document into the store: its peak RSS (VmHWM) before
  and after, and the download time. Holding the whole file twice would add 100 MiB.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable

import psutil
from bench_send import burst
from common import Daemon, EventTap, SimNetProcess, count_state, record, wait_for

from ipc.mediastore import WIRE_CHUNK, put_args

IMAGE_BYTES = 100 << 10
DOC_BYTES = 50 << 20


def store(d: Daemon, data: bytes, mimetype: str) -> str:
    upload = None
    for start in range(0, len(data), WIRE_CHUNK):
        args = put_args(data[start:start + WIRE_CHUNK], upload)
        if start + WIRE_CHUNK >= len(data):
            return d.ctl("media_put", **args, last=True, mimetype=mimetype)["media_id"]
        upload = d.ctl("media_put", **args)["upload"]
    raise AssertionError("no data")


def io_of(pids: list[int]) -> tuple[int, int]:
    read = written = 0
    for pid in pids:
        try:
            io = psutil.Process(pid).io_counters()
        except psutil.Error:
            continue
        read += io.read_chars
        written += io.write_chars
    return read, written  # written: files only (libzmq's send() is not counted)


def vm_hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def send_burst(d: Daemon, net: SimNetProcess, companies: list[str], total: int,
               args_of: Callable[[int], dict]) -> dict:
    """`total` sends as fast as accepted (bench_send's burst); seconds until the network has them all."""
    before = net.stats()["messages_sent"]
    pids = [r["pid"] for r in d.ctl("list")["sessions"] if r.get("pid")]
    io_before = io_of(pids)
    accepted = burst(d.run_dir, companies, total, args_of=args_of)
    answered = time.monotonic()
    wait_for(lambda: net.stats()["messages_sent"] >= before + accepted["accepted"], timeout=600, interval=0.05)
    elapsed = accepted["seconds"] + time.monotonic() - answered
    io_after = io_of(pids)
    return {"messages": total, "accepted": accepted["accepted"], "accept_seconds": accepted["seconds"],
            "seconds": round(elapsed, 2), "sent_per_s": round(accepted["accepted"] / elapsed),
            "worker_read_bytes": io_after[0] - io_before[0]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--companies", type=int, default=100)
    ap.add_argument("--messages", type=int, default=4000)
    args = ap.parse_args()
    os.sync()
    base = tempfile.mkdtemp(prefix="wpm-", dir="/tmp")
    net = SimNetProcess(base)
    companies = [f"m{i:03d}" for i in range(args.companies)]
    d = Daemon(base, sim_endpoint=net.endpoint, companies=companies, heartbeat_interval=5.0,
               rate_limit_max=10_000_000)
    figures: dict = {"companies": args.companies, "image_bytes": IMAGE_BYTES}
    try:
        d.start()
        wait_for(lambda: count_state(d, "connected") == args.companies, timeout=120, interval=0.5)
        images = {c: store(d, os.urandom(IMAGE_BYTES), "image/jpeg") for c in companies}
        burst(d.run_dir, companies, 200)  # warm: every journal open, every worker awake
        time.sleep(1)
        image = send_burst(d, net, companies, args.messages,
                           lambda n: {"type": "image", "media": images[companies[n % len(companies)]],
                                      "text": f"menu {n}"})
        text = send_burst(d, net, companies, args.messages, lambda n: {"text": f"menu {n}"})
        figures["images"], figures["texts"] = image, text
        n = args.messages
        at_network = [m for m in net.call("sent")["messages"] if m.get("type") == "image"]
        figures["copies"] = {
            "file_reads_per_send": round((image["worker_read_bytes"] - text["worker_read_bytes"]) / n / IMAGE_BYTES, 2),
            "bytes_at_network_per_send": round(sum(m["size"] for m in at_network) / len(at_network) / IMAGE_BYTES, 2),
        }
        d.cleanup()

        # One worker receiving a 50 MiB document.
        os.makedirs(os.path.join(base, "doc"))
        d = Daemon(os.path.join(base, "doc"), sim_endpoint=net.endpoint, companies=["m000"])
        d.start()
        pid = d.wait_state("m000", "connected")["pid"]
        time.sleep(1)
        path = os.path.join(base, "big.pdf")
        with open(path, "wb") as fh:
            for _ in range(DOC_BYTES >> 20):
                fh.write(os.urandom(1 << 20))
        rss_before = psutil.Process(pid).memory_info().rss
        hwm_before = vm_hwm_kib(pid)
        tap = EventTap(d.run_dir, b"m000.message")
        start = time.monotonic()
        net.call("inbound", company="m000", **{"from": "15550100001"}, type="document", media_path=path,
                 mimetype="application/pdf", filename="big.pdf", id="BIG-1")
        media = tap.wait(lambda e: e["data"]["id"] == "BIG-1", timeout=300, what="the document")["data"]["media"]
        seconds = time.monotonic() - start
        tap.close()
        assert media["status"] == "stored", media
        figures["receive_50mib"] = {
            "seconds": round(seconds, 2), "mib_per_s": round(DOC_BYTES / 2**20 / seconds, 1),
            "worker_rss_before_mib": round(rss_before / 2**20, 1),
            "worker_peak_rss_before_mib": round(hwm_before / 1024, 1),
            "worker_peak_rss_after_mib": round(vm_hwm_kib(pid) / 1024, 1),
            "peak_growth_mib": round((vm_hwm_kib(pid) - hwm_before) / 1024, 1),
        }
    finally:
        d.cleanup()
        net.stop()
        shutil.rmtree(base, ignore_errors=True)
    record(f"media_{args.companies}", figures)


if __name__ == "__main__":
    main()
