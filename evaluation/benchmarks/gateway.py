"""Benchmark the gateway against LiteLLM's proxy, both in front of the same fast mock upstream.

    slipway bench gateway [--duration 5] [--repeats 3] [--skip-litellm] [--control-plane]

Layout: the proxy under test alone on CPU 0 (the bare floor proxy, the gateway, LiteLLM, all
started once, measured one after the other); the mock upstream and wrk on CPU 1. Reports, for each
proxy: added latency over going direct (p50/p99, concurrency 1), requests per second and requests
per CPU-second of the proxy process at saturation, CPU per streamed chunk, added time to the first
streamed chunk, the gateway over the floor and LiteLLM over the gateway. Each round measures going
direct and then every proxy, in an order rotated each round, and the side-by-side figures are
taken within a round: this machine's speed drifts by tens of percent over minutes, and a proxy
measured in another minute than its anchor carries that drift. Each figure is the median of the
rounds, the side-by-side ones with their range. Writes $SLIPWAY_HOME/bench/gateway.json. LiteLLM
goes into a throwaway venv under $SLIPWAY_HOME/cache.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import click

from configs.home import REPO, Home
from evaluation.benchmarks.attested import Signer
from serving.gateway.auth import key_hash
from serving.processes import free_port

LITELLM = "litellm[proxy]==1.106.2"
STREAM_CHUNKS = 64
TARGETS = {"added_p99_ms_c1": 1.0, "rps_per_core": 3000, "cpu_us_per_chunk": 30}


@dataclass(frozen=True)
class Proxy:
    name: str
    pid: int
    url: str
    key: str | None


CHAT = {"model": "bench", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4}


class FloorProxy:
    """The floor: a bare raw-ASGI pass-through with one shared aiohttp session.

    Measured in the same run, so the gateway's cost over it is visible even on a busy machine.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
                elif self.session is not None:
                    await self.session.close()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        if scope["method"] == "GET":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {"Content-Type": "application/json"}
        async with self.session.post(
            self.upstream + scope["path"], data=body, headers=headers
        ) as r:
            await send(
                {
                    "type": "http.response.start",
                    "status": r.status,
                    "headers": [(b"content-type", r.headers["Content-Type"].encode())],
                }
            )
            async for chunk in r.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})


def serve_floor(port: int, upstream: str) -> None:
    import uvicorn

    uvicorn.run(
        FloorProxy(upstream),
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )


def ensure_wrk() -> str:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise click.ClickException("wrk is not installed: apt-get install -y wrk")
    return wrk


def litellm_python(home: Home) -> Path:
    venv = home.cache / "litellm-1.106.2"
    python = venv / "bin" / "python"
    if not (venv / "bin" / "litellm").exists():
        subprocess.run(["uv", "venv", "-q", "--python", "3.11", str(venv)], check=True)
        subprocess.run(["uv", "pip", "install", "-q", "--python", str(python), LITELLM], check=True)
    return python


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry.name)] = fields
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    todo = [pid]
    while todo:
        p = todo.pop()
        if p in stats:
            total += (int(stats[p][11]) + int(stats[p][12])) / tick
        todo.extend(children.get(p, []))
    return total


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise click.ClickException(f"{url} exited with {proc.returncode} while starting")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except Exception:
            time.sleep(0.3)
    raise click.ClickException(f"{url} not ready after {timeout} s")


def wrk_run(
    wrk: str, url: str, body: dict, key: str | None, connections: int, duration: int, workdir: Path
) -> dict:
    script = workdir / f"post-{secrets.token_hex(4)}.lua"
    headers = 'wrk.headers["Content-Type"] = "application/json"\n'
    if key:
        headers += f'wrk.headers["Authorization"] = "Bearer {key}"\n'
    script.write_text(f'wrk.method = "POST"\nwrk.body = {json.dumps(json.dumps(body))}\n{headers}')
    out = subprocess.run(
        [
            "taskset",
            "-c",
            "1",
            wrk,
            "-t1",
            f"-c{connections}",
            f"-d{duration}s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    if "Non-2xx" in out:
        raise click.ClickException(f"wrk saw error responses from {url}:\n{out}")
    latency = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)", out, re.M))
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    return {
        "requests": requests,
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": _ms(latency["50"]),
        "p99_ms": _ms(latency["99"]),
    }


def _ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(\w+)", text).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


async def first_chunk_ms(url: str, body: dict, key: str | None, n: int = 200) -> float:
    """Median time to the first streamed body byte, one request at a time."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    times = []
    async with aiohttp.ClientSession() as session:
        for _ in range(n):
            start = time.perf_counter()
            async with session.post(url, json=body, headers=headers) as r:
                await r.content.readany()
                times.append(time.perf_counter() - start)
                await r.read()
    times.sort()
    return times[len(times) // 2] * 1000


def measure(
    proxy: Proxy, direct: dict, wrk: str, duration: int, workdir: Path, cache_hits: bool = False
) -> dict:
    """One proxy's figures; with `cache_hits`, also a repeated deterministic request's (all but
    the first answered from the gateway's cache)."""
    name, pid, url, key = proxy.name, proxy.pid, proxy.url, proxy.key
    chat, stream = CHAT, {**CHAT, "max_tokens": STREAM_CHUNKS, "stream": True}
    click.echo(f"[{name}] concurrency 1")
    c1 = wrk_run(wrk, url, chat, key, 1, duration, workdir)
    click.echo(f"[{name}] saturation")
    cpu0 = cpu_seconds(pid)
    sat = wrk_run(wrk, url, chat, key, 32, duration, workdir)
    sat_cpu = cpu_seconds(pid) - cpu0
    click.echo(f"[{name}] streams")
    cpu0 = cpu_seconds(pid)
    streams = wrk_run(wrk, url, stream, key, 16, duration, workdir)
    stream_cpu = cpu_seconds(pid) - cpu0
    cpu0 = cpu_seconds(pid)
    streams_c1 = wrk_run(wrk, url, stream, key, 1, duration, workdir)
    stream_c1_cpu = cpu_seconds(pid) - cpu0
    ttft = asyncio.run(first_chunk_ms(url, stream, key))
    hits = {}
    if cache_hits:
        click.echo(f"[{name}] cache hits")
        hit = wrk_run(wrk, url, {**chat, "temperature": 0}, key, 1, duration, workdir)
        hits = {"cache_hit_c1": hit, "cache_hit_p99_ms_c1": hit["p99_ms"]}
    return hits | {
        "c1": c1,
        "added_p50_ms_c1": round(c1["p50_ms"] - direct["c1"]["p50_ms"], 3),
        "added_p99_ms_c1": round(c1["p99_ms"] - direct["c1"]["p99_ms"], 3),
        "saturation_c32": sat,
        "rps_per_core": round(sat["requests"] / sat_cpu, 1) if sat_cpu else None,
        "cpu_us_per_request": round(sat_cpu / sat["requests"] * 1e6, 1),
        "stream_c16": streams,
        "cpu_us_per_chunk_c16": round(stream_cpu / (streams["requests"] * STREAM_CHUNKS) * 1e6, 2),
        "cpu_us_per_chunk_c1": round(
            stream_c1_cpu / (streams_c1["requests"] * STREAM_CHUNKS) * 1e6, 2
        ),
        "first_chunk_ms": round(ttft, 3),
        "added_first_chunk_ms": round(ttft - direct["first_chunk_ms"], 3),
    }


def run(duration: int, skip_litellm: bool, repeats: int, control_plane: bool = False) -> None:
    """Gateway vs LiteLLM proxy vs direct, on loopback, pinned to cores: `repeats` rounds, each
    measuring going direct and then every proxy in turn (the order rotated each round). With
    `control_plane` the gateway balances over two mock upstreams (replicas of one version), with
    its queue and cache on; the pass-through requests are not cacheable (temperature 1)."""
    home = Home.from_env()
    wrk = ensure_wrk()
    work = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs: list[subprocess.Popen] = []

    def start(cmd: list[str], cpu: str, **kw) -> subprocess.Popen:
        # The child holds its own copy of the log's descriptor; this one closes once it has started.
        with open(work / f"{len(procs)}.log", "w") as log:
            proc = subprocess.Popen(
                ["taskset", "-c", cpu, *cmd],
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=log,
                **kw,
            )
        procs.append(proc)
        return proc

    try:
        mock_port = free_port()
        mock = start(
            [sys.executable, "-m", "flows.cli", "bench", "mock-upstream", "--port", str(mock_port)],
            "1",
            env=env,
        )
        upstream = f"http://127.0.0.1:{mock_port}"
        wait_ready(f"{upstream}/health", mock)
        replicas = []
        if control_plane:  # a second server of the same version, beside the first on CPU 1
            port = free_port()
            second = start(
                [sys.executable, "-m", "flows.cli", "bench", "mock-upstream", "--port", str(port)],
                "1",
                env=env,
            )
            replicas.append(f"http://127.0.0.1:{port}")
            wait_ready(f"{replicas[0]}/health", second)
        # Every proxy stays up (idle while another is measured), so the rounds can interleave.
        proxies = [
            start_floor(start, upstream, env),
            start_gateway(start, upstream, env, work, replicas),
        ]
        skipped: dict[str, str] = {}
        if skip_litellm:
            skipped["litellm"] = "--skip-litellm"
        else:
            try:
                proxies.append(start_litellm(start, upstream, home, work))
            except subprocess.CalledProcessError as e:
                skipped["litellm"] = f"could not install {LITELLM}: {e}"
        rounds = []
        for r in range(repeats):
            click.echo(f"round {r + 1} of {repeats}")
            direct = measure_direct(f"{upstream}/v1/chat/completions", wrk, duration, work)
            one: dict = {"direct": direct}
            turn = r % len(proxies)
            for proxy in proxies[turn:] + proxies[:turn]:
                hits = control_plane and proxy.name == "gateway"
                one[proxy.name] = measure(proxy, direct, wrk, duration, work, hits)
            one |= compared(one)
            rounds.append(one)
        results = summary(rounds) | {"rounds": rounds}
        for name, why in skipped.items():
            results[name] = {"skipped" if why.startswith("--") else "error": why}
        gw = results["gateway"]
        results["targets"] = TARGETS
        results["meets_targets"] = {
            "added_p99_ms_c1": gw["added_p99_ms_c1"] <= TARGETS["added_p99_ms_c1"],
            "rps_per_core": gw["rps_per_core"] >= TARGETS["rps_per_core"],
            "cpu_us_per_chunk": gw["cpu_us_per_chunk_c16"] <= TARGETS["cpu_us_per_chunk"],
        }
        if control_plane:  # a hit, end to end, beats the floor's pass-through
            hit = results["gateway_over_floor"]["cache_hit_p99_ms_c1"]
            results["meets_targets"]["cache_hit_p99_below_floor"] = hit < 0
        results["setup"] = {
            "duration_s": duration,
            "repeats": repeats,
            "stream_chunks": STREAM_CHUNKS,
            "cpus": os.cpu_count(),
            "layout": "proxy on CPU 0; mock upstream(s) + wrk on CPU 1",
            "control_plane": control_plane,
        }
        out = home.root / "bench" / "gateway.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        click.echo(json.dumps({k: v for k, v in results.items() if k != "rounds"}, indent=2))
        click.echo(f"written to {out}")
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)


def start_floor(start: Callable[..., subprocess.Popen], upstream: str, env: dict) -> Proxy:
    port = free_port()
    code = f"import evaluation.benchmarks.gateway as b; b.serve_floor({port}, '{upstream}')"
    floor = start([sys.executable, "-c", code], "0", env=env)
    wait_ready(f"http://127.0.0.1:{port}/health", floor)
    return Proxy("floor", floor.pid, f"http://127.0.0.1:{port}/v1/chat/completions", None)


def start_gateway(
    start: Callable[..., subprocess.Popen],
    upstream: str,
    env: dict,
    work: Path,
    replicas: list[str] | None = None,
) -> Proxy:
    """The gateway with every limit on; with `replicas`, balancing over them beside `upstream`,
    and its queue and response cache on (the control plane's features)."""
    port, key = free_port(), "sk-bench-" + secrets.token_urlsafe(24)
    signer, digest = Signer(work), "sha256:" + "0" * 64
    config = {
        "admin_token_sha256": key_hash(secrets.token_urlsafe(24)),
        "routes": [
            {
                "model": "bench",
                "backends": [
                    {
                        "version": "1",
                        "url": upstream,
                        "served_model": "bench",
                        "digest": digest,
                        "attestation": signer.attest(digest),
                        "weight": 100,
                        "role": "stable",
                        "max_concurrency": 1024,
                        "replicas": replicas or [],
                    }
                ],
            }
        ],
        # Every limit on, so each request takes the whole admission path: a request and a
        # token reservation, and a money one at the tier's chargeback rate.
        "tenants": [
            {
                "name": "bench",
                "key_sha256": key_hash(key),
                "rpm": 10_000_000,
                "tpm": 10**12,
                "monthly_token_budget": 10**15,
                "monthly_budget_usd": 10**6,
            }
        ],
        "usage": {"url": f"sqlite:///{work / 'usage.sqlite'}"},
        # Its own state store: the home's holds the routes `make up` wrote, not this one.
        "state": {"url": f"sqlite:///{work / 'state.sqlite'}"},
        "trust": signer.trust(),
    }
    if replicas:
        config |= {"queue": {"max_waiting": 256}, "cache": {"enabled": True}}
    (work / "gateway.json").write_text(json.dumps(config))  # YAML is a superset of JSON
    cli = [sys.executable, "-m", "flows.cli", "gateway", "--config", str(work / "gateway.json")]
    gateway = start([*cli, "--port", str(port), "--log-level", "warning"], "0", env=env)
    wait_ready(f"http://127.0.0.1:{port}/health", gateway)
    return Proxy("gateway", gateway.pid, f"http://127.0.0.1:{port}/v1/chat/completions", key)


def start_litellm(
    start: Callable[..., subprocess.Popen], upstream: str, home: Home, work: Path
) -> Proxy:
    python = litellm_python(home)
    # LiteLLM refuses to start without a master key; both proxies then check a key.
    port, key = free_port(), "sk-" + secrets.token_hex(32)
    model = {
        "model_name": "bench",
        "litellm_params": {
            "model": "openai/bench",
            "api_base": f"{upstream}/v1",
            "api_key": "sk-mock",
        },
    }
    config = {"model_list": [model], "general_settings": {"master_key": key}}
    (work / "litellm.yaml").write_text(json.dumps(config))
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}
    cli = [str(python.parent / "litellm"), "--config", str(work / "litellm.yaml")]
    litellm = start([*cli, "--port", str(port), "--num_workers", "1"], "0", env=env)
    wait_ready(f"http://127.0.0.1:{port}/health/liveliness", litellm)
    return Proxy("litellm", litellm.pid, f"http://127.0.0.1:{port}/v1/chat/completions", key)


def measure_direct(url: str, wrk: str, duration: int, work: Path) -> dict:
    click.echo("[direct] concurrency 1")
    stream = {**CHAT, "max_tokens": STREAM_CHUNKS, "stream": True}
    return {
        "c1": wrk_run(wrk, url, CHAT, None, 1, duration, work),
        "first_chunk_ms": round(asyncio.run(first_chunk_ms(url, stream, None)), 3),
    }


def compared(one: dict) -> dict:
    """One round's side-by-side figures: the gateway over the floor, LiteLLM over the gateway."""
    gw, fl, ll = one["gateway"], one["floor"], one.get("litellm")
    out = {
        "gateway_over_floor": {
            "added_p50_ms_c1": round(gw["added_p50_ms_c1"] - fl["added_p50_ms_c1"], 3),
            "added_p99_ms_c1": round(gw["added_p99_ms_c1"] - fl["added_p99_ms_c1"], 3),
            "cpu_us_per_request": round(gw["cpu_us_per_request"] - fl["cpu_us_per_request"], 1),
            "cpu_us_per_chunk_c16": round(
                gw["cpu_us_per_chunk_c16"] - fl["cpu_us_per_chunk_c16"], 2
            ),
            "rps_per_core_ratio": _ratio(gw["rps_per_core"], fl["rps_per_core"], 2),
        }
    }
    if "cache_hit_p99_ms_c1" in gw:  # a hit's whole time against the floor's pass-through
        out["gateway_over_floor"]["cache_hit_p99_ms_c1"] = round(
            gw["cache_hit_p99_ms_c1"] - fl["c1"]["p99_ms"], 3
        )
    if ll is not None:
        out["litellm_over_gateway"] = {
            "added_p50_ms_c1": _ratio(ll["added_p50_ms_c1"], gw["added_p50_ms_c1"]),
            "added_p99_ms_c1": _ratio(ll["added_p99_ms_c1"], gw["added_p99_ms_c1"]),
            "rps_per_core": _ratio(gw["rps_per_core"], ll["rps_per_core"]),
            "cpu_us_per_chunk_c16": _ratio(ll["cpu_us_per_chunk_c16"], gw["cpu_us_per_chunk_c16"]),
        }
    return out


def summary(rounds: list[dict]) -> dict:
    """Each figure's median over the rounds (the side-by-side ones also with their min and max,
    under `spread`): a round's figures are measured minutes apart at most, the rounds are not."""
    out: dict = {}
    for name in rounds[0]:
        out[name] = _median([r[name] for r in rounds])
    out["spread"] = {
        name: {
            key: {"min": min(values), "max": max(values)}
            for key in rounds[0][name]
            if None not in (values := [r[name][key] for r in rounds])
        }
        for name in ("gateway_over_floor", "litellm_over_gateway")
        if name in rounds[0]
    }
    return out


def _median(values: list):
    if isinstance(values[0], dict):
        return {key: _median([v[key] for v in values]) for key in values[0]}
    numbers = [v for v in values if v is not None]
    return statistics.median(numbers) if numbers else None


def _ratio(a: float | None, b: float | None, digits: int = 1) -> float | None:
    return round(a / b, digits) if a and b else None
