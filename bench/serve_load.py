"""Load on `vlp serve`: N concurrent clients on loopback for a bounded time, mixed requests.

Builds an index of random 64 px images with the tiny CLIP of configs/clip/tiny.yaml (random
weights), starts `vlp serve` on it in its own process, and runs `--clients` clients, each
sending one request after another for `--seconds`: 70 % text searches, 20 % image searches
(a PNG upload), 10 % zero-shot classifications (a PNG upload, 5 labels). Reports requests/s,
p50/p95/p99 latency, errors (anything but 200) and the server's resident memory: at the start
of the load, its peak during it, and at the end (bounded: the peak must not keep growing).
With `--batch 1,16` it runs once per `--max-batch`, to see whether batching pays.

    .venv/bin/python bench/serve_load.py [--clients 32] [--seconds 30] [--images 1000] [--batch 1,16]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

import vlp
from vlp.apps.index import build
from vlp.config import load_run_config, recipe_config_path
from vlp.data.tokenizer import Tokenizer

WORDS = ["red", "green", "blue", "yellow", "circle", "square", "triangle", "small", "large", "left", "right"]
LABELS = "a red circle, a green square, a blue triangle, a yellow thing, a cat"


def tiny_clip_run(folder: Path) -> Path:
    """configs/clip/tiny.yaml with random weights, saved as a run `vlp serve` can load."""
    cfg = load_run_config("clip", recipe_config_path("clip"))
    texts = [f"a {a} {b} {c}" for a in WORDS for b in WORDS for c in WORDS]
    tokenizer = Tokenizer.train(texts, vocab_size=256)
    model_cfg = {**cfg.model, "text": {**cfg.model["text"], "vocab_size": tokenizer.vocab_size}}
    torch.manual_seed(0)
    model = vlp.create_model("clip", model_cfg, tokenizer=tokenizer).eval()
    vlp.save(model, folder)
    return folder


def random_pngs(count: int, seed: int, size: int = 64) -> list[bytes]:
    gen = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        data = io.BytesIO()
        Image.fromarray(gen.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(data, format="PNG")
        out.append(data.getvalue())
    return out


def build_index(root: Path, images: int) -> Path:
    run = tiny_clip_run(root / "model")
    (root / "photos").mkdir()
    for i, data in enumerate(random_pngs(images, seed=0)):
        (root / "photos" / f"{i:06d}.png").write_bytes(data)
    build(vlp.load(run), [root / "photos"], root / "index", str(run), workers=0)
    return root / "index"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


async def client(http: httpx.AsyncClient, end: float, uploads: list[bytes], seed: int, record: list) -> None:
    rng = random.Random(seed)
    while time.monotonic() < end:
        kind = rng.choices(["search", "image", "classify"], weights=[70, 20, 10])[0]
        start = time.perf_counter()
        try:
            if kind == "search":
                query = " ".join(rng.sample(WORDS, 3))
                answer = await http.get("/api/search", params={"q": query, "k": 10})
            else:
                files = {"image": ("q.png", rng.choice(uploads), "image/png")}
                path, data = (
                    ("/api/search/image", {"k": 10}) if kind == "image" else ("/api/classify", {"labels": LABELS})
                )
                answer = await http.post(path, files=files, data=data)
            status = answer.status_code
        except httpx.HTTPError as err:
            status = type(err).__name__
        record.append((kind, status, time.perf_counter() - start))


async def load(url: str, clients: int, seconds: float, pid: int) -> dict:
    uploads = random_pngs(64, seed=1)
    record: list = []
    memory: list[int] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as http:
        end = time.monotonic() + seconds
        tasks = [asyncio.create_task(client(http, end, uploads, seed, record)) for seed in range(clients)]
        started, server_cpu, client_cpu = time.perf_counter(), cpu_seconds(pid), time.process_time()
        while time.monotonic() < end:
            memory.append(rss_kib(pid))
            await asyncio.sleep(0.25)
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
        server_cpu, client_cpu = cpu_seconds(pid) - server_cpu, time.process_time() - client_cpu
    latencies = sorted(seconds for _, status, seconds in record if status == 200)
    errors = [status for _, status, _ in record if status != 200]
    quarter = max(1, len(memory) // 4)

    def pct(q: float) -> float:
        return 1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))]

    return {
        "requests": len(record),
        "rps": len(record) / elapsed,
        "p50": pct(0.50),
        "p95": pct(0.95),
        "p99": pct(0.99),
        "mean": 1000 * statistics.mean(latencies),
        "errors": len(errors),
        "server_cpu_ms": 1000 * server_cpu / len(record),  # per request: lower when batching pays
        "cores": (server_cpu / elapsed, client_cpu / elapsed),  # busy cores, server and client
        "error_kinds": sorted(set(map(str, errors))),
        "kinds": {k: sum(1 for kind, *_ in record if kind == k) for k in ("search", "image", "classify")},
        "rss_start_mib": memory[0] / 1024,
        "rss_first_quarter_peak_mib": max(memory[:quarter]) / 1024,
        "rss_last_quarter_peak_mib": max(memory[-quarter:]) / 1024,
        "peak_mib": rss_kib(pid, "VmHWM") / 1024,
    }


def run_server(index: Path, max_batch: int, clients: int, seconds: float) -> dict:
    port = free_port()
    command = [sys.executable, "-m", "vlp.cli", "serve", str(index), "--port", str(port), "--max-batch", str(max_batch)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start: {server.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)
        httpx.get(f"{url}/api/search", params={"q": "warm up"})
        return asyncio.run(load(url, clients, seconds, server.pid))
    finally:
        server.terminate()
        server.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch", default="1,16", help="--max-batch values to run, comma-separated")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        index = build_index(Path(tmp), args.images)
        print(
            f"{platform.processor() or platform.machine()}, {args.clients} clients, {args.seconds:g} s, "
            f"{args.images} images, tiny CLIP (random weights), fp32"
        )
        print(
            "| --max-batch | requests | req/s | p50 ms | p95 ms | p99 ms | errors | server CPU ms/request | "
            "cores busy, server + client | server RSS MiB: start / peak 1st quarter / peak last quarter / peak |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
        for batch in [int(b) for b in args.batch.split(",")]:
            r = run_server(index, batch, args.clients, args.seconds)
            print(
                f"| {batch} | {r['requests']} | {r['rps']:.1f} | {r['p50']:.1f} | {r['p95']:.1f} | {r['p99']:.1f} | "
                f"{r['errors']} {' '.join(r['error_kinds'])} | {r['server_cpu_ms']:.1f} | "
                f"{r['cores'][0]:.2f} + {r['cores'][1]:.2f} | {r['rss_start_mib']:.0f} / "
                f"{r['rss_first_quarter_peak_mib']:.0f} / {r['rss_last_quarter_peak_mib']:.0f} / {r['peak_mib']:.0f} |",
                flush=True,
            )
            print(f"  mix: {r['kinds']}", flush=True)


if __name__ == "__main__":
    main()
