"""KubeRay's own CRD schemas (ray.io/v1, KubeRay 1.6.0) for the manifests under infra/kuberay/.

The schemas come from KubeRay's CRDs (`ray-operator/config/crd/bases/ray.io_{rayclusters,rayjobs,
rayservices}.yaml` at tag v1.6.0, the first release whose `authOptions` has `secretName`, i.e. the
first one whose operator sends a token from our Secret to a token-protected dashboard). The CRD files
are ~1.3 MB each, almost all of it the Kubernetes PodTemplateSpec repeated in every pod template; the
stored copy (kuberay_crd_v1.6.0.json, regenerated with `python tests/support/kuberay_schema.py <crd dir>`) keeps
every Ray-specific field with its types and enums and drops descriptions, `status`, CEL rules and the
pod templates. Two changes make the validation stricter than the API server, on purpose:
- every object with declared properties rejects unknown keys (the API server prunes them silently, so a
  typo such as `authOption:` would simply do nothing on the cluster);
- pod templates are checked with our own structural schema below (containers with name and image, env
  entries with value or valueFrom), not as a full PodSpec.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

KUBERAY_VERSION = "1.6.0"
KUBERAY_COMMIT = "3fe72c3c876d2a530b50870f14b76a8e94bb1f9b"  # tag v1.6.0 of github.com/ray-project/kuberay
CRD_FILE = Path(__file__).with_name(f"kuberay_crd_v{KUBERAY_VERSION}.json")
CRD_KINDS = {"rayclusters": "RayCluster", "rayjobs": "RayJob", "rayservices": "RayService"}
POD_TEMPLATE_MARK = "x-vitpose-pod-template"  # where the stored schema dropped a PodTemplateSpec

QUANTITY: dict[str, Any] = {"anyOf": [{"type": "string"}, {"type": "integer"}]}

ENV_VAR: dict[str, Any] = {
    "type": "object", "required": ["name"], "additionalProperties": False,
    "properties": {"name": {"type": "string", "minLength": 1}, "value": {"type": "string"},
                   "valueFrom": {"type": "object"}},
    "oneOf": [{"required": ["value"]}, {"required": ["valueFrom"]}],
}

CONTAINER: dict[str, Any] = {
    "type": "object", "required": ["name", "image"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "image": {"type": "string", "minLength": 1},
        "env": {"type": "array", "items": ENV_VAR},
        "resources": {"type": "object", "additionalProperties": False, "properties": {
            "requests": {"type": "object", "additionalProperties": QUANTITY},
            "limits": {"type": "object", "additionalProperties": QUANTITY}}},
        "ports": {"type": "array", "items": {"type": "object", "required": ["containerPort"]}},
    },
}

POD_TEMPLATE: dict[str, Any] = {
    "type": "object", "required": ["spec"],
    "properties": {
        "metadata": {"type": "object"},
        "spec": {"type": "object", "required": ["containers"], "properties": {
            "containers": {"type": "array", "minItems": 1, "items": CONTAINER}}},
    },
}


def prune_crd(crd: dict[str, Any]) -> dict[str, Any]:
    """The `spec` schema of a CRD's v1 version without descriptions, CEL rules and pod templates."""
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]

    def prune(node: Any) -> Any:
        if isinstance(node, list):
            return [prune(item) for item in node]
        if not isinstance(node, dict):
            return node
        if "containers" in node.get("properties", {}).get("spec", {}).get("properties", {}):
            return {POD_TEMPLATE_MARK: True}  # a PodTemplateSpec: `template`, `submitterPodTemplate`
        return {key: prune(value) for key, value in node.items()
                if key not in ("description", "x-kubernetes-validations")}

    return prune(version["schema"]["openAPIV3Schema"]["properties"]["spec"])


def strict(schema: Any) -> Any:
    """Reject unknown keys wherever the CRD declares properties; pod templates get POD_TEMPLATE."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    if schema.get(POD_TEMPLATE_MARK):
        return copy.deepcopy(POD_TEMPLATE)
    out = {key: strict(value) for key, value in schema.items()}
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def manifest_schema(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """The schema of a whole `ray.io/v1` object of `kind` with the given spec schema."""
    return {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "ray.io/v1"},
            "kind": {"const": kind},
            "metadata": {"type": "object", "required": ["name"], "properties": {
                # a DNS-1123 label short enough for KubeRay's longest suffix: Services are named
                # <name>-head-svc and <name>-serve-svc, 63 - len("-serve-svc") = 53 (utils/constant.go)
                "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 53}}},
            "spec": spec,
        },
    }


def load_schemas(crd_file: Path = CRD_FILE) -> dict[str, dict[str, Any]]:
    stored = json.loads(crd_file.read_text())
    return {kind: manifest_schema(kind, strict(stored["spec_schemas"][kind])) for kind in CRD_KINDS.values()}


SCHEMAS: dict[str, dict[str, Any]] = load_schemas()


def _regenerate(crd_dir: Path) -> None:
    import yaml

    spec_schemas = {kind: prune_crd(yaml.safe_load((crd_dir / f"ray.io_{plural}.yaml").read_text()))
                    for plural, kind in CRD_KINDS.items()}
    CRD_FILE.write_text(json.dumps({"kuberay_version": KUBERAY_VERSION, "kuberay_commit": KUBERAY_COMMIT,
                                    "source": "ray-operator/config/crd/bases/ray.io_*.yaml",
                                    "spec_schemas": spec_schemas}, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/support/kuberay_schema.py <kuberay checkout>/ray-operator/config/crd/bases")
    _regenerate(Path(sys.argv[1]))
