"""A strict structural schema for the KubeRay (ray.io/v1) manifests under infra/kuberay/.

KubeRay's CRD OpenAPI schemas are not installable from PyPI (they ship with the operator's Helm chart
and are ~1 MB each, mostly the Kubernetes pod spec). This JSON Schema is our own, written from the
field lists of the v1 RayCluster / RayJob / RayService CRDs: it covers every level our manifests use,
rejects unknown keys on the Ray-specific objects (where a typo would silently do nothing, since the
API server prunes unknown fields), and checks the types KubeRay is strict about (e.g. rayStartParams
values must be strings). Pod templates are checked for the parts Ray needs (containers with name and
image, env entries with value or valueFrom), not as a full Kubernetes PodSpec.
"""

from __future__ import annotations

from typing import Any

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

# KubeRay passes these to `ray start --<key>=<value>`: the CRD types them map[string]string.
RAY_START_PARAMS: dict[str, Any] = {"type": "object", "additionalProperties": {"type": "string"}}

AUTOSCALER_OPTIONS: dict[str, Any] = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
        "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
        "env": {"type": "array", "items": ENV_VAR},
        "envFrom": {"type": "array"}, "image": {"type": "string"}, "imagePullPolicy": {"type": "string"},
        "imagePullSecrets": {"type": "array"}, "resources": {"type": "object"},
        "securityContext": {"type": "object"}, "volumeMounts": {"type": "array"}, "version": {"type": "string"},
    },
}

HEAD_GROUP: dict[str, Any] = {
    "type": "object", "required": ["rayStartParams", "template"], "additionalProperties": False,
    "properties": {
        "rayStartParams": RAY_START_PARAMS, "template": POD_TEMPLATE, "serviceType": {"type": "string"},
        "headService": {"type": "object"}, "enableIngress": {"type": "boolean"},
    },
}

WORKER_GROUP: dict[str, Any] = {
    "type": "object", "required": ["groupName", "template"], "additionalProperties": False,
    "properties": {
        "groupName": {"type": "string", "minLength": 1},
        "replicas": {"type": "integer", "minimum": 0},
        "minReplicas": {"type": "integer", "minimum": 0},
        "maxReplicas": {"type": "integer", "minimum": 0},
        "numOfHosts": {"type": "integer", "minimum": 1},
        "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
        "rayStartParams": RAY_START_PARAMS, "template": POD_TEMPLATE,
        "scaleStrategy": {"type": "object"}, "suspend": {"type": "boolean"},
    },
}

RAY_CLUSTER_SPEC: dict[str, Any] = {
    "type": "object", "required": ["headGroupSpec"], "additionalProperties": False,
    "properties": {
        "rayVersion": {"type": "string"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": AUTOSCALER_OPTIONS,
        "headGroupSpec": HEAD_GROUP,
        "workerGroupSpecs": {"type": "array", "items": WORKER_GROUP},
        "headServiceAnnotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "suspend": {"type": "boolean"}, "managedBy": {"type": "string"},
        "gcsFaultToleranceOptions": {"type": "object"}, "authOptions": {"type": "object"},
    },
}

RAY_JOB_SPEC: dict[str, Any] = {
    "type": "object", "required": ["entrypoint"], "additionalProperties": False,
    "properties": {
        "entrypoint": {"type": "string", "minLength": 1},
        "runtimeEnvYAML": {"type": "string"},
        "entrypointNumCpus": {"type": "number"}, "entrypointNumGpus": {"type": "number"},
        "entrypointResources": {"type": "string"},
        "jobId": {"type": "string"}, "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
        "submitterPodTemplate": POD_TEMPLATE, "submitterConfig": {"type": "object"},
        "shutdownAfterJobFinishes": {"type": "boolean"},
        "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
        "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
        "backoffLimit": {"type": "integer", "minimum": 0},
        "rayClusterSpec": RAY_CLUSTER_SPEC,
        "clusterSelector": {"type": "object", "additionalProperties": {"type": "string"}},
        "suspend": {"type": "boolean"}, "managedBy": {"type": "string"}, "deletionStrategy": {"type": "object"},
    },
    # a RayJob either brings its own cluster or names an existing one
    "oneOf": [{"required": ["rayClusterSpec"]}, {"required": ["clusterSelector"]}],
}

RAY_SERVICE_SPEC: dict[str, Any] = {
    "type": "object", "required": ["serveConfigV2", "rayClusterConfig"], "additionalProperties": False,
    "properties": {
        "serveConfigV2": {"type": "string", "minLength": 1},
        "rayClusterConfig": RAY_CLUSTER_SPEC,
        "serveService": {"type": "object"}, "upgradeStrategy": {"type": "object"},
        "excludeHeadPodFromServeSvc": {"type": "boolean"},
    },
}


def manifest_schema(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """The schema of a whole `ray.io/v1` object of `kind` with the given spec schema."""
    return {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "ray.io/v1"},
            "kind": {"const": kind},
            "metadata": {"type": "object", "required": ["name"], "properties": {
                # a DNS-1123 label: Services named after it must be valid
                "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}}},
            "spec": spec,
        },
    }


SCHEMAS: dict[str, dict[str, Any]] = {
    "RayCluster": manifest_schema("RayCluster", RAY_CLUSTER_SPEC),
    "RayJob": manifest_schema("RayJob", RAY_JOB_SPEC),
    "RayService": manifest_schema("RayService", RAY_SERVICE_SPEC),
}
