"""Validate everything that deploys vidalign, offline (``make validate-deploy``).

1. ``kubectl kustomize`` renders every overlay and ``deploy/``;
2. ``kubernetes-validate --strict -k 1.33.0`` checks every built-in object
   (unknown fields are errors). It has no schema for custom resources: the
   Kubeflow TrainJob is skipped there, with a message, and checked against the
   fields of the published TrainJob CRD instead (``TRAINJOB_SCHEMA``);
3. ``docker-compose -f deploy/compose.yaml config -q`` with an env file copied
   from ``deploy/.env.example``.

It installs nothing: the tools come from the virtual environment
(``make setup``). Run it with that environment's interpreter:

    .venv/bin/python scripts/validate_deploy.py
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from manifests import (
    KUBERNETES_VERSION,
    ROOT,
    TARGETS,
    check_compose,
    is_custom,
    render_text,
    tool,
)

_STRINGS = {"type": "array", "items": {"type": "string", "maxLength": 65536}, "maxItems": 128}
_QUANTITIES = {"type": "object", "additionalProperties": {"type": ["string", "integer"]}}
_KEY_REF = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "key": {"type": "string"},
        "optional": {"type": "boolean"},
    },
    "required": ["key"],
    "additionalProperties": False,
}
TRAINJOB_SCHEMA: dict[str, Any] = {
    # Transcribed from the TrainJob CRD of Kubeflow Trainer v2
    # (kubeflow/trainer, manifests/base/crds/trainer.kubeflow.org_trainjobs.yaml).
    # Only fields that every v2 release has are allowed: pod-template patches
    # moved between releases (spec.podTemplateOverrides -> spec.runtimePatches;
    # spec.labels/annotations went away), so a TrainJob using them would work on
    # some clusters only.
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "trainer.kubeflow.org/v1alpha1"},
        "kind": {"const": "TrainJob"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            # CRD rule: metadata.name must match RFC 1035 DNS label format.
            "properties": {
                "name": {
                    "type": "string",
                    "pattern": "^[a-z]([-a-z0-9]*[a-z0-9])?$",
                    "maxLength": 63,
                }
            },
        },
        "spec": {
            "type": "object",
            "required": ["runtimeRef"],
            "additionalProperties": False,
            "properties": {
                "runtimeRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {
                        "name": {"type": "string", "minLength": 1, "maxLength": 253},
                        "apiGroup": {"type": "string", "maxLength": 253},
                        "kind": {"enum": ["ClusterTrainingRuntime", "TrainingRuntime"]},
                    },
                },
                "suspend": {"type": "boolean"},
                "managedBy": {
                    "enum": [
                        "trainer.kubeflow.org/trainjob-controller",
                        "kueue.x-k8s.io/multikueue",
                    ]
                },
                "initializer": {"type": "object"},
                "trainer": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "image": {"type": "string", "maxLength": 500},
                        "command": _STRINGS,
                        "args": _STRINGS,
                        "numNodes": {"type": "integer", "minimum": 1},
                        "numProcPerNode": {"type": "integer", "minimum": 1},
                        "resourcesPerNode": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "limits": _QUANTITIES,
                                "requests": _QUANTITIES,
                                "claims": {"type": "array"},
                            },
                        },
                        "env": {
                            "type": "array",
                            "maxItems": 128,
                            "items": {
                                "type": "object",
                                "required": ["name"],
                                "additionalProperties": False,
                                "properties": {
                                    "name": {"type": "string"},
                                    "value": {"type": "string"},
                                    "valueFrom": {
                                        "type": "object",
                                        "additionalProperties": False,
                                        "minProperties": 1,
                                        "maxProperties": 1,
                                        "properties": {
                                            "configMapKeyRef": _KEY_REF,
                                            "secretKeyRef": _KEY_REF,
                                            "fieldRef": {
                                                "type": "object",
                                                "required": ["fieldPath"],
                                            },
                                            "resourceFieldRef": {
                                                "type": "object",
                                                "required": ["resource"],
                                            },
                                        },
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def check_custom(obj: dict[str, Any]) -> list[str]:
    """Errors of a custom resource against the schema this script knows for it."""
    if obj.get("kind") != "TrainJob":
        return [f"no schema known for {obj.get('apiVersion')} {obj.get('kind')}"]
    validator = jsonschema.Draft202012Validator(TRAINJOB_SCHEMA)
    return [
        f"{'.'.join(str(p) for p in error.absolute_path) or '<root>'}: {error.message}"
        for error in validator.iter_errors(obj)
    ]


def validate_objects(label: str, text: str) -> list[str]:
    """Strict schema validation of rendered YAML; returns the failures (empty: valid)."""
    docs = [doc for doc in yaml.safe_load_all(text) if doc]
    builtin = [doc for doc in docs if not is_custom(doc)]
    failures = []
    for doc in docs:
        if is_custom(doc):
            name = f"{doc['kind']}/{doc['metadata']['name']} ({doc['apiVersion']})"
            print(f"  skip kubernetes-validate: {name} is a custom resource with no schema there;")
            errors = check_custom(doc)
            print(
                f"       checked against the published CRD's fields instead: {'FAILED' if errors else 'ok'}"
            )
            failures += [f"{label}: {name}: {e}" for e in errors]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="vidalign-") as f:
        yaml.safe_dump_all(builtin, f, sort_keys=False)
        f.flush()
        proc = subprocess.run(
            [
                str(tool("kubernetes-validate")),
                "--strict",
                "--quiet",
                "-k",
                KUBERNETES_VERSION,
                f.name,
            ],
            capture_output=True,
            text=True,
        )
    if proc.returncode != 0:
        failures.append(f"{label}: kubernetes-validate:\n{proc.stdout}{proc.stderr}")
    else:
        print(f"  {len(builtin)} objects valid for Kubernetes {KUBERNETES_VERSION} (strict)")
    return failures


def validate_compose() -> list[str]:
    with tempfile.TemporaryDirectory(prefix="vidalign-compose-") as tmp:
        env_file = Path(tmp) / ".env"
        shutil.copyfile(ROOT / "deploy" / ".env.example", env_file)
        proc = check_compose(env_file)
    if proc.returncode != 0:
        return [f"deploy/compose.yaml: docker-compose config:\n{proc.stdout}{proc.stderr}"]
    print("  valid (docker-compose config -q, env from deploy/.env.example)")
    return []


def main() -> int:
    failures: list[str] = []
    for target in TARGETS:
        print(f"{target}:")
        try:
            text = render_text(target)
        except RuntimeError as err:
            failures.append(str(err))
            continue
        failures += validate_objects(target, text)
    print("deploy/compose.yaml:")
    failures += validate_compose()
    if failures:
        print("\nFAILED:\n" + "\n".join(failures), file=sys.stderr)
        return 1
    print("all deployment files are valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
