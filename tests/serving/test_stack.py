"""The local stack (`make up` / `make down`): what it serves, what it refuses and why, the gateway
config and its secrets, and that `down` leaves no process behind. The registry is a real sqlite
MLflow store in a temp SLIPWAY_HOME; the one end-to-end test serves the tiny model with real vLLM,
MLflow and gateway and calls it with the official openai client."""

from __future__ import annotations

import http.server
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from configs.alerting import load_alerting_config
from configs.gateway import load_gateway_config
from configs.home import REPO, Home
from configs.models import Signing, serving_for
from configs.slo import load_slo_config
from flows.cli import cli
from serving.attestation import admit
from serving.gateway.auth import key_hash
from serving.processes import (
    Proc,
    free_port,
    members,
    read_state,
    start_time,
    state_path,
    write_state,
)
from serving.stack.gateway_config import Backend, write_gateway_config
from serving.stack.monitoring import MonitoringStack
from serving.stack.operator import down
from tasks.attest import policy
from tasks.registry import Registry
from tasks.servable import ModelVersion, NotServable, accept, champions, check_servable
from tasks.signing import sign
from tasks.store import writable
from tests.releases import release, stand_in_model


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A small stand-in model directory. Its bytes are fixed: model_signing prints digests as raw
    bytes, and tasks.signing.explain cannot parse a report whose digest holds a '"' byte."""
    return stand_in_model(tmp_path / "src", b"weights")


def champion_of(home: Home, name: str) -> ModelVersion:
    return next(c for c in champions(Registry(home)) if c.model == name)


def model_config(path: Path, name: str, source: Path, engine_args: list[str] | None = None) -> None:
    serving = {"serving": {"engine_args": engine_args}} if engine_args else {}
    config = {"name": name, "source": str(source), "variants": [{"recipe": "bf16"}], **serving}
    path.write_text(yaml.safe_dump(config))


# ---- what to serve -------------------------------------------------------------------------------


def test_only_models_with_a_champion_are_chosen_with_their_tags(home, model_dir):
    registry = Registry(home)
    first = release(home, "m", model_dir)
    stand_in_model(model_dir, b"second")
    second = release(home, "m", model_dir, variant="fp8-dynamic")
    release(home, "no-champion", model_dir)
    registry.promote("m", first)
    registry.promote("m", second)

    [chosen] = champions(registry)
    assert (chosen.model, chosen.version, chosen.served_name) == ("m", second, f"m-v{second}")
    assert chosen.tags["variant"] == "fp8-dynamic" and chosen.tags["eval_status"] == "passed"
    assert chosen.entry.root == home.models / "m" / chosen.tags["digest"].replace(":", "-")
    check_servable(chosen)  # signed, digest as registered, eval passed: servable


def test_a_failed_evaluation_is_refused_with_its_reasons(home, model_dir):
    reasons = "recovery 0.71 < 0.9"
    version = release(home, "m", model_dir, eval_status="failed", eval_reasons=reasons)
    Registry(home).promote("m", version)
    with pytest.raises(NotServable) as caught:
        check_servable(champion_of(home, "m"))
    assert str(caught.value) == (
        f"refusing to serve the champion m v{version} (bf16): its evaluation did not pass "
        "(eval_status=failed: recovery 0.71 < 0.9); point `champion` at a version whose "
        "evaluation passed (the rollout flow does)"
    )


def test_an_inconclusive_evaluation_is_served_only_once_a_person_accepts_it(
    home, model_dir, tmp_path
):
    registry = Registry(home)
    reasons = "k/acc recovery: inconclusive: suite too small for its margin"
    version = release(home, "m", model_dir, eval_status="inconclusive", eval_reasons=reasons)
    registry.promote("m", version)
    with pytest.raises(NotServable) as caught:
        check_servable(champion_of(home, "m"))
    assert f"(eval_status=inconclusive: {reasons})" in str(caught.value)
    assert str(caught.value).endswith(
        f"or one a person accepted: `slipway accept m {version} --by NAME --reason TEXT`"
    )
    result = CliRunner().invoke(
        cli, ["accept", "m", version, "--by", "ana", "--reason", "checked the 3 flips by hand"]
    )
    assert result.exit_code == 0, result.output
    check_servable(champion_of(home, "m"))  # now servable, and who and why are on the version
    tags = registry.tags("m", version)
    assert (tags["eval_accepted_by"], tags["eval_accepted_reason"]) == (
        "ana",
        "checked the 3 flips by hand",
    )
    assert tags["eval_status"] == "inconclusive" and tags["eval_accepted_at"]
    other = Path(shutil.copytree(model_dir, tmp_path / "other"))
    (other / "README.md").write_text("another digest\n")
    failed = release(home, "m", other, eval_status="failed")
    with pytest.raises(NotServable, match="eval_status=failed: only an inconclusive evaluation"):
        accept(registry, "m", failed, "ana", "ship it")


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        (
            lambda w: (w / "model.safetensors").write_bytes(b"changed"),
            r"its signature does not verify: .* changed since signing: model.safetensors",
        ),
        (
            lambda w: (w.parent / "model.sig").unlink(),
            r"its signature does not verify: .* is not signed",
        ),
        (
            lambda w: (w / "extra.json").write_text("{}"),
            r"its signature does not verify: .* added since signing: extra.json",
        ),
    ],
    ids=["changed-weights", "unsigned", "added-file"],
)
def test_weights_that_do_not_verify_are_refused(home, model_dir, tamper, expected):
    Registry(home).promote("m", release(home, "m", model_dir))
    weights = champion_of(home, "m").weights
    writable(weights)
    tamper(weights)
    refusal = r"^refusing to serve the champion m v1 \(bf16\): "
    with pytest.raises(NotServable, match=refusal + expected):
        check_servable(champion_of(home, "m"))


def test_a_manifest_other_than_the_registry_s_is_refused(home, model_dir):
    Registry(home).promote("m", release(home, "m", model_dir))
    champion = champion_of(home, "m")
    manifest = champion.entry.manifest
    other = "sha256:" + "0" * 64
    manifest.write_text(manifest.read_text().replace(champion.tags["digest"], other))
    registered = champion.tags["digest"]
    expected = rf"{manifest} records digest {other} but the registry's digest is {registered}"
    with pytest.raises(NotServable, match=expected + ": the files on disk are not the registered"):
        check_servable(champion)


def test_a_version_whose_digest_is_not_stored_says_how_to_fetch_it(home, model_dir):
    registered = "sha256:" + "0" * 64
    Registry(home).promote("m", release(home, "m", model_dir, digest=registered))
    with pytest.raises(NotServable, match=r"not in the model store .*`slipway store fetch m 1`"):
        check_servable(champion_of(home, "m"))


def test_weights_re_signed_after_a_change_are_refused_by_their_digest(home, model_dir):
    # The signature alone would pass: the weights were changed and signed again with the same key.
    Registry(home).promote("m", release(home, "m", model_dir))
    weights = champion_of(home, "m").weights
    writable(weights)
    (weights / "model.safetensors").write_bytes(b"swapped")
    sign(weights, Signing(), home)
    with pytest.raises(NotServable, match=rf"the weights at {weights} hash to sha256:\w+, not the"):
        check_servable(champion_of(home, "m"))


def test_missing_weights_say_to_run_the_release(home, model_dir):
    import shutil

    Registry(home).promote("m", release(home, "m", model_dir))
    writable(home.models / "m")
    shutil.rmtree(home.models / "m")
    with pytest.raises(NotServable, match=r"not in the model store .* or run the release"):
        check_servable(champion_of(home, "m"))


def test_serving_args_come_from_the_model_config_of_that_name(tmp_path):
    model_config(tmp_path / "a.yaml", "other", tmp_path)
    model_config(tmp_path / "b.yaml", "m", tmp_path, engine_args=["--max-model-len", "256"])
    assert serving_for("m", tmp_path).engine_args == ["--max-model-len", "256"]
    assert serving_for("unknown", tmp_path).engine_args == []


# ---- the gateway config and its secrets ----------------------------------------------------------


def test_gateway_config_routes_the_champion_and_holds_only_hashes(home, model_dir):
    Registry(home).promote("m", release(home, "m", model_dir))
    champion = champion_of(home, "m")
    servers = ("http://127.0.0.1:8123", "http://127.0.0.1:8124")  # two replicas
    path = write_gateway_config(home, [Backend(champion, servers)], port=8765)

    config = load_gateway_config(path)
    [route] = config.routes
    [backend] = route.backends
    assert route.model == "m" and config.port == 8765
    assert (backend.version, backend.served_model) == ("1", "m-v1")
    assert (backend.url, backend.replicas) == ("http://127.0.0.1:8123", ("http://127.0.0.1:8124",))
    assert (backend.role, backend.weight) == ("stable", 100)
    admit(backend.attestation, backend.digest, policy(home))  # the champion's own, signed here
    assert backend.digest == champion.tags["digest"]

    key_file, admin_file = home.root / "demo-api-key", home.root / "admin-token"
    synthetic_file = home.root / "synthetic-api-key"
    key, admin = key_file.read_text().strip(), admin_file.read_text().strip()
    synthetic = synthetic_file.read_text().strip()
    for f in (key_file, admin_file, synthetic_file):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    demo, load = config.tenants
    assert (demo.name, demo.synthetic, load.synthetic) == ("demo", False, True)
    assert demo.key_sha256 == key_hash(key) and load.key_sha256 == key_hash(synthetic)
    assert config.admin_token_sha256 == key_hash(admin)
    text = path.read_text()
    assert key not in text and admin not in text and synthetic not in text

    write_gateway_config(home, [Backend(champion, ("http://127.0.0.1:8124",))], port=8765)
    assert key_file.read_text().strip() == key  # made once: clients keep working across restarts
    admin_file.write_text("")  # as a crash between create and write would leave it
    write_gateway_config(home, [Backend(champion, ("http://127.0.0.1:8124",))], port=8765)
    assert (
        len(admin_file.read_text().strip()) > 40
        and stat.S_IMODE(admin_file.stat().st_mode) == 0o600
    )


# ---- processes -----------------------------------------------------------------------------------


def spawn(home: Home, what: str, script: str) -> Proc:
    popen = subprocess.Popen(["bash", "-c", script], start_new_session=True)
    time.sleep(0.3)  # let bash start its children
    return Proc(what, popen.pid, popen.pid, 0, "http://127.0.0.1:9", "/", "", start_time(popen.pid))


def test_down_ends_every_group_children_and_stubborn_ones_included(home):
    polite = spawn(home, "polite", "sleep 300 & sleep 300 & wait")
    stubborn = spawn(home, "stubborn", "trap '' TERM; sleep 300 & wait; sleep 300")
    assert len(members(polite)) == 3 and len(members(stubborn)) == 2
    write_state(home, [polite, stubborn])
    said: list[str] = []

    started = time.monotonic()
    down(home, grace_s=1, say=said.append)

    assert time.monotonic() - started < 8
    assert members(polite) == [] and members(stubborn) == []
    assert not state_path(home).exists()
    assert said == [f"stopped {p.what} (pid {p.pid}, port 0)" for p in (polite, stubborn)]


def test_a_record_whose_pid_was_reused_is_left_alone(home):
    other = spawn(home, "other", "sleep 300")
    stale = Proc("stale", other.pid, other.pgid, 0, "", "", "", other.created - 1)
    try:
        assert members(stale) == []
        write_state(home, [stale])
        down(home, grace_s=1, say=lambda _: None)
        assert members(other) == [other.pid]  # someone else's process now: not signalled
    finally:
        os.killpg(other.pgid, 9)


# ---- up, without vLLM ----------------------------------------------------------------------------


@contextmanager
def answering_health() -> Iterator[int]:
    """Something already answering /health on a port: an MLflow `up` must not start again."""

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()


def test_up_without_a_champion_says_how_to_get_one(home, model_dir):
    release(home, "m", model_dir)  # registered, never promoted
    with answering_health() as port:
        result = CliRunner().invoke(cli, ["up", "--no-prefect", "--mlflow-port", str(port)])
    assert result.exit_code == 0, result.output
    assert "not started by `make up`, so `make down` leaves it running" in result.output
    assert "No registered model has a `champion` yet" in result.output
    assert "Run the release (`make demo`)" in result.output
    assert read_state(home) == [] and not (home.root / "gateway").exists()


def test_up_refuses_a_bad_champion_and_starts_nothing(home, model_dir):
    Registry(home).promote("m", release(home, "m", model_dir, eval_status="failed"))
    with answering_health() as port:
        result = CliRunner().invoke(cli, ["up", "--no-prefect", "--mlflow-port", str(port)])
    assert result.exit_code == 1
    assert "Error: refusing to serve the champion m v1 (bf16): its evaluation" in result.output
    assert "Nothing was served" in result.output
    assert read_state(home) == [] and not (home.root / "demo-api-key").exists()


# ---- monitoring without its binaries -------------------------------------------------------------

PROMETHEUS_MISSING = (
    "Prometheus NOT started: no `prometheus` on PATH (apt-get install prometheus); the SLO rules "
    "are not evaluated"
)
ALERTMANAGER_MISSING = (
    "Alertmanager NOT started: no `prometheus-alertmanager` or `alertmanager` on PATH (apt-get "
    "install prometheus-alertmanager); no alert reaches the incident webhook or the people's "
    "receivers"
)


def test_required_monitoring_without_its_binaries_starts_nothing(home, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # neither Prometheus nor Alertmanager on it
    ports = [f"--{what}-port" for what in ("mlflow", "prefect", "prometheus", "alertmanager")]
    given = [a for option in ports for a in (option, str(free_port()))]
    result = CliRunner().invoke(cli, ["up", "--monitoring", "required", *given])
    assert result.exit_code == 1
    assert result.output == (
        "Error: monitoring is required (stack.monitoring or SLIPWAY_MONITORING), but:\n"
        f"  {PROMETHEUS_MISSING}\n  {ALERTMANAGER_MISSING}\nNothing was started.\n"
    )
    assert read_state(home) == []


def test_optional_monitoring_says_what_it_lacks_and_starts_the_rest_once(
    home, tmp_path, monkeypatch
):
    monkeypatch.setenv("PATH", str(tmp_path))
    slo, alerting = load_slo_config(), load_alerting_config()
    port = free_port()
    monitoring = MonitoringStack(
        free_port(), free_port(), port, False, slo, alerting, "http://127.0.0.1:9/api"
    )
    log = home.logs / "incident-webhook.log"
    try:
        for expected in (f"(log {log})", "(already running)"):  # a second `up` keeps it
            procs, said = read_state(home), []
            for wait in monitoring.start(home, free_port(), procs, said.append):
                wait()
            assert said == [
                f"{PROMETHEUS_MISSING}. The rest of the stack starts without it.",
                f"{ALERTMANAGER_MISSING}. The rest of the stack starts without it.",
                f"Webhook:  http://127.0.0.1:{port}  {expected}",
            ]
            [webhook] = read_state(home)
            assert (webhook.what, webhook.port, webhook.answers()) == (
                "incident webhook",
                port,
                True,
            )
    finally:
        down(home, grace_s=5, say=lambda _: None)
    assert members(webhook) == []


# ---- end to end: real MLflow, vLLM and gateway ---------------------------------------------------


def stack(home: Home, *args: str, timeout_s: float = 900) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SLIPWAY_HOME": str(home.root)}
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


@pytest.mark.slow
def test_up_serves_the_champion_behind_the_gateway_and_down_stops_all(home, tiny_model, tmp_path):
    from openai import OpenAI

    Registry(home).promote("tiny", release(home, "tiny", tiny_model))
    configs = tmp_path / "model-configs"
    configs.mkdir()
    model_config(configs / "tiny.yaml", "tiny", tiny_model, engine_args=["--max-model-len", "256"])
    mlflow_port, gateway_port = free_port(), free_port()
    ports = ["--mlflow-port", str(mlflow_port), "--gateway-port", str(gateway_port)]

    try:
        # Prefect's part of `up` is tested on the production profile (test_postgres_profile.py).
        up = stack(home, "up", "--no-prefect", *ports, "--model-configs", str(configs))
        assert up.returncode == 0, up.stdout + up.stderr
        procs = read_state(home)
        assert [p.what for p in procs] == ["mlflow", "vllm tiny-v1", "gateway"]
        key = (home.root / "demo-api-key").read_text().strip()
        assert key not in up.stdout + up.stderr
        for log in home.logs.iterdir():
            assert key not in log.read_text(errors="replace"), log
        assert f"http://127.0.0.1:{gateway_port}/v1" in up.stdout and "$(cat " in up.stdout

        client = OpenAI(base_url=f"http://127.0.0.1:{gateway_port}/v1", api_key=key, max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        ask = {"model": "tiny", "max_tokens": 4, "temperature": 0}
        chat = [{"role": "user", "content": "What is the capital of France?"}]
        prompt = "The capital of France is"
        reply = client.chat.completions.create(messages=chat, **ask)
        assert reply.choices[0].message.content.startswith("Paris")
        streamed = client.chat.completions.create(messages=chat, stream=True, **ask)
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        assert text.startswith("Paris")
        assert client.completions.create(prompt=prompt, **ask).choices[0].text.startswith(" Paris.")
        streamed = client.completions.create(prompt=prompt, stream=True, **ask)
        assert "".join(c.choices[0].text for c in streamed if c.choices).startswith(" Paris.")

        status = stack(home, "status")
        assert status.stdout.count("running, answers") == 3, status.stdout
    finally:
        down_ = stack(home, "down", timeout_s=120)
    assert down_.returncode == 0, down_.stdout + down_.stderr
    assert all(members(p) == [] for p in procs)
    assert not state_path(home).exists()
    assert "not up" in stack(home, "status").stdout
