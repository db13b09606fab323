"""The web demo under load: concurrent ``/explain`` requests from a bounded client loop.

Starts ``clip-surgery demo`` (tiny-synth, 127.0.0.1, a free port) as its own process, sends
``--requests`` requests, ``--parallel`` at a time, through ``gradio_client``, and prints the p50
and p95 latency (submit to result, queue wait included) and the server's resident memory before
and after. The server runs under an audit hook that reports any connection or name lookup
beyond the loopback address (there must be none).

Run: ``.venv/bin/python benchmarks/bench_demo.py`` (about a minute on 2 cores). The tests
(``tests/test_demo.py``) use the same functions.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "scenes" / "test_00007.png"
TEXTS = "circle, square, ring"

OFFLINE_GUARD = """\
import sys
LOCAL = ("127.0.0.1", "::1", "localhost", "0.0.0.0", "::", None)
def _outbound(event, args):
    if event == "socket.connect" and isinstance(args[1], tuple) and args[1][0] not in LOCAL:
        print(f"OUTBOUND connect {args[1]}", file=sys.stderr, flush=True)
    elif event == "socket.getaddrinfo" and args[0] not in LOCAL and args[0] != b"localhost":
        print(f"OUTBOUND lookup {args[0]}", file=sys.stderr, flush=True)
sys.addaudithook(_outbound)
from clip_surgery.cli import main
sys.exit(main(sys.argv[1:]))
"""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(port: int, *flags: str, log: Path, env: dict | None = None) -> subprocess.Popen:
    """``clip-surgery demo`` on 127.0.0.1:port under the offline guard; output to ``log``."""
    command = [sys.executable, "-c", OFFLINE_GUARD, "demo", "--host", "127.0.0.1"]
    command += ["--port", str(port), *flags]
    with open(log, "wb") as handle:
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)


def wait_ready(url: str, process: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    """Return once the page answers; RuntimeError with the server's output if it never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the demo server exited: {log.read_text(errors='replace')}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise RuntimeError(f"the demo server did not answer in {timeout:.0f} s")


def stop_server(process: subprocess.Popen) -> None:
    """Stop the server (SIGTERM, then SIGKILL after 10 s)."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def run_load(
    url: str,
    count: int,
    parallel: int,
    *,
    image: Path = EXAMPLE,
    texts: str = TEXTS,
    timeout: float = 120.0,
) -> list[float]:
    """Seconds per request (submit to result) of ``count`` requests, ``parallel`` at a time;
    raises the first request's error, or TimeoutError past ``timeout`` in all."""
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    deadline = time.monotonic() + timeout

    def one(_: int) -> float:
        started = time.perf_counter()
        job = client.submit(handle_file(str(image)), texts, api_name="/explain")
        job.result(timeout=max(1.0, deadline - time.monotonic()))
        return time.perf_counter() - started

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        return list(pool.map(one, range(count)))


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def main() -> None:
    """Start a server, load it, print latency percentiles and memory."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--parallel", type=int, default=20, help="requests in flight at once")
    parser.add_argument("--concurrency", type=int, default=2, help="the server's --concurrency")
    args = parser.parse_args()
    port, log = free_port(), Path(os.environ.get("TMPDIR", "/tmp")) / "bench_demo.log"
    flags = ("--concurrency", str(args.concurrency), "--queue-size", str(args.requests + 8))
    server = start_server(port, *flags, log=log)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_ready(url, server, log)
        run_load(url, 2, 1)  # warm-up: first-call costs are not the steady state
        before = rss_mb(server.pid)
        seconds = run_load(url, args.requests, args.parallel)
        after = rss_mb(server.pid)
    finally:
        stop_server(server)
    outbound = [line for line in log.read_text().splitlines() if line.startswith("OUTBOUND")]
    print(f"{args.requests} requests, {args.parallel} in flight, server concurrency "
          f"{args.concurrency}: p50 {percentile(seconds, 50):.2f} s, "
          f"p95 {percentile(seconds, 95):.2f} s, max {max(seconds):.2f} s")  # fmt: skip
    print(f"server memory: {before:.0f} MiB before, {after:.0f} MiB after")
    print(f"outbound connections or lookups: {len(outbound)}")


if __name__ == "__main__":
    main()
