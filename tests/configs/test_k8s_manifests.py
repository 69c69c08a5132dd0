"""configs/k8s/: the Kubernetes manifests are not applied here, so check what can be checked
without a cluster: they parse, each object is named in the slipway namespace, every Secret key and
volume claim they use is defined, the work pool's job template only uses variables it declares,
and vLLM asks for a GPU."""

from __future__ import annotations

import re

import yaml

from configs.home import REPO

K8S = REPO / "configs" / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml"))


def objects() -> list[dict]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def walk(node: object):
    """Every dict inside node, depth first."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def test_every_manifest_parses_and_opens_with_a_comment_saying_what_it_is():
    assert {p.name for p in MANIFESTS} >= {
        "secrets.example.yaml",
        "storage.yaml",
        "prefect-server.yaml",
        "mlflow.yaml",
        "worker.yaml",
        "gateway.yaml",
        "vllm.yaml",
    }
    for path in MANIFESTS:
        assert path.read_text().startswith("# "), path
    for obj in objects():
        assert obj["apiVersion"] and obj["kind"] and obj["metadata"]["name"], obj
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "slipway", obj["metadata"]["name"]


def test_secrets_and_claims_used_are_defined():
    everything = objects()
    secrets = {
        o["metadata"]["name"]: set(o["stringData"]) for o in everything if o["kind"] == "Secret"
    }
    claims = {o["metadata"]["name"] for o in everything if o["kind"] == "PersistentVolumeClaim"}
    pool = yaml.safe_load((K8S / "work-pool.json").read_text())
    for node in [*walk(everything), *walk(pool)]:
        if ref := node.get("secretKeyRef"):
            assert ref["key"] in secrets[ref["name"]], ref
        if (secret := node.get("secret")) and "secretName" in secret:
            assert {i["key"] for i in secret.get("items", [])} <= secrets[secret["secretName"]]
        if claim := node.get("persistentVolumeClaim"):
            assert claim["claimName"] in claims, claim


def test_work_pool_template_uses_only_its_variables_and_runs_from_the_image_checkout():
    pool = yaml.safe_load((K8S / "work-pool.json").read_text())
    declared = set(pool["variables"]["properties"])
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", str(pool["job_configuration"])))
    assert used <= declared, used - declared
    job = pool["job_configuration"]["job_manifest"]
    [container] = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["SLIPWAY_REPO"] == "/opt/slipway"  # where prefect.yaml's pull step changes into
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.slipway.svc:5000"


def test_vllm_requests_a_gpu_and_the_worker_polls_the_kubernetes_pool():
    everything = {(o["kind"], o["metadata"]["name"]): o for o in objects()}
    [vllm] = [o for (k, name), o in everything.items() if k == "Deployment" and "vllm-" in name]
    [container] = vllm["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    worker_pod = everything[("Deployment", "prefect-worker")]["spec"]["template"]["spec"]
    [worker] = worker_pod["containers"]
    assert {"--pool=slipway-kubernetes", "--type=kubernetes"} <= set(worker["command"])
