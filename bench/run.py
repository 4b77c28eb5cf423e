"""Measure the kit's per-job overhead, throughput, cancellation and cold start.

Every figure comes from one run on one machine, next to the same figure for two baselines
started in the same run: a bare Gradio app that returns an image with no model (the floor
of Gradio itself) and a plain Space (bench/plain_space.py) that calls the same pipeline the
way typical Hugging Face Spaces do. Servers run as separate processes; clients run here.

    python -m bench [--preset demo] [--device cpu|cuda] [--out docs/benchmarks.md] [--quick]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a red circle on a blue background"
SECTION = "Throughput and latency"

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


_SSL_CONTEXT = None


def connect(url: str):
    """Return a gradio_client Client that shares one SSL context with every other one.

    gradio_client opens a new httpx client for each HTTP request it makes, and each of those
    builds an SSL context from certifi's CA bundle (about 16 ms of CPU on a 2-core test machine) even for plain
    http. With several requests per job, that client-side work would take the cores that the
    server under test needs. One context, built once, verifies in the same way.
    """
    import ssl

    import certifi
    from gradio_client import Client

    global _SSL_CONTEXT
    if _SSL_CONTEXT is None:
        _SSL_CONTEXT = ssl.create_default_context(cafile=certifi.where())
    return Client(url, verbose=False, ssl_verify=_SSL_CONTEXT)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def toml_dump(data: dict[str, Any], prefix: str = "") -> str:
    """Write the subset of TOML that presets use: tables, strings, numbers, booleans, lists."""
    lines, tables = [], []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    text = "\n".join(lines) + ("\n" if lines else "")
    for key, value in tables:
        name = f"{prefix}{key}"
        text += f"\n[{name}]\n" + toml_dump(value, prefix=name + ".")
    return text


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


@dataclass
class Server:
    name: str
    process: subprocess.Popen
    url: str
    log_path: Path
    started: float
    ready_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


def start_server(name: str, command: list[str], workdir: Path, env: dict[str, str], port: int) -> Server:
    log_path = workdir / f"{name}.log"
    log = open(log_path, "w", encoding="utf-8")
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    return Server(name, process, f"http://127.0.0.1:{port}/", log_path, started)


def wait_for_first_image(server: Server, call, timeout: float = 300.0) -> float:
    """Return seconds from process start until the first image came back."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited early; see {server.log_path}")
        try:
            client = connect(server.url)
            call(client, 0)
            server.ready_seconds = time.perf_counter() - server.started
            return server.ready_seconds
        except Exception:  # not up yet: connection refused or the app still importing
            time.sleep(0.2)
    raise RuntimeError(f"{server.name} served no image within {timeout} s")


class Workload:
    def __init__(self, preset: dict[str, Any]):
        defaults = preset.get("generator", {}).get("defaults", {})
        self.steps = int(defaults.get("steps", 8))
        self.guidance = float(defaults.get("guidance_scale", 5.0))
        self.width = int(defaults.get("width", 64))
        self.height = int(defaults.get("height", 64))

    def kit_call(self, client, seed: int, steps: int | None = None, submit: bool = False):
        kwargs = dict(prompt=PROMPT, seed=seed, steps=steps or self.steps, guidance_scale=self.guidance,
                      width=self.width, height=self.height, api_name="/generate")
        return client.submit(**kwargs) if submit else client.predict(**kwargs)

    def plain_call(self, client, seed: int, steps: int | None = None, submit: bool = False):
        args = (PROMPT, seed, steps or self.steps, self.guidance, self.width, self.height)
        return client.submit(*args, api_name="/generate") if submit else client.predict(*args, api_name="/generate")


def jobs_per_client(clients: int) -> int:
    """Return the jobs each client sends in a throughput run: at least 48 in all, 6 per client.

    Six rounds per client keep the first round, when the batches are still forming, from
    weighing much in the rate.
    """
    return max(6, 48 // clients)


def measure_latency(server: Server, call, runs: int, direct=None, block: int = 5) -> tuple[list[float], list[float]]:
    """Time ``runs`` sequential calls; with ``direct``, also time as many direct pipeline calls.

    Blocks of ``block`` direct calls alternate with blocks of server calls, so each figure and
    the direct figure it is compared with come from the same minutes, and a slower or faster
    spell on a shared machine moves both alike. Blocks rather than single calls, because
    switching between two processes on every call slows both through the CPU caches.
    """
    client = connect(server.url)
    call(client, 1)  # warm the connection and the model
    if direct is not None:
        direct(1)
    served: list[float] = []
    direct_timings: list[float] = []
    seed = 100
    while len(served) < runs:
        count = min(block, runs - len(served))
        if direct is not None:
            for _ in range(count):
                started = time.perf_counter()
                direct(seed)
                direct_timings.append(time.perf_counter() - started)
                seed += 1
        for i in range(count):
            started = time.perf_counter()
            call(client, seed - count + i if direct is not None else seed + i)
            served.append(time.perf_counter() - started)
        if direct is None:
            seed += count
    return served, direct_timings


def measure_throughput(server: Server, call, clients: int, per_client: int) -> dict[str, float]:
    connections = [connect(server.url) for _ in range(clients)]
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    timed_from: list[float] = []
    barrier = threading.Barrier(clients, action=lambda: timed_from.append(time.perf_counter()))

    def worker(index: int) -> None:
        # One untimed job per client first opens its connection, so the timed rounds measure
        # the steady state rather than the moment when every client connects at once.
        try:
            call(connections[index], 999_000 + index)
        except Exception as exc:  # counted as a failed job in the table
            with lock:
                failures.append(f"{type(exc).__name__}: {exc}")
        barrier.wait()
        for j in range(per_client):
            started = time.perf_counter()
            try:
                call(connections[index], 1000 * index + j)
                with lock:
                    latencies.append(time.perf_counter() - started)
            except Exception as exc:  # counted as a failed job in the table
                with lock:
                    failures.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - timed_from[0]
    return {
        "images_per_s": len(latencies) / wall,
        "p95": percentile(latencies, 0.95) if latencies else float("nan"),
        "failed": len(failures),
        "done": len(latencies),
    }


def measure_kit_cancel(server: Server, workload: Workload, steps: int) -> int:
    client = connect(server.url)
    before = server.log().count("step(s) ran after the cancel")
    job = workload.kit_call(client, 7, steps=steps, submit=True)
    time.sleep(1.5)
    if job.done():
        print(f"the kit finished or rejected the {steps}-step cancel job before the cancel: {job.exception()}", flush=True)
        return -1
    job.cancel()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = re.findall(r"job stopped after cancel; (\d+) step\(s\) ran after the cancel", server.log())
        if len(found) > before:
            return int(found[-1])
        time.sleep(0.1)
    print("the kit never logged the end of the cancelled job; see its log", flush=True)
    return -1


def measure_plain_cancel(server: Server, workload: Workload, steps: int, step_log: Path) -> int:
    client = connect(server.url)
    step_log.write_text("", encoding="utf-8")
    job = workload.plain_call(client, 7, steps=steps, submit=True)
    time.sleep(1.5)
    cancelled_at = time.time()
    job.cancel()
    # The plain function keeps running after the cancel; wait until it stops writing steps.
    last_size, quiet_since = -1, time.monotonic()
    while time.monotonic() - quiet_since < 3.0:
        size = len(step_log.read_text(encoding="utf-8").splitlines())
        if size != last_size:
            last_size, quiet_since = size, time.monotonic()
        time.sleep(0.2)
    stamps = [float(line) for line in step_log.read_text(encoding="utf-8").splitlines() if line.strip()]
    return sum(1 for stamp in stamps if stamp > cancelled_at)


def load_direct_pipeline(model_path: str, workload: Workload, device: str):
    """Return a function that runs the workload's request on the pipeline in this process."""
    import torch
    from diffusers import AutoPipelineForText2Image

    pipe = AutoPipelineForText2Image.from_pretrained(model_path).to(device)
    pipe.set_progress_bar_config(disable=True)

    def once(seed: int) -> None:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        pipe(PROMPT, num_inference_steps=workload.steps, guidance_scale=workload.guidance,
             width=workload.width, height=workload.height, generator=generator)

    once(1)
    return once


def resolve_model(preset: dict[str, Any], data_dir: Path) -> str:
    from kit.loading import resolve_source

    return resolve_source(preset["generator"]["model"], data_dir / "models", "model_index.json").path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="demo", help="shipped preset name or .toml path (default demo)")
    parser.add_argument("--device", default="cpu", help="device for the direct pipeline call and the servers")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md", help="markdown file to update")
    parser.add_argument("--quick", action="store_true", help="fewer runs, for a smoke test of the benchmark itself")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads in every process (default 1: servers share the cores)"
    )
    args = parser.parse_args(argv)

    from kit.presets import resolve_preset_path

    preset_path = resolve_preset_path(args.preset)
    preset = tomllib.loads(preset_path.read_text(encoding="utf-8"))
    workload = Workload(preset)
    runs = 5 if args.quick else 40
    client_counts = (1, 4) if args.quick else (1, 4, 8, 16)
    # A long job for the cancel test, within the preset's own step limit so that the kit accepts it.
    cancel_steps = min(200, int(preset.get("generator", {}).get("limits", {}).get("max_steps", 200)))

    workdir = Path(tempfile.mkdtemp(prefix="kit-bench-"))
    data_dir = workdir / "data"
    model_path = resolve_model(preset, data_dir)
    print(f"model: {preset['generator']['model']} ({model_path}); {workload.width}x{workload.height}, "
          f"{workload.steps} steps; work folder {workdir}", flush=True)

    def phase(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    rows: dict[str, Any] = {}
    phase("direct pipeline: load")
    import torch

    torch.set_num_threads(args.threads)
    direct = load_direct_pipeline(model_path, workload, args.device)

    def kit_preset(max_batch_size: int) -> Path:
        data = dict(preset)
        queue = dict(data.get("queue", {}))
        queue.update({"max_batch_size": max_batch_size, "max_size": 64})
        data["queue"] = queue
        memory = dict(data.get("memory", {}))
        memory["warm_up"] = False
        data["memory"] = memory
        path = workdir / f"kit-batch-{max_batch_size}.toml"
        path.write_text(toml_dump(data), encoding="utf-8")
        return path

    env = {
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "OMP_NUM_THREADS": str(args.threads),
    }
    servers: list[Server] = []
    try:
        # The bare floor.
        phase("bare Gradio app")
        port = free_port()
        bare = start_server("bare", [sys.executable, "bench/bare_app.py", "--port", str(port)], workdir, env, port)
        servers.append(bare)
        wait_for_first_image(bare, workload.plain_call)
        rows["bare"], _ = measure_latency(bare, workload.plain_call, runs)

        # The plain Space.
        phase("plain Space: cold start, latency, throughput, cancel")
        port = free_port()
        step_log = workdir / "plain-steps.log"
        plain = start_server(
            "plain", [sys.executable, "bench/plain_space.py", "--model", model_path, "--port", str(port)],
            workdir, {**env, "BENCH_STEP_LOG": str(step_log)}, port,
        )
        servers.append(plain)
        rows["plain_cold"] = wait_for_first_image(plain, workload.plain_call)
        rows["plain"], rows["plain_direct"] = measure_latency(plain, workload.plain_call, runs, direct)
        rows["plain_tp"] = {n: measure_throughput(plain, workload.plain_call, n, jobs_per_client(n)) for n in client_counts}
        rows["plain_cancel"] = measure_plain_cancel(plain, workload, cancel_steps, step_log)
        plain.stop()

        for batch in (max(4, max(client_counts) // 2), 1):
            phase(f"kit with max_batch_size {batch}")
            port = free_port()
            kit_data = workdir / f"kit-data-{batch}"
            kit = start_server(
                f"kit-batch-{batch}",
                [sys.executable, "app.py", "--preset", str(kit_preset(batch)), "--port", str(port), "--data-dir", str(kit_data)],
                workdir, env, port,
            )
            servers.append(kit)
            cold = wait_for_first_image(kit, workload.kit_call)
            if batch == 1:
                rows["kit_cold"] = cold
                rows["kit"], rows["kit_direct"] = measure_latency(kit, workload.kit_call, runs, direct)
                rows["kit_cancel"] = measure_kit_cancel(kit, workload, cancel_steps)
                rows["kit_unbatched_tp"] = {n: measure_throughput(kit, workload.kit_call, n, jobs_per_client(n)) for n in client_counts}
            else:
                rows["kit_batch_size"] = batch
                rows["kit_batched_tp"] = {n: measure_throughput(kit, workload.kit_call, n, jobs_per_client(n)) for n in client_counts}
            kit.stop()
    finally:
        for server in servers:
            if server.process.poll() is None:
                server.stop()

    table = render(rows, workload, preset, client_counts, cancel_steps, args)
    print(table)
    from bench.report import write_section

    write_section(args.out, SECTION, table)
    print(f"wrote {args.out}")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def render(rows, workload, preset, client_counts, cancel_steps, args) -> str:
    direct_all = rows["kit_direct"] + rows["plain_direct"]
    direct50 = statistics.median(direct_all)
    kit50, plain50, bare50 = (statistics.median(rows[k]) for k in ("kit", "plain", "bare"))
    # Each server is compared with the direct calls made alongside its own calls.
    kit_over = kit50 - statistics.median(rows["kit_direct"])
    plain_over = plain50 - statistics.median(rows["plain_direct"])
    lines = [
        f"Command: `python -m bench --preset {args.preset} --device {args.device}`; measured "
        f"{time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPU cores with {args.threads} torch thread(s) per process, "
        "one run, all servers started by the same run. "
        f"Workload: one image, {workload.width}x{workload.height}, {workload.steps} steps, model "
        f"`{preset['generator']['model']}`.",
        "",
        "### Latency of one image (gradio_client, sequential)",
        "",
        "| | p50 | p95 | overhead over the direct pipeline call (p50) |",
        "|---|---|---|---|",
        f"| direct pipeline call | {ms(direct50)} | {ms(percentile(direct_all, 0.95))} | - |",
        f"| bare Gradio app, no model (floor) | {ms(bare50)} | {ms(percentile(rows['bare'], 0.95))} | {ms(bare50)} (all of it) |",
        f"| Microsite Kit | {ms(kit50)} | {ms(percentile(rows['kit'], 0.95))} | {ms(kit_over)} |",
        f"| plain Space | {ms(plain50)} | {ms(percentile(rows['plain'], 0.95))} | {ms(plain_over)} |",
        "",
        "Direct pipeline calls run in the benchmark's own process, in blocks of 5 that alternate",
        "with blocks of 5 server calls; each overhead is against the direct calls made alongside it.",
        f"Kit overhead above the Gradio floor: {ms(kit_over - bare50)} (target: at most 15 ms). "
        f"The same figure for the plain Space, which adds nothing to Gradio: {ms(plain_over - bare50)}. "
        f"Kit p50 minus plain Space p50: {ms(kit50 - plain50)}.",
        "",
        "The bare app does no work, so its floor leaves out what Gradio costs while a job computes.",
        "In Gradio 6.31 the queue loop wakes every millisecond and the progress loop every 10 ms.",
        "Both can compete with the pipeline for the interpreter. The plain Space row includes",
        "that cost. A difference between the kit and the plain Space within the run-to-run spread",
        "of the plain Space's own figure is noise, not kit overhead.",
        "",
        "### Throughput (images per second) and p95 latency, concurrent clients",
        "",
        f"| clients | kit batched (max_batch_size {rows['kit_batch_size']}) | kit unbatched | plain Space | batched / unbatched | kit batched / plain | failed jobs (kit b, kit u, plain) |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in client_counts:
        b, u, p = rows["kit_batched_tp"][n], rows["kit_unbatched_tp"][n], rows["plain_tp"][n]
        lines.append(
            f"| {n} | {b['images_per_s']:.2f}/s, p95 {ms(b['p95'])} | {u['images_per_s']:.2f}/s, p95 {ms(u['p95'])} | "
            f"{p['images_per_s']:.2f}/s, p95 {ms(p['p95'])} | {b['images_per_s'] / u['images_per_s']:.2f}x | "
            f"{b['images_per_s'] / p['images_per_s']:.2f}x | {b['failed']}, {u['failed']}, {p['failed']} |"
        )
    lines += [
        "",
        "### Cancellation and cold start",
        "",
        "| | Microsite Kit | plain Space |",
        "|---|---|---|",
        f"| denoising steps run after cancel ({cancel_steps}-step job, cancelled after 1.5 s) | {rows['kit_cancel']} | {rows['plain_cancel']} |",
        f"| cold start: process start to first image served | {rows['kit_cold']:.1f} s | {rows['plain_cold']:.1f} s |",
    ]
    lines += [
        "",
        "The kit's servers run the preset with `max_batch_size` 8 (batched) or 1 (unbatched) and the",
        "automatic batch window. Each client sends its next job when the last one's images arrive.",
        "gradio_client 2.7 downloads the images of a generator endpoint such as the kit's twice (once",
        "from the last update, once from the final result); the bare app and the plain Space",
        "return plain values, which it downloads once.",
        "All clients share one SSL context: gradio_client otherwise builds one from the CA bundle",
        "for every HTTP request (about 16 ms of CPU each), which here would take the cores that",
        "the servers under test need.",
    ]
    lines += ["", "### Targets", "", "| target | measured | met |", "|---|---|---|"]
    above_floor = kit_over - bare50
    lines.append(f"| kit overhead at most 15 ms above the Gradio floor (p50) | {ms(above_floor)} | {_yes(above_floor <= 0.015)} |")
    if 8 in client_counts:
        b, u = rows["kit_batched_tp"][8], rows["kit_unbatched_tp"][8]
        ratio = b["images_per_s"] / u["images_per_s"]
        failed = b["failed"] + u["failed"]
        lines.append(
            f"| 8 clients: batched at least 2x unbatched, no failed jobs | {ratio:.2f}x, {failed} failed | {_yes(ratio >= 2 and not failed)} |"
        )
    lines.append(
        f"| at most 1 step after cancel, against all remaining steps for the plain Space | {rows['kit_cancel']} "
        f"(plain Space: {rows['plain_cancel']}) | {_yes(0 <= rows['kit_cancel'] <= 1)} |"
    )
    return "\n".join(lines)


def _yes(met: bool) -> str:
    return "yes" if met else "**no**"


if __name__ == "__main__":
    sys.exit(main())
