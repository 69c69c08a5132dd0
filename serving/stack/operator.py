"""`make up`, `make down`, `make status`: MLflow, Prefect (server, worker, deployments), monitoring
(Prometheus, Alertmanager, the incident webhook and automations: monitoring.py), one vLLM per
verified champion, and the gateway in front.

`up` migrates a home made before the model store, fetches a champion's files from MLflow's copy
on a node that has none (verified before they are stored), serves each registered model's
`champion` only if it is servable (tasks/servable.py), writes their routes into the gateway's
state store before the gateway starts, reporting what it changed there (stored_routes.py), and
settles the records of a rollout or revert that was killed before (tasks/rollout/reconcile.py).
Every process it starts runs in its own process group, detached so that it outlives `up`, and is
recorded (serving/processes.py); `down` ends each group (SIGTERM, then SIGKILL after a grace
period) and checks that no process of it is left.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from configs.gateway import load_gateway_config
from configs.home import Home
from configs.models import Serving, serving_for
from serving.processes import HOST, Proc, launch, members, read_state, state_path, stop, write_state
from serving.stack.gateway_config import DEMO_TENANT, Backend, write_gateway_config
from serving.stack.monitoring import MonitoringStack
from serving.stack.prefect_server import PrefectStack
from serving.stack.services import LEFT, REUSED, StackError, display, ensure_mlflow, wait_up
from serving.stack.stored_routes import reconcile_routes
from serving.vllm import VLLMStartError
from tasks.engines import launch as launch_engine
from tasks.fetch import FetchError, fetch
from tasks.gateway_admin import GatewayAdmin
from tasks.registry import Registry
from tasks.rollout.reconcile import reconcile
from tasks.servable import ModelVersion, NotServable, champions, check_servable
from tasks.store import migrate


def up(
    home: Home,
    mlflow_port: int,
    gateway_port: int,
    configs: Path,
    say: Callable[[str], None],
    prefect: PrefectStack | None = None,
    monitoring: MonitoringStack | None = None,
) -> None:
    """MLflow, then (unless `prefect` is None) Prefect's server, worker and deployments and (unless
    `monitoring` is None; it needs `prefect`'s server) Prometheus, Alertmanager, the incident
    webhook and automations, then vLLM for each verified champion and the gateway in front."""
    procs = [p for p in read_state(home) if members(p)]
    if served := [p for p in procs if p.what not in REUSED]:
        # Idempotent, as `make demo` relies on: what runs stays as it is.
        listed = ", ".join(f"{p.what} at {p.url}" for p in served)
        say(f"The stack is already up ({listed}): `make status` shows it, `make down` stops it.")
        return
    write_state(home, procs)
    waits = []
    if monitoring is not None:
        # First: where monitoring is required and a binary missing, nothing has started yet.
        waits += monitoring.start(home, gateway_port, procs, say)
    waits.append(ensure_mlflow(home, mlflow_port, procs, say))
    if prefect is not None:
        waits.append(prefect.start_server(home, procs, say))
    for wait in waits:
        wait()
    if prefect is not None:
        prefect.start_worker_and_deploy(home, f"http://{HOST}:{mlflow_port}", procs, say)
    if monitoring is not None:  # on the deployments just deployed
        monitoring.apply_automations(say)

    for line in migrate(home):
        say(f"store:    {line}")
    registry = Registry(home)
    chosen = champions(registry)
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
            if fetch(registry, champion.model, champion.version)[1]:  # a node new to the model
                say(f"store:    fetched {champion} from MLflow (digest and signature checked)")
            check_servable(champion)
            digest = champion.tags["digest"]
            say(
                f"checked:  {champion}: eval passed, signature, digest {digest} and its signed "
                "evaluation attestation verified"
            )
        except (NotServable, FetchError) as e:
            refusals.append(str(e))
    if refusals:
        refusals.append("Nothing was served; what started keeps running (`make down` stops it).")
        raise StackError("\n".join(refusals))

    backends = [serve(c, serving_for(c.model, configs), home, procs, say) for c in chosen]
    config = write_gateway_config(home, backends, gateway_port)
    for line in reconcile_routes(load_gateway_config(config), home):
        say(f"routes:   {line}")
    command = [sys.executable, "-m", "flows.cli", "gateway", "--config", str(config)]
    log = home.logs / "gateway.log"
    gateway, popen = launch("gateway", command, log, gateway_port, "/ready", home)
    procs.append(gateway)
    write_state(home, procs)
    wait_up(gateway, popen, timeout_s=60)
    admin = GatewayAdmin(gateway.url, home.admin_token.read_text().strip())  # the token it wrote
    for champion in chosen:  # a rollout or revert killed before this `up` is settled now
        for line in reconcile(registry, admin, home, champion.model).changes:
            say(f"records:  {line}")
    say(f"Gateway:  {gateway.url}/v1  (config {display(config)}, log {display(log)})")
    say(f"Models:   {', '.join(c.model for c in chosen)}")
    say(usage(gateway.url, chosen[0].model, home.demo_key, home.admin_token))


def serve(
    champion: ModelVersion,
    serving: Serving,
    home: Home,
    procs: list[Proc],
    say: Callable[[str], None],
) -> Backend:
    """vLLM on the champion's weights (its replicas), detached; recorded in `procs` before they
    are waited on."""
    started = launch_engine(champion, serving, home)
    procs.extend(proc for _, proc in started)
    write_state(home, procs)
    for server, _ in started:
        try:
            seconds = server.wait_healthy()
        except VLLMStartError as e:
            raise StackError(f"{e}\n{LEFT}") from e
        log = display(server.log_path)
        say(f"vLLM:     {champion} at {server.url}  (healthy in {seconds:.0f} s; log {log})")
    urls = tuple(server.url for server, _ in started)
    return Backend(champion, urls, serving.failover)


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
