"""Time a verifying load from a local S3 server: manifest_ckpt against s3fs reading whole objects.

A moto S3 server runs as its own process on 127.0.0.1 (real HTTP, so the client's GIL is its
own). The same model is uploaded once as a manifest checkpoint; each repeat, in alternating
order, a fresh process:

- ``mc``: ``manifest_ckpt.load(model, "s3://...", verify_digests=True)`` (ranged, concurrent
  reads; every digest checked before the first copy);
- ``s3fs``: ``fs.cat_file`` of each weights object whole, ``safetensors.torch.load`` of the
  bytes, ``model.load_state_dict`` (no digest check: the peer does less work).

Each process reports its time and its peak anonymous memory above the baseline taken just before
the clock starts (``RssAnon`` sampled every millisecond on a thread: ``ru_maxrss`` would report
the imports' transient peak instead); medians, min-max and the ratio of medians are printed
(``--json PATH`` writes them).
``check`` is measured by bytes: what the library fetched against manifest + headers.

Run from the repository root: ``PYTHONPATH=. python benchmarks/bench_remote.py [--size-mb 256] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import torch
from torch import nn

BUCKET = "bench"
KEY = "ckpt"


def _model(size_mb: int) -> nn.Module:
    count = 16
    side = int((size_mb * 2**20 / 4 / count) ** 0.5)
    return nn.Sequential(*[nn.Linear(side, side, bias=False) for _ in range(count)])


def _options(endpoint: str) -> dict[str, Any]:
    return {"key": "bench", "secret": "bench", "endpoint_url": endpoint, "skip_instance_cache": True}


def _rss_mb() -> float:
    """This process's anonymous resident memory now, in MiB (``ru_maxrss`` where /proc is absent)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Peak:
    """The highest ``_rss_mb`` seen while running, sampled every millisecond."""

    def __init__(self) -> None:
        self.value = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self.value = max(self.value, _rss_mb())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.value, _rss_mb())


def _child(contender: str, endpoint: str, size_mb: int) -> dict[str, float]:
    """One timed load in this (fresh) process."""
    torch.manual_seed(1)
    model = _model(size_mb)
    options = _options(endpoint)
    url = f"s3://{BUCKET}/{KEY}"
    # Everything either side imports is imported before the clock starts.
    import fsspec
    import s3fs  # noqa: F401
    from safetensors.torch import load

    import manifest_ckpt as mc
    import manifest_ckpt.reader
    import manifest_ckpt.storage.remote

    if contender.startswith("mc-"):  # mc-BLOCK_MB-CONCURRENCY: the store's knobs, for comparing them
        block_mb, concurrency = (int(x) for x in contender.split("-")[1:])
        manifest_ckpt.storage.remote.BLOCK_BYTES = block_mb << 20
        manifest_ckpt.storage.remote.CONCURRENCY = concurrency
        contender = "mc"
    base = _rss_mb()
    peak = _Peak()
    start = time.perf_counter()
    if contender == "mc":
        mc.load(model, url, verify_digests=True, storage_options=options)
    else:
        fs = fsspec.filesystem("s3", **options)
        manifest = json.loads(fs.cat_file(f"{BUCKET}/{KEY}/manifest.json"))
        state: dict[str, torch.Tensor] = {}
        for name in manifest["files"]:
            state.update(load(fs.cat_file(f"{BUCKET}/{KEY}/{name}")))
        model.load_state_dict(state)
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "peak_extra_mb": peak.stop() - base}


def _start_server() -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return server, f"http://127.0.0.1:{port}"
        except OSError:
            if time.monotonic() > deadline:
                server.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.1)


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument(
        "--variants", default="", help="also time mc with these BLOCK_MB-CONCURRENCY settings, e.g. 32-4,64-2"
    )
    parser.add_argument("--_child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        print(json.dumps(_child(args._child[0], args._child[1], int(args._child[2]))))
        return 0

    import fsspec

    import manifest_ckpt as mc
    from manifest_ckpt.storage import remote

    server, endpoint = _start_server()
    try:
        fs = fsspec.filesystem("s3", **_options(endpoint))
        fs.mkdir(BUCKET)
        torch.manual_seed(0)
        manifest = mc.save(_model(args.size_mb), f"s3://{BUCKET}/{KEY}", storage_options=_options(endpoint),
                           record_code=False)
        # check: count what the library fetched (a spy on the store it opens).
        opened: list[remote.FsspecStore] = []
        original = remote.open_remote_store

        def spy(url: str, options: Any = None) -> remote.FsspecStore:
            opened.append(original(url, options))
            return opened[-1]

        remote.open_remote_store = spy  # type: ignore[assignment]
        try:
            mc.check(_model(args.size_mb), f"s3://{BUCKET}/{KEY}", storage_options=_options(endpoint))
        finally:
            remote.open_remote_store = original  # type: ignore[assignment]
        check_read = sum(store.bytes_read for store in opened)
        manifest_bytes = len(fs.cat_file(f"{BUCKET}/{KEY}/manifest.json"))
        headers = sum(
            8 + int.from_bytes(fs.cat_file(f"{BUCKET}/{KEY}/{name}", start=0, end=8), "little")
            for name in manifest.files
        )
        contenders = ["mc", "s3fs", *(f"mc-{v}" for v in args.variants.split(",") if v)]
        runs: dict[str, list[dict[str, float]]] = {c: [] for c in contenders}
        env = {**os.environ, "PYTHONPATH": os.getcwd()}
        for i in range(args.repeats + 1):  # the first round warms the server and the page cache
            order = contenders if i % 2 == 0 else contenders[::-1]
            for contender in order:
                out = subprocess.run(
                    [sys.executable, __file__, "--_child", contender, endpoint, str(args.size_mb)],
                    check=True, capture_output=True, text=True, env=env, timeout=600,
                )
                if i:
                    runs[contender].append(json.loads(out.stdout.strip().splitlines()[-1]))
                    print(f"  round {i} {contender:9s} {runs[contender][-1]}", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)

    size = sum(f.size for f in manifest.files.values())
    result: dict[str, Any] = {
        "bytes": size,
        "repeats": args.repeats,
        "loadavg": os.getloadavg(),
        "seconds": {c: _summary([r["seconds"] for r in rs]) for c, rs in runs.items()},
        "peak_extra_mb": {c: _summary([r["peak_extra_mb"] for r in rs]) for c, rs in runs.items()},
    }
    result["time_ratio"] = result["seconds"]["mc"]["median"] / result["seconds"]["s3fs"]["median"]
    result["memory_ratio"] = result["peak_extra_mb"]["mc"]["median"] / result["peak_extra_mb"]["s3fs"]["median"]
    for c in contenders[2:]:
        result[f"time_ratio {c}"] = result["seconds"][c]["median"] / result["seconds"]["s3fs"]["median"]
    result["check"] = {"bytes_read": check_read, "manifest_plus_headers": manifest_bytes + headers}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
