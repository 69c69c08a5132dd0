"""The local stack behind `make up` / `make down`: MLflow, Prefect (server, worker, deployments;
serving/prefect_stack.py), one vLLM per champion, the gateway.

    python -m serving.stack up       # start it, print where everything is
    python -m serving.stack status   # what runs and whether it answers
    python -m serving.stack down     # stop everything `up` started, leave nothing behind

`up` serves each registered model's `champion` only if its evaluation passed, its weights verify
against their signature and their digest is the registry's. Every process it starts runs in its
own process group, detached so that it outlives `up`, and is recorded in
$SLIPWAY_HOME/run/stack.json; `down` ends each group (SIGTERM, then SIGKILL after a grace period)
and checks that no process of it is left. Process checks read /proc: Linux only, like vLLM here.
Secrets (the demo tenant's API key, the admin token) live only in 0600 files under $SLIPWAY_HOME;
the generated gateway config holds their sha256.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click
import yaml

from configs.gateway import GatewayConfig
from configs.home import REPO, Home
from configs.models import ModelConfig, Serving, Signing, load_model_config
from serving.auth import key_hash
from serving.keys import new_secret
from serving.vllm import VLLMServer, VLLMStartError, tail

if TYPE_CHECKING:
    from serving.prefect_stack import PrefectStack
    from tasks.registry import Registry

CHAMPION = "champion"
DEMO_TENANT = "demo"
SYNTHETIC_TENANT = "rollout-load"
MODEL_CONFIGS = REPO / "configs" / "models"
HOST = "127.0.0.1"
LEFT = "What already started keeps running: `make status` shows it, `make down` stops it."
PREFECT_SERVER, PREFECT_WORKER = "prefect server", "prefect worker"
REUSED = ("mlflow", PREFECT_SERVER, PREFECT_WORKER)  # a second `up` keeps these when they run


class StackError(RuntimeError):
    """The stack cannot do what was asked; the message says why and what to do next."""


# ---- what to serve -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Champion:
    """The version a registered model's `champion` alias names, with what its checks need."""

    model: str
    version: str
    tags: dict[str, str]
    home: Home

    @property
    def served_name(self) -> str:
        return f"{self.model}-v{self.version}"

    @property
    def record(self) -> str:
        """Its vLLM's name in the stack's state: `up`, the rollout and the regression share it."""
        return f"vllm {self.served_name}"

    @property
    def variant_dir(self) -> Path | None:
        variant = self.tags.get("variant")
        return self.home.models / self.model / variant if variant else None

    def __str__(self) -> str:
        return f"{self.model} v{self.version} ({self.tags.get('variant', 'no variant tag')})"


def champions(registry: Registry) -> list[Champion]:
    """Every registered model with a `champion` alias, by model name."""
    found = []
    page = registry.client.search_registered_models()
    while True:
        for model in page:
            if (version := registry.alias(model.name, CHAMPION)) is not None:
                tags = registry.tags(model.name, version)
                found.append(Champion(model.name, version, tags, registry.home))
        if not page.token:
            break
        page = registry.client.search_registered_models(page_token=page.token)
    return sorted(found, key=lambda c: c.model)


def vet(champion: Champion, role: str = CHAMPION) -> None:
    """Raise StackError unless the version may be served: evaluation passed, weights present and
    signed, and both the manifest's and the weights' own digest equal the registry's digest tag.
    `role` names it in the message (the rollout vets its candidate the same way)."""
    from tasks.hub import Manifest, hash_dir, model_digest
    from tasks.signing import SignatureError, verify

    def refuse(reason: str) -> StackError:
        return StackError(f"refusing to serve the {role} {champion}: {reason}")

    tags = champion.tags
    if (status := tags.get("eval_status")) != "passed":
        reasons = tags.get("eval_reasons", "no reasons recorded")
        hint = (
            "point `champion` at a version whose evaluation passed (the rollout flow does)"
            if role == CHAMPION
            else "only a version whose evaluation passed may be served"
        )
        raise refuse(f"its evaluation did not pass (eval_status={status}: {reasons}); {hint}")
    if (variant_dir := champion.variant_dir) is None:
        raise refuse("the version has no `variant` tag, so its weights cannot be found")
    if not (digest := tags.get("digest")):
        raise refuse("the version has no `digest` tag to check its weights against")
    weights, manifest = variant_dir / "weights", variant_dir / "manifest.json"
    if not weights.is_dir() or not manifest.is_file():
        raise refuse(
            f"its weights or manifest are missing ({weights}, {manifest}): run the release "
            "(`make demo`) on this machine first"
        )
    recorded = Manifest.read(manifest).digest
    if recorded != digest:
        raise refuse(
            f"{manifest} records digest {recorded} but the registry's digest is {digest}: "
            "the files on disk are not the registered model; re-run the release"
        )
    try:
        verify(weights, Signing(), champion.home)
    except SignatureError as e:
        raise refuse(f"its signature does not verify: {e}") from e
    if (actual := model_digest(hash_dir(weights))) != digest:
        raise refuse(
            f"the weights at {weights} hash to {actual}, not the registered {digest}: "
            "they changed after the release; re-run the release"
        )


def config_for(model: str, configs: Path) -> ModelConfig | None:
    """The model config named `model` in `configs`, if there is one."""
    for path in sorted(configs.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        if isinstance(raw, dict) and raw.get("name") == model:
            return load_model_config(path)
    return None


def serving_for(model: str, configs: Path) -> Serving:
    """The `serving` section of the model config named `model` in `configs` (defaults if none)."""
    config = config_for(model, configs)
    return config.serving if config else Serving()


# ---- secrets and the gateway config --------------------------------------------------------------


def secret_file(path: Path, prefix: str) -> str:
    """The secret in `path`, made once (mode 0600, never printed); an existing one is kept."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        os.chmod(path, 0o600)
        if secret := path.read_text().strip():
            return secret
        # An empty file (a crash before the write) must never become the empty key.
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    secret = new_secret(prefix)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return secret


@dataclass(frozen=True)
class Backend:
    champion: Champion
    url: str


def write_gateway_config(home: Home, backends: list[Backend], port: int) -> Path:
    """$SLIPWAY_HOME/gateway/gateway.yaml: one stable route per champion, the demo tenant, the
    rollout's synthetic-load tenant and the admin token as hashes. Validated before it is
    written: the gateway starts on a good config."""
    key = secret_file(demo_key_path(home), "sk-slipway-")
    admin = secret_file(admin_token_path(home), "sk-slipway-admin-")
    synthetic = secret_file(synthetic_key_path(home), "sk-slipway-")
    raw = {
        "host": HOST,
        "port": port,
        "admin_token_sha256": key_hash(admin),
        "routes": [
            {
                "model": b.champion.model,
                "backends": [{
                    "version": b.champion.version, "url": b.url,
                    "served_model": b.champion.served_name, "digest": b.champion.tags["digest"],
                    "verified": True, "weight": 100, "role": "stable",
                }],
            }
            for b in backends
        ],  # fmt: skip
        "tenants": [
            {"name": DEMO_TENANT, "key_sha256": key_hash(key)},
            {"name": SYNTHETIC_TENANT, "key_sha256": key_hash(synthetic), "synthetic": True},
        ],
    }
    GatewayConfig.model_validate(raw)
    path = home.root / "gateway" / "gateway.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "# Generated by `make up` (serving/stack.py) on every start: edits are overwritten.\n"
    path.write_text(header + yaml.safe_dump(raw, sort_keys=False))
    return path


def demo_key_path(home: Home) -> Path:
    return home.root / "demo-api-key"


def admin_token_path(home: Home) -> Path:
    return home.root / "admin-token"


def synthetic_key_path(home: Home) -> Path:
    """The key of the tenant whose traffic the gateway counts as synthetic (rollout load)."""
    return home.root / "synthetic-api-key"


# ---- processes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Proc:
    """One started process group: what it is, where it answers, and how to recognise it later."""

    what: str
    pid: int
    pgid: int
    port: int
    url: str
    health: str  # the path that answers 200 when it is up
    log: str
    start_time: int  # /proc start time: tells our pid from a later process that reused it

    def answers(self) -> bool:
        return answers(self.url + self.health)


def state_path(home: Home) -> Path:
    return home.root / "run" / "stack.json"


def read_state(home: Home) -> list[Proc]:
    path = state_path(home)
    return [Proc(**p) for p in json.loads(path.read_text())["processes"]] if path.is_file() else []


def write_state(home: Home, procs: list[Proc]) -> None:
    path = state_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps({"processes": [asdict(p) for p in procs]}, indent=2) + "\n")
    os.replace(partial, path)  # `down` never reads a half-written record


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, process group, start time) of a process, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the name in parentheses may hold spaces
    return fields[0], int(fields[2]), int(fields[19])


def start_time(pid: int) -> int:
    stat = _stat(pid)
    if stat is None:
        raise StackError(f"process {pid} ended just after it started")
    return stat[2]


def members(proc: Proc) -> list[int]:
    """The live processes of proc's group (zombies excluded: they hold nothing); none when the
    group leader's pid now belongs to another process, i.e. the record is stale."""
    leader = _stat(proc.pid)
    if leader is not None and leader[0] != "Z" and leader[2] != proc.start_time:
        return []
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) and stat[0] != "Z":
            if stat[1] == proc.pgid:
                found.append(int(entry.name))
    return found


def answers(url: str, timeout_s: float = 2) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def launch(
    what: str,
    command: list[str],
    log: Path,
    port: int,
    health: str,
    home: Home,
    env: dict[str, str] | None = None,
) -> tuple[Proc, subprocess.Popen[bytes]]:
    """Start `command` detached in its own process group (it outlives `up`), output to `log`,
    with `env` added to this process's environment."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **(env or {}), "SLIPWAY_HOME": str(home.root)}
    with log.open("ab") as out:
        popen = subprocess.Popen(
            command, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://{HOST}:{port}"
    proc = Proc(what, popen.pid, popen.pid, port, url, health, str(log), start_time(popen.pid))
    return proc, popen


def wait_answering(proc: Proc, popen: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not proc.answers():
        if (code := popen.poll()) is not None:
            raise StackError(
                f"{proc.what} exited with status {code} before it answered "
                f"{proc.url}{proc.health}; log {proc.log} ends:\n{tail(Path(proc.log))}\n{LEFT}"
            )
        if time.monotonic() > deadline:
            raise StackError(
                f"{proc.what} did not answer {proc.url}{proc.health} within {timeout_s:.0f} s; "
                f"log {proc.log} ends:\n{tail(Path(proc.log))}\n{LEFT}"
            )
        time.sleep(0.5)


def stop(procs: list[Proc], grace_s: float) -> list[str]:
    """SIGTERM every group, SIGKILL what is left after `grace_s`; return what still survives."""

    def signal_all(sig: signal.Signals) -> None:
        for proc in procs:
            if members(proc):
                try:
                    os.killpg(proc.pgid, sig)
                except ProcessLookupError:
                    pass

    def wait_gone(within_s: float) -> bool:
        deadline = time.monotonic() + within_s
        while any(members(p) for p in procs):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True

    signal_all(signal.SIGTERM)
    if not wait_gone(grace_s):
        signal_all(signal.SIGKILL)
        wait_gone(5)
    return [f"{p.what} (group {p.pgid}: pids {left})" for p in procs if (left := members(p))]


# ---- up / down / status --------------------------------------------------------------------------


def display(path: Path) -> str:
    """A path as the user can type it from the current directory."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def ensure_service(
    home: Home,
    what: str,
    command: list[str],
    port: int,
    health: str,
    procs: list[Proc],
    say: Callable[[str], None],
    label: str,
    env: dict[str, str] | None = None,
    timeout_s: float = 180,
) -> Callable[[], None]:
    """Start `command` unless something answers `health` on `port` already (ours, recorded in
    `procs` by an earlier `up`, or not); a start is appended to `procs` and recorded. Returns the
    wait until it answers, so that services start side by side."""
    url = f"http://{HOST}:{port}"
    if answers(url + health):
        ours = any(p.what == what and p.port == port and members(p) for p in procs)
        owner = "" if ours else "; not started by `make up`, so `make down` leaves it running"
        say(f"{label:<9} {url}  (already running{owner})")
        return lambda: None
    log = home.logs / f"{what.replace(' ', '-')}.log"
    proc, popen = launch(what, command, log, port, health, home, env)
    procs.append(proc)
    write_state(home, procs)  # before the wait: an interrupted `up` leaves it to `down`

    def wait() -> None:
        wait_answering(proc, popen, timeout_s)
        say(f"{label:<9} {url}  (log {display(log)})")

    return wait


def ensure_mlflow(
    home: Home, port: int, procs: list[Proc], say: Callable[[str], None]
) -> Callable[[], None]:
    """The lean MLflow server, unless one answers on `port`; returns the wait until it answers."""
    command = [str(REPO / "mlflow" / "start.sh"), "--port", str(port)]
    return ensure_service(home, "mlflow", command, port, "/health", procs, say, "MLflow:")


def up(
    home: Home,
    mlflow_port: int,
    gateway_port: int,
    configs: Path,
    say: Callable[[str], None],
    prefect: PrefectStack | None = None,
) -> None:
    """MLflow, then (unless `prefect` is None) Prefect's server, worker and deployments, then vLLM
    for each verified champion and the gateway in front."""
    procs = [p for p in read_state(home) if members(p)]
    if served := [p for p in procs if p.what not in REUSED]:
        # Idempotent, as `make demo` relies on: what runs stays as it is.
        listed = ", ".join(f"{p.what} at {p.url}" for p in served)
        say(f"The stack is already up ({listed}): `make status` shows it, `make down` stops it.")
        return
    write_state(home, procs)
    waits = [ensure_mlflow(home, mlflow_port, procs, say)]
    if prefect is not None:
        waits.append(prefect.start_server(home, procs, say))
    # mlflow + prefect take ~10 s to import, while the servers start; only up needs them.
    from tasks.registry import Registry

    for wait in waits:
        wait()
    if prefect is not None:
        prefect.start_worker_and_deploy(home, f"http://{HOST}:{mlflow_port}", procs, say)

    chosen = champions(Registry(home))
    if not chosen:
        say(
            "\nNo registered model has a `champion` yet, so there is nothing to serve.\n"
            "Run the release (`make demo`): it registers every variant and makes the first bf16\n"
            "version whose evaluation passed the champion; later versions go through the rollout\n"
            "flow. Then run `make up` again. (What started keeps running; `make down` stops it.)"
        )
        return
    refusals = []
    for champion in chosen:
        try:
            vet(champion)
            digest = champion.tags["digest"]
            say(f"checked:  {champion}: eval passed, signature and digest {digest} verified")
        except StackError as e:
            refusals.append(str(e))
    if refusals:
        refusals.append("Nothing was served; what started keeps running (`make down` stops it).")
        raise StackError("\n".join(refusals))

    backends = [serve(c, serving_for(c.model, configs), home, procs, say) for c in chosen]
    config = write_gateway_config(home, backends, gateway_port)
    command = [sys.executable, "-m", "serving.gateway", "--config", str(config)]
    log = home.logs / "gateway.log"
    gateway, popen = launch("gateway", command, log, gateway_port, "/ready", home)
    procs.append(gateway)
    write_state(home, procs)
    wait_answering(gateway, popen, timeout_s=60)
    say(f"Gateway:  {gateway.url}/v1  (config {display(config)}, log {display(log)})")
    say(f"Models:   {', '.join(c.model for c in chosen)}")
    say(usage(gateway.url, chosen[0].model, demo_key_path(home), admin_token_path(home)))


def serve(
    champion: Champion, serving: Serving, home: Home, procs: list[Proc], say: Callable[[str], None]
) -> Backend:
    """vLLM on the champion's weights, detached; recorded in `procs` before it is waited on."""
    server, proc = start_vllm(champion, serving, home)
    procs.append(proc)
    write_state(home, procs)
    try:
        seconds = server.wait_healthy()
    except VLLMStartError as e:
        raise StackError(f"{e}\n{LEFT}") from e
    log = display(server.log_path)
    say(f"vLLM:     {champion} at {server.url}  (healthy in {seconds:.0f} s; log {log})")
    return Backend(champion, server.url)


def start_vllm(version: Champion, serving: Serving, home: Home) -> tuple[VLLMServer, Proc]:
    """Start vLLM on a registered version's weights, detached (it outlives its starter), with
    the record that lets `down` stop it; the caller writes the record before waiting on it."""
    weights = version.variant_dir / "weights"
    server = VLLMServer(
        weights, version.model, home, serving, [version.served_name], host=HOST, detach=True
    ).start()
    proc = Proc(
        version.record, server.pid, server.pid, server.port, server.url, "/health",
        str(server.log_path), start_time(server.pid),
    )  # fmt: skip
    return server, proc


def usage(url: str, model: str, key: Path, admin: Path) -> str:
    """How to call the gateway; the key is read from its file, never shown."""
    key_file = display(key)
    question = '[{"role": "user", "content": "What is the capital of France?"}]'
    return f"""
Demo tenant '{DEMO_TENANT}': API key in {key_file}, admin token in {display(admin)} (mode 0600).

  curl -s {url}/v1/chat/completions -H "Authorization: Bearer $(cat {key_file})" \\
    -H "Content-Type: application/json" \\
    -d '{{"model": "{model}", "messages": {question}}}'

  python - <<'EOF'
  from pathlib import Path
  from openai import OpenAI
  client = OpenAI(base_url="{url}/v1", api_key=Path("{key_file}").read_text().strip())
  reply = client.chat.completions.create(model="{model}", messages={question})
  print(reply.choices[0].message.content)
  EOF

`make status` shows what runs; `make down` stops it all."""


def down(home: Home, grace_s: float, say: Callable[[str], None]) -> None:
    procs = read_state(home)
    if not procs:
        state_path(home).unlink(missing_ok=True)
        say("Nothing to stop: `make up` started no process.")
        return
    if survivors := stop(procs, grace_s):
        raise StackError(
            f"still running after SIGKILL: {'; '.join(survivors)}; see `ps -o pid,pgid,stat,cmd`"
        )
    state_path(home).unlink()
    for proc in procs:
        say(f"stopped {proc.what} (pid {proc.pid}, port {proc.port})")


def status(home: Home, say: Callable[[str], None]) -> None:
    procs = read_state(home)
    if not procs:
        say("The stack is not up (`make up` starts it).")
        return
    for proc in procs:
        state = "stopped"
        if members(proc):
            state = "running, answers" if proc.answers() else "running, NOT answering"
        say(f"{proc.what:<32} pid {proc.pid:<8} {proc.url:<24} {state}")


# ---- CLI -----------------------------------------------------------------------------------------


@click.group()
def cli() -> None:
    """The local stack: MLflow, Prefect, vLLM serving each champion, and the gateway."""


@cli.command("up")
@click.option("--mlflow-port", default=5000, show_default=True)
@click.option("--gateway-port", default=8000, show_default=True)
@click.option(
    "--model-configs", type=click.Path(file_okay=False, path_type=Path), default=MODEL_CONFIGS,
    show_default=True, help="where a champion's `serving` section comes from (config of its name)",
)  # fmt: skip
@click.option("--prefect-port", default=4200, show_default=True)
@click.option("--prefect/--no-prefect", "with_prefect", default=True, show_default=True,
              help="start the Prefect server and worker and register the deployments")
@click.option(
    "--prefect-file", type=click.Path(dir_okay=False, path_type=Path),
    default=REPO / "prefect.yaml",
    show_default=True, help="the deployments to register (entrypoints relative to the checkout)",
)
@click.option(
    "--auto-rollout/--no-auto-rollout", envvar="SLIPWAY_AUTO_ROLLOUT", default=False,
    show_default=True, help="roll out each newly registered version whose evaluation passed "
    "(env SLIPWAY_AUTO_ROLLOUT=1)",
)  # fmt: skip
def up_command(
    mlflow_port: int,
    gateway_port: int,
    model_configs: Path,
    prefect_port: int,
    with_prefect: bool,
    prefect_file: Path,
    auto_rollout: bool,
) -> None:
    """Start MLflow and Prefect (server, worker, deployments), serve every verified champion with
    vLLM, and put the gateway in front."""
    from serving.prefect_stack import PrefectStack

    prefect = PrefectStack(prefect_port, prefect_file, auto_rollout) if with_prefect else None
    try:
        up(Home.from_env(), mlflow_port, gateway_port, model_configs, click.echo, prefect)
    except StackError as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        raise click.ClickException(f"interrupted. {LEFT}") from None


@cli.command("down")
@click.option("--grace-s", default=20.0, show_default=True, help="seconds from SIGTERM to SIGKILL")
def down_command(grace_s: float) -> None:
    """Stop every process `up` started; fail if any is left."""
    try:
        down(Home.from_env(), grace_s, click.echo)
    except StackError as e:
        raise click.ClickException(str(e)) from None


@cli.command("status")
def status_command() -> None:
    """What the stack runs and whether each part answers."""
    status(Home.from_env(), click.echo)


if __name__ == "__main__":
    cli()
