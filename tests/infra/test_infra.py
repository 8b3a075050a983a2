"""Cluster infrastructure checks: ray_cluster.yaml, the Dockerfile and the KubeRay manifests.

Each file is parsed, then validated with the strongest checker that installs here:
- ray_cluster.yaml: Ray's own cluster-launcher JSON schema (`ray/autoscaler/ray-schema.json`), after
  filling defaults exactly as `ray up` does (`prepare_config` + `validate_config`);
- KubeRay manifests: KubeRay 1.6.0's own CRD schemas, made strict about unknown keys
  (tests/support/kuberay_schema.py), the RayService's serveConfigV2 with Ray Serve's `ServeDeploySchema`, and
  its app `args` with the project's strict `ServeConfig`;
- the Dockerfile: base image and Ray version against the installed Ray, COPY sources exist;
- across files: one Ray version, one image, token auth set everywhere, entrypoints name real configs.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from kuberay_schema import KUBERAY_VERSION, SCHEMAS
from paths import REPO_ROOT

REPO = REPO_ROOT
KUBERAY = REPO / "infra" / "kuberay"
IMAGE_WORKDIR = "/home/ray/vitpose"  # WORKDIR of infra/docker/Dockerfile, where the project lives in the image
MANIFESTS = {"raycluster.yaml": "RayCluster", "rayjob.yaml": "RayJob", "rayservice.yaml": "RayService"}
AUTH_SECRET = "vitpose-ray-auth"  # the Secret docs/cluster.md tells the platform team to create


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _cluster_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    spec = manifest["spec"]
    return spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec


def _ray_containers(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = _cluster_spec(manifest)
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


def _all_containers(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Ray containers plus the RayJob submitter's (KubeRay's token injection reaches all of them)."""
    submitter = manifest["spec"].get("submitterPodTemplate", {}).get("spec", {}).get("containers", [])
    return [*_ray_containers(manifest), *submitter]


def _config_path_in_repo(command: str) -> Path:
    """`vitpose run --config /home/ray/vitpose/pipelines/configs/x.yaml` -> <repo>/pipelines/configs/x.yaml."""
    argv = shlex.split(command)
    assert argv[:2] == ["vitpose", "run"], f"entrypoint should run the pipeline: {command!r}"
    assert "--config" in argv, f"entrypoint names no --config: {command!r}"
    config = argv[argv.index("--config") + 1]
    relative = config.removeprefix(IMAGE_WORKDIR + "/") if config.startswith("/") else config
    assert not relative.startswith("/"), f"{config} is outside the image's project dir {IMAGE_WORKDIR}"
    return REPO / relative


# ---------------------------------------------------------------------------------------------- launcher


def test_ray_cluster_yaml_passes_ray_schema() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _load(REPO / "ray_cluster.yaml")
    # the raw file alone must already satisfy the schema (no key that only works after default filling)
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(raw, schema)
    validate_config(prepare_config(raw))  # what `ray up` runs before touching AWS


def test_ray_cluster_yaml_platform_expectations() -> None:
    config = _load(REPO / "ray_cluster.yaml")
    node_types = config["available_node_types"]
    head = node_types[config["head_node_type"]]
    assert "GPU" not in head["resources"], "the head must not offer GPUs: training belongs on workers"
    workers = {name: spec for name, spec in node_types.items() if name != config["head_node_type"]}
    gpu_groups = [spec for spec in workers.values() if spec["resources"].get("GPU", 0) > 0]
    assert gpu_groups, "no GPU worker group"
    for spec in gpu_groups:
        assert spec["min_workers"] == 0 < spec["max_workers"], "GPU groups should autoscale from zero"
        assert "IamInstanceProfile" in spec["node_config"], "S3 access comes from an instance profile"
    assert any(spec["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
               for spec in gpu_groups), "expected a spot GPU group"
    assert sum(spec["max_workers"] for spec in workers.values()) <= config["max_workers"] * 2
    run_options = " ".join(config["docker"]["run_options"])
    assert "RAY_AUTH_MODE=token" in run_options, "auth mode must be explicit on every node"
    text = (REPO / "ray_cluster.yaml").read_text()
    assert "AWS_SECRET_ACCESS_KEY" not in text and "aws_secret_access_key" not in text, "no keys in the YAML"


# ---------------------------------------------------------------------------------------------- image


def test_dockerfile_matches_installed_ray_and_copies_real_paths() -> None:
    text = (REPO / "infra" / "docker" / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_IMAGE=(\S+)$", text, re.M)
    assert base, "Dockerfile should pin its base in ARG RAY_IMAGE"
    assert base.group(1).startswith(f"rayproject/ray:{ray.__version__}-"), base.group(1)
    assert re.search(r"^FROM \$\{RAY_IMAGE\}$", text, re.M)
    assert re.search(rf"^WORKDIR {IMAGE_WORKDIR}$", text, re.M)
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        sources = [part for part in line.split()[:-1] if not part.startswith("--")]
        for source in sources:
            assert (REPO / source).exists(), f"Dockerfile copies {source}, which is not in the repository"
    assert "ENV RAY_AUTH_MODE=token" in text


# ---------------------------------------------------------------------------------------------- KubeRay


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_kuberay_manifest_structure(name: str) -> None:
    manifest = _load(KUBERAY / name)
    assert manifest["kind"] == MANIFESTS[name]
    jsonschema.validate(manifest, SCHEMAS[manifest["kind"]])

    cluster = _cluster_spec(manifest)
    assert cluster["rayVersion"] == ray.__version__, "rayVersion must match the image's (and our) Ray"
    for group in cluster.get("workerGroupSpecs", []):
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"], group
    # token auth through authOptions (KubeRay >= 1.6): the only way the operator itself sends the token
    assert cluster.get("authOptions") == {"mode": "token", "secretName": AUTH_SECRET}, f"{name}: authOptions"
    for container in _all_containers(manifest):
        # KubeRay injects RAY_AUTH_MODE/RAY_AUTH_TOKEN only where they are absent: a hand-written one (perhaps
        # naming another Secret) would silently win over authOptions, so there is exactly one source
        names = {item["name"] for item in container.get("env", [])}
        assert not names & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}, f"{name}: {container['name']} sets auth env by hand"
        resources = container.get("resources", {})
        gpus = resources.get("limits", {}).get("nvidia.com/gpu")
        assert gpus == resources.get("requests", {}).get("nvidia.com/gpu"), "GPU requests must equal limits"


def test_kuberay_manifests_use_one_image() -> None:
    images = {c["image"] for name in MANIFESTS for c in _ray_containers(_load(KUBERAY / name))}
    images |= {c["image"] for c in _load(KUBERAY / "rayjob.yaml")["spec"]["submitterPodTemplate"]["spec"]["containers"]}
    assert len(images) == 1, f"manifests disagree on the image: {sorted(images)}"


def test_rayjob_entrypoint_runs_a_shipped_pipeline_config() -> None:
    job = _load(KUBERAY / "rayjob.yaml")
    config = _config_path_in_repo(job["spec"]["entrypoint"])
    assert config.is_file(), f"RayJob entrypoint names {config.relative_to(REPO)}, which does not exist"
    assert isinstance(yaml.safe_load(config.read_text()), dict)


def test_rayservice_serve_config_passes_serve_schema_and_serve_config() -> None:
    from ray.serve.schema import ServeDeploySchema

    from pipelines.serve.app import load_serve_config

    service = _load(KUBERAY / "rayservice.yaml")
    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    (app,) = serve_config.applications
    assert app.import_path == "pipelines.serve.app:build_app"
    assert app.runtime_env in (None, {}) or "working_dir" not in app.runtime_env, \
        "Serve configs reject a local working_dir: the code comes from the image"
    serve = load_serve_config(app.args)  # strict: an unknown or mistyped arg fails here
    assert serve.model.uri.endswith("@champion")
    assert serve.autoscaling.min_replicas >= 1, "GPU replicas should not scale to zero"


def test_kuberay_minimum_version_is_stated_where_authoptions_needs_it() -> None:
    major_minor = ".".join(KUBERAY_VERSION.split(".")[:2])
    for name in MANIFESTS:
        assert f"KubeRay >= {major_minor}" in (KUBERAY / name).read_text(), f"{name} does not state KubeRay >= {major_minor}"
    assert f"KubeRay >= {major_minor}" in (REPO / "docs" / "cluster.md").read_text()


@pytest.mark.parametrize("broken", [
    {"authOption": {"mode": "token"}},               # a typo the API server would prune silently
    {"authOptions": {"mode": "tokens"}},             # not in the CRD's enum
    {"authOptions": {"mode": "token", "secret": AUTH_SECRET}},  # field name from no KubeRay version
])
def test_kuberay_schema_rejects_what_kuberay_would_ignore_or_refuse(broken: dict[str, Any]) -> None:
    manifest = _load(KUBERAY / "raycluster.yaml")
    manifest["spec"].pop("authOptions")
    manifest["spec"].update(broken)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(manifest, SCHEMAS["RayCluster"])


def test_docs_name_the_serve_service_as_kuberay_does() -> None:
    name = _load(KUBERAY / "rayservice.yaml")["metadata"]["name"]
    docs = (REPO / "docs" / "cluster.md").read_text()
    assert f"svc/{name}-serve-svc" in docs  # KubeRay: <RayService name>-serve-svc (GenerateServeServiceName)
    assert "svc/vitpose-serve-svc" not in docs
