"""Every manifest in k8s/ validates: KubeRay kinds against the KubeRay CRDs' OpenAPI schemas (strict:
unknown fields are errors), built-in kinds with kubernetes-validate; plus the checks a reviewer makes."""

import functools
import gzip
import json

import jsonschema
import kubernetes_validate
import pytest
import yaml

from raymem.config import parse_config
from tests.conftest import REPO

K8S = REPO / "k8s"
# The KubeRay CRDs' v1 OpenAPI schemas, kept in the project (source and license: fixtures/kuberay/SOURCE.md).
SCHEMAS = REPO / "tests" / "fixtures" / "kuberay"


def strict(schema):
    """CRD schemas prune unknown fields instead of rejecting them; reject them, to catch typos."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema.setdefault("additionalProperties", False)
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@functools.cache
def crd_schema(kind: str) -> dict:
    return strict(json.loads(gzip.decompress((SCHEMAS / f"{kind.lower()}.v1.schema.json.gz").read_bytes())))


def documents():
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path.name, doc


def embedded(doc):
    """A RayJob template carried inside a ConfigMap (the portable CronJob's)."""
    for value in (doc.get("data") or {}).values():
        inner = yaml.safe_load(value)
        if isinstance(inner, dict) and "kind" in inner:
            yield inner


def validate(doc):
    kind = doc["kind"]
    if doc["apiVersion"].startswith("ray.io/"):
        jsonschema.validate(doc, crd_schema(kind))
    else:
        kubernetes_validate.validate(doc, "1.37.0", strict=True)


ALL = list(documents())


@pytest.mark.parametrize(
    "name, doc",
    ALL,
    ids=[f"{n}:{d['kind']}:{d['metadata'].get('name') or d['metadata'].get('generateName')}" for n, d in ALL],
)
def test_manifest_validates(name, doc):
    validate(doc)
    for inner in embedded(doc):
        validate(inner)


def test_the_checker_rejects_a_typo():
    doc = yaml.safe_load((K8S / "raycluster.yaml").read_text())
    doc["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    with pytest.raises(jsonschema.ValidationError, match="maxReplica"):
        validate(doc)
    job = next(d for _, d in ALL if d["kind"] == "CronJob")
    job = yaml.safe_load(yaml.safe_dump(job))
    job["spec"]["concurencyPolicy"] = "Forbid"  # misspelt: strict validation must refuse it
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(job)


def test_gpu_workers_scheduling_and_nightly_semantics():
    kinds = {d["kind"]: d for _, d in ALL}
    cluster = kinds["RayCluster"]["spec"]
    group = cluster["workerGroupSpecs"][0]
    worker = group["template"]["spec"]
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert any(t["key"] == "nvidia.com/gpu" for t in worker["tolerations"])
    assert group["minReplicas"] < group["maxReplicas"] and cluster["enableInTreeAutoscaling"]
    assert kinds["CronJob"]["spec"]["concurrencyPolicy"] == "Forbid"
    assert kinds["RayCronJob"]["spec"]["schedule"] == kinds["CronJob"]["spec"]["schedule"]
    for job in (kinds["RayJob"]["spec"], kinds["RayCronJob"]["spec"]["jobTemplate"]):
        assert job["entrypoint"].startswith("python /app/jobs/scan.py /etc/raymem/")
    rules = kinds["Role"]["rules"][0]
    assert rules["resources"] == ["rayjobs"] and "delete" not in rules["verbs"]
    assert "ALPHA" in (K8S / "raycronjob.yaml").read_text() and "feature gate" in (K8S / "raycronjob.yaml").read_text()


def test_the_mounted_scan_config_is_a_valid_scan():
    cm = next(d for _, d in ALL if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "raymem-scan-config")
    cfg = parse_config(yaml.safe_load(cm["data"]["nightly.yaml"]), "k8s/scan-config.yaml")
    assert cfg.output.uri.startswith("s3://") and cfg.training.embeddings.startswith("s3://")
