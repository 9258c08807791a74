"""The floor under the send path: what one of our processes pays to receive a message and send one on,
with nothing else to do (issue 16).

An echo process (a ROUTER socket, a poll loop, JSON in and out: how every process of ours handles a
frame) answers a client's DEALER. Measured: the echo's CPU per message, with the client sending one at
a time (each message wakes the echo: the steady case) and with 1,000 in flight (the burst). A send
crosses such a boundary six times (client -> supervisor -> worker -> network -> worker -> supervisor ->
client, plus the supervisor's nudge to the worker), each costing a receive and a send somewhere, so
six echoes are a floor under the CPU per message of the whole pipeline, before any journal, rate
limit or validation.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import time

import zmq
from common import host_speed, machine, record

PAYLOAD = {"id": "3EB0D464A3FE4F00CD8E", "cmd": "send", "args": {"company": "salon_42", "to": "15550109999",
                                                                    "text": "Your booking is confirmed for 10:00"}}


def echo(endpoint: str, ready: multiprocessing.synchronize.Event) -> None:  # type: ignore[name-defined]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(endpoint)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    ready.set()
    while True:
        for _ in poller.poll(1000):
            while True:
                try:
                    ident, frame = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                msg = json.loads(frame)
                if msg.get("cmd") == "quit":
                    usage = resource.getrusage(resource.RUSAGE_SELF)
                    sock.send_multipart([ident, json.dumps({"cpu": usage.ru_utime + usage.ru_stime}).encode()])
                    sock.close(linger=1000)
                    ctx.term()
                    return
                reply = {"id": msg["id"], "ok": True, "result": {"message_id": msg["id"], "status": "queued"}}
                sock.send_multipart([ident, json.dumps(reply).encode()])


def cpu_of(sock: zmq.Socket) -> float:
    sock.send(json.dumps({"cmd": "quit"}).encode())
    return json.loads(sock.recv())["cpu"]


def run(mode: str, messages: int, in_flight: int) -> dict[str, float]:
    endpoint = f"ipc:///tmp/waport-hop-{os.getpid()}-{mode}.sock"
    ready = multiprocessing.Event()
    proc = multiprocessing.Process(target=echo, args=(endpoint, ready))
    proc.start()
    ready.wait(10)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(endpoint)
    frame = json.dumps(PAYLOAD).encode()
    sock.send(frame)  # warm up: connected, first frame through
    sock.recv()
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    sent = received = 0
    while received < messages:
        while sent < messages and sent - received < in_flight:
            sock.send(frame)
            sent += 1
        sock.recv()
        received += 1
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    echo_cpu = cpu_of(sock)
    proc.join(10)
    sock.close(linger=0)
    ctx.term()
    client_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"messages_per_s": round(messages / seconds),
            "echo_cpu_us_per_message": round(echo_cpu / messages * 1e6, 1),
            "client_cpu_us_per_message": round(client_cpu / messages * 1e6, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=20_000)
    args = ap.parse_args()
    one = run("one", args.messages, 1)
    burst = run("burst", args.messages, 1000)
    floor = {"steady": round(6 * one["echo_cpu_us_per_message"]),
             "burst": round(6 * burst["echo_cpu_us_per_message"])}
    figures = {"machine": machine(), "one_at_a_time": one, "in_flight_1000": burst,
               "pipeline_floor_cpu_us_per_message": floor, "host_speed_kops": host_speed()}
    record("hop", figures)  # prints them too


if __name__ == "__main__":
    main()
