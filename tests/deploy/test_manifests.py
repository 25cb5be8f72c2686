"""The deployment files: rendered with kustomize, read as the cluster would read them.

Every overlay (and deploy/, the `kubectl apply -k` entry) is rendered once with
`kubectl kustomize`; the tests assert what a cluster operator relies on: GPUs
only where they belong, security settings and limits on every container, the
teacher's gRPC probes and headless Service, no committed secrets, pinned
images, and that every command in a manifest is a command the `vidalign` CLI
(and torchrun) accepts today, so a renamed flag breaks a test, not a rollout.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import dockerfile
import manifests
import pytest
import validate_deploy
import yaml
from manifests import ROOT, TARGETS, Container

GPU = "nvidia.com/gpu"
GPU_TARGETS = ("k8s/overlays/gpu", "k8s/overlays/kubeflow", "k8s/overlays/gpu-tls", "deploy")
TEACHER_PORT = 50051
HEALTH_PORT = 50052
"""The plaintext health-only port of a teacher that serves TLS (kubelet probes speak no TLS)."""
TLS_TARGETS = ("k8s/overlays/gpu-tls",)
"""Overlays in which the teacher requires TLS, mutual TLS and a bearer token."""
PIPELINE = ("features", "stage1", "stage3", "eval", "priors", "sft")
"""The pipeline Jobs, applied one at a time (label vidalign.io/step), in this order."""
VDA_PIPELINE = PIPELINE[:4]
"""The Jobs that compose also runs, as profiles (MotionEnhancer's run on Kubernetes only)."""
DATA_JOBS = ("data", "sft-data")
"""The GPU overlay's Jobs that shard the recipe's data into the store (data-jobs.yaml)."""
GPU_STEPS = {*PIPELINE, *DATA_JOBS, "stage2"}
"""The vidalign.io/step labels of the GPU overlays: the data Jobs too, and stage 2 (with the
teacher), which needs stage 1's adapter."""
TRAINER_CONFIGS = ("features", "stage1", "stage2", "stage3", "sft")
"""The ConfigMaps (NAME-config, key NAME.yaml) of the jobs that read a `data` section."""
POOLS = {"teacher": "teacher", "stage2": "trainer", "stage1": "teacher", "priors": "teacher"} | {
    name: "trainer" for name in ("features", "stage3", "eval", "sft")
}
"""The GPU node pool of every workload that runs on one."""
WITH_GPU = {("Deployment", "teacher", "teacher")} | {
    ("Job", name, name) for name in ("features", "stage1", "stage3", "priors", "sft")
}
"""Every GPU container but stage 2's trainer (a Job or, in overlays/kubeflow, a TrainJob)."""


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {target: manifests.render(target) for target in TARGETS}


def all_containers(rendered) -> list[tuple[str, Container]]:
    return [
        (target, c) for target, objects in rendered.items() for c in manifests.containers(objects)
    ]


def namespace_of(objects) -> str:
    (ns,) = [o["metadata"]["name"] for o in objects if o["kind"] == "Namespace"]
    return ns


# --- rendering and validation -------------------------------------------------------


def test_validation_script_passes():
    """kustomize + kubernetes-validate --strict (1.33) + compose config -q, as `make validate-deploy`."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "validate_deploy.py")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "skip kubernetes-validate: TrainJob/stage2" in proc.stdout


def test_validation_rejects_unknown_fields_and_bad_trainjobs(rendered):
    objects = [o for o in rendered["k8s/overlays/cpu"] if o["kind"] == "Deployment"]
    objects[0]["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    failures = validate_deploy.validate_objects("test", yaml.safe_dump_all(objects))
    assert failures and "imagePullPolicyy" in failures[0]

    (trainjob,) = [o for o in rendered["k8s/overlays/kubeflow"] if o["kind"] == "TrainJob"]
    assert validate_deploy.check_custom(trainjob) == []
    broken = json.loads(json.dumps(trainjob))
    del broken["spec"]["runtimeRef"]
    broken["spec"]["podTemplateOverrides"] = []
    broken["spec"]["trainer"]["numNodes"] = "2"
    errors = " ".join(validate_deploy.check_custom(broken))
    assert "runtimeRef" in errors and "podTemplateOverrides" in errors and "numNodes" in errors


def test_deploy_entry_is_the_gpu_overlay(rendered):
    assert rendered["deploy"] == rendered["k8s/overlays/gpu"]


# --- GPUs ---------------------------------------------------------------------------


def gpu_request(c: Container) -> bool:
    resources = c.spec.get("resourcesPerNode") or c.spec.get("resources", {})
    return any(GPU in resources.get(part, {}) for part in ("requests", "limits"))


def test_gpus_only_in_gpu_overlays_and_only_on_teacher_and_trainer(rendered):
    assert GPU not in manifests.render_text("k8s/overlays/cpu")
    for target in GPU_TARGETS:
        with_gpu = {
            (c.owner["kind"], c.owner["metadata"]["name"], c.spec.get("name", "trainer"))
            for c in manifests.containers(rendered[target])
            if gpu_request(c)
        }
        trainer = (
            ("TrainJob", "stage2", "trainer")
            if target.endswith("kubeflow")
            else ("Job", "stage2", "trainer")
        )
        assert with_gpu == WITH_GPU | {trainer}, target
        for c in manifests.containers(rendered[target]):
            if gpu_request(c):
                limits = (c.spec.get("resourcesPerNode") or c.spec["resources"])["limits"]
                assert int(limits[GPU]) >= 1


def test_gpu_pools_place_teacher_and_trainer_apart(rendered):
    objects = rendered["k8s/overlays/gpu"]
    pools = {}
    for name in POOLS:
        kind = "Deployment" if name == "teacher" else "Job"
        pod = manifests.pod_spec(manifests.find(objects, kind, name))
        pools[name] = pod["nodeSelector"]["vidalign.io/pool"]
        assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pools == POOLS
    for c in manifests.containers(objects):
        if c.pod and not gpu_request(c):
            assert "nodeSelector" not in c.pod or c.owner["metadata"]["name"] in POOLS
    for o in rendered["k8s/overlays/cpu"]:
        pod = manifests.pod_spec(o)
        assert pod is None or ("nodeSelector" not in pod and "tolerations" not in pod)


def test_models_and_devices_per_overlay(rendered):
    gpu = manifests.config_data(rendered["k8s/overlays/gpu"], "vidalign-config")
    cpu = manifests.config_data(rendered["k8s/overlays/cpu"], "vidalign-config")
    assert (gpu["TEACHER_MODEL"], gpu["STUDENT_MODEL"]) == ("animatediff-v1-5-2", "video-llava-7b")
    assert (gpu["TEACHER_DEVICE"], gpu["TRAINER_DEVICE"], gpu["TEACHER_DTYPE"]) == (
        "cuda",
        "cuda",
        "float16",
    )
    assert (cpu["TEACHER_MODEL"], cpu["STUDENT_MODEL"]) == ("tiny-animatediff", "tiny-videollava")
    assert (cpu["TEACHER_DEVICE"], cpu["TRAINER_DEVICE"]) == ("cpu", "cpu")


# --- every container ---------------------------------------------------------------


def test_every_container_has_requests_limits_and_a_locked_down_security_context(rendered):
    for target, c in all_containers(rendered):
        where = f"{target}: {c.where}"
        if c.owner["kind"] == "TrainJob":
            # The runtime owns the pod template (and its security context).
            resources = c.spec["resourcesPerNode"]
            assert (
                {"cpu", "memory"} <= resources["requests"].keys() <= resources["limits"].keys()
            ), where
            continue
        resources = c.spec["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]), where
        assert {"cpu", "memory"} <= set(resources["limits"]), where
        sc = c.spec["securityContext"]
        pod_sc = c.pod.get("securityContext", {})
        assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, where
        assert sc["allowPrivilegeEscalation"] is False, where
        assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], where
        assert sc.get("privileged", False) is False, where
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile"))
        assert seccomp == {"type": "RuntimeDefault"}, where
        assert isinstance(sc.get("runAsUser", pod_sc.get("runAsUser")), int), where
        assert sc.get("runAsUser", pod_sc.get("runAsUser")) != 0, where


def test_namespace_enforces_the_restricted_pod_security_standard(rendered):
    for target, objects in rendered.items():
        (ns,) = [o for o in objects if o["kind"] == "Namespace"]
        level = ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"]
        # The TrainJob's pods come from the Kubeflow runtime's template, not ours.
        assert level == ("baseline" if target.endswith("kubeflow") else "restricted"), target


def test_every_image_is_pinned_by_a_tag(rendered):
    tags = set()
    for target, c in all_containers(rendered):
        image = c.image
        _, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
        assert tag and tag != "latest", f"{target}: {c.where}: image {image!r} is not pinned"
        if c.is_vidalign:
            tags.add(tag)
    assert len(tags) == 1, f"the vidalign images use different tags: {tags}"
    compose = compose_config()
    for service in compose["services"].values():
        assert (
            not service["image"].endswith((":latest",)) and ":" in service["image"].split("/")[-1]
        )
        if service["image"].startswith("vidalign/"):
            assert service["image"].split(":")[1] in tags


# --- the teacher --------------------------------------------------------------------


def test_teacher_has_grpc_startup_readiness_and_liveness_probes(rendered):
    from vidalign_teacher.server import SERVICE_NAME

    for target, objects in rendered.items():
        teacher = manifests.pod_spec(manifests.find(objects, "Deployment", "teacher"))
        (container,) = [c for c in teacher["containers"] if c["name"] == "teacher"]
        assert {"containerPort": TEACHER_PORT, "name": "grpc"} in container["ports"]
        # Behind TLS the probes go to the health-only plaintext port the server opens.
        tls = any(a.startswith("--tls-cert=") for a in container["args"])
        assert tls == (target in TLS_TARGETS), target
        probe_port = HEALTH_PORT if tls else TEACHER_PORT
        if tls:
            assert f"--health-port={HEALTH_PORT}" in container["args"]
            assert {"containerPort": HEALTH_PORT, "name": "health"} in container["ports"]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container[kind]
            assert probe["grpc"]["port"] == probe_port, (target, kind)
            assert probe["grpc"].get("service", "") in ("", SERVICE_NAME), (target, kind)
        assert container["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
        startup = container["startupProbe"]
        # Real models load for minutes: the startup probe must wait at least 10.
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 600


def test_teacher_service_is_headless_and_reaches_the_grpc_port(rendered):
    for target, objects in rendered.items():
        service = manifests.find(objects, "Service", "teacher-headless")
        assert service["spec"]["clusterIP"] == "None", target
        assert service["spec"].get("publishNotReadyAddresses", False) is False
        deployment = manifests.find(objects, "Deployment", "teacher")
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()
        (port,) = service["spec"]["ports"]
        assert port["port"] == TEACHER_PORT and port["targetPort"] in (TEACHER_PORT, "grpc")
        pdb = manifests.find(objects, "PodDisruptionBudget", "teacher")
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_trainer_reaches_the_teacher_through_the_headless_service(rendered):
    for target, objects in rendered.items():
        ns = namespace_of(objects)
        address = f"dns:///teacher-headless.{ns}.svc.cluster.local:{TEACHER_PORT}"
        assert manifests.config_data(objects, "vidalign-config")["TEACHER_ADDRESS"] == address
        trainers = [
            c for c in manifests.containers(objects) if c.spec.get("name", "trainer") == "trainer"
        ]
        assert trainers, target
        for c in trainers:
            env = manifests.container_env(c, objects)
            words = [w for cmd in manifests.commands(c, env) for w in cmd]
            assert f"--set=teacher.address={address}" in words, target


# --- secrets ------------------------------------------------------------------------


def test_no_secret_is_committed_or_written_into_a_manifest(rendered):
    example = manifests.example_credentials()
    workloads = manifests.example_credentials("store.env")
    assert set(example) == set(workloads) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert example["AWS_ACCESS_KEY_ID"] != workloads["AWS_ACCESS_KEY_ID"]
    for path in ("k8s/base/minio.env", "k8s/base/store.env", "deploy/.env",
                 "k8s/components/teacher-tls/secrets/token",
                 "k8s/components/teacher-tls/secrets/tls.key"):
        tracked = subprocess.run(
            ["git", "ls-files", "--error-unmatch", path], cwd=ROOT, capture_output=True
        )
        assert tracked.returncode != 0, f"{path} is tracked by git"
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
        assert ignored.returncode == 0, f"{path} is not gitignored"
    for target, objects in rendered.items():
        secrets = [o for o in objects if o["kind"] == "Secret"]
        expected = {"minio-credentials", "store-credentials"} | (
            {"teacher-auth"} if target in TLS_TARGETS else set()
        )
        assert {s["metadata"]["name"].rsplit("-", 1)[0] for s in secrets} == expected, target
        # Each Secret holds exactly what its generator read (here: the examples).
        assert manifests.secret_data(objects, "minio-credentials") == example
        assert manifests.secret_data(objects, "store-credentials") == workloads
        assert all("stringData" not in secret for secret in secrets)
        for o in objects:
            if o["kind"] == "ConfigMap":
                keys = o.get("data", {})
                assert not any(manifests.SECRET_ENV.search(k) for k in keys), o["metadata"]["name"]
        for c in manifests.containers(objects):
            for item in c.spec.get("env", []):
                if manifests.SECRET_ENV.search(item["name"]):
                    assert "value" not in item, (
                        f"{target}: {c.where}: {item['name']} has a literal value"
                    )
                value = str(item.get("value", ""))
                assert example["AWS_SECRET_ACCESS_KEY"] not in value
            words = " ".join(c.spec.get("command", []) + c.spec.get("args", []))
            assert example["AWS_SECRET_ACCESS_KEY"] not in words
    compose_text = (ROOT / "deploy" / "compose.yaml").read_text()
    assert example["AWS_SECRET_ACCESS_KEY"] not in compose_text


def references(node: Any, kinds=("configMapRef", "configMapKeyRef", "secretRef", "secretKeyRef")):
    """(kind, name) of every ConfigMap/Secret reference and volume under ``node``."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in kinds and isinstance(value, dict):
                yield ("Secret" if key.startswith("secret") else "ConfigMap"), value["name"]
            elif key == "configMap" and isinstance(value, dict) and "name" in value:
                yield "ConfigMap", value["name"]
            elif key == "secret" and isinstance(value, dict) and "secretName" in value:
                yield "Secret", value["secretName"]
            else:
                yield from references(value, kinds)
    elif isinstance(node, list):
        for item in node:
            yield from references(item, kinds)


def test_every_referenced_configmap_and_secret_is_rendered_under_that_name(rendered):
    for target, objects in rendered.items():
        present = {(o["kind"], o["metadata"]["name"]) for o in objects}
        ns = namespace_of(objects)
        for obj in objects:
            if obj["kind"] not in ("Namespace",):
                assert obj["metadata"].get("namespace") == ns, (target, obj["metadata"]["name"])
            for ref in references(obj.get("spec", {})):
                assert ref in present, f"{target}: {obj['kind']}/{obj['metadata']['name']} -> {ref}"


def test_a_changed_secret_rolls_every_pod_that_uses_it():
    """secretGenerator's hash suffix: new credentials, new name, new pod templates."""

    def render_with(secret: str, file: str = "minio.env") -> list[dict[str, Any]]:
        with tempfile.TemporaryDirectory() as tmp:
            manifests._copy_tree(Path(tmp))
            (Path(tmp) / "k8s/base" / file).write_text(
                f"AWS_ACCESS_KEY_ID=a\nAWS_SECRET_ACCESS_KEY={secret}\n"
            )
            out = subprocess.run(
                [str(manifests.tool("kubectl")), "kustomize", f"{tmp}/k8s/overlays/cpu"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        return [d for d in yaml.safe_load_all(out) if d]

    workloads = (
        ("Deployment", "teacher"),
        ("Job", "stage2"),
        ("Job", "bucket"),  # creates the workloads' user
        *(("Job", name) for name in PIPELINE),
    )
    root = (("StatefulSet", "minio"), ("Job", "bucket"))
    for file, users in (("minio.env", root), ("store.env", workloads)):
        before, after = render_with("first-secret", file), render_with("second-secret", file)
        for kind, name in users:
            old = manifests.find(before, kind, name)["spec"]["template"]
            new = manifests.find(after, kind, name)["spec"]["template"]
            assert old != new, f"{kind}/{name} would not roll on a change of {file}"
        for objects in (before, after):
            secrets = [o["metadata"]["name"] for o in objects if o["kind"] == "Secret"]
            text = yaml.safe_dump_all(objects)
            for name in ("minio-credentials", "store-credentials"):
                assert text.count(f"name: {name}\n") == 0  # every reference is the hashed name
            assert all(secret in text for secret in secrets)


def test_only_minio_and_the_bucket_job_hold_the_root_credentials(rendered):
    """Every other pod reaches the store as the workloads' user, which the bucket Job
    creates with a policy limited to the artifact bucket."""
    for target, objects in rendered.items():
        root = manifests.find(objects, "Secret", "minio-credentials")["metadata"]["name"]
        users = {
            (c.owner["kind"], c.owner["metadata"]["name"])
            for c in manifests.containers(objects)
            if root in yaml.safe_dump(c.spec)
        }
        assert users == {("StatefulSet", "minio"), ("Job", "bucket")}, target
        store = manifests.find(objects, "Secret", "store-credentials")["metadata"]["name"]
        for c in manifests.containers(objects):
            if c.owner["metadata"]["name"] in ("minio", "bucket"):
                continue
            refs = {ref["name"] for ref in _secret_key_refs(c.spec)}
            assert root not in refs, f"{target}: {c.where}"
            if "AWS_ACCESS_KEY_ID" in {e["name"] for e in c.spec.get("env", [])}:
                assert store in refs, f"{target}: {c.where}"
        (mc,) = manifests.pod_spec(manifests.find(objects, "Job", "bucket"))["containers"]
        script = " ".join(mc.get("command", []) + mc.get("args", []))
        assert 'mc admin user add store "$WORKLOAD_ACCESS_KEY_ID" "$WORKLOAD_SECRET_ACCESS_KEY"' in script
        assert "mc admin policy attach store vidalign-workloads" in script
        assert '"arn:aws:s3:::$STORE_BUCKET/*"' in script and '"s3:*"' not in script


def _secret_key_refs(node: Any):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "secretKeyRef":
                yield value
            else:
                yield from _secret_key_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _secret_key_refs(item)


def _mounted_secret_files(pod: dict[str, Any], container: dict[str, Any], secret: str) -> set[str]:
    """Paths under which ``container`` sees the keys of ``secret``."""
    volumes = {
        v["name"]: v["secret"] for v in pod.get("volumes", [])
        if v.get("secret", {}).get("secretName") == secret
    }
    files = set()
    for mount in container.get("volumeMounts", []):
        if mount["name"] in volumes:
            assert mount.get("readOnly") is True
            files |= {f"{mount['mountPath']}/{i['path']}" for i in volumes[mount["name"]]["items"]}
    return files


def test_the_tls_overlay_mounts_the_teacher_secret_and_passes_every_file(rendered):
    for target in TLS_TARGETS:
        objects = rendered[target]
        auth = manifests.find(objects, "Secret", "teacher-auth")["metadata"]["name"]
        teacher_pod = manifests.pod_spec(manifests.find(objects, "Deployment", "teacher"))
        (teacher,) = [c for c in teacher_pod["containers"] if c["name"] == "teacher"]
        files = _mounted_secret_files(teacher_pod, teacher, auth)
        flags = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in teacher["args"] if "=" in a}
        for flag in ("--tls-cert", "--tls-key", "--tls-client-ca", "--token-file"):
            assert flags[flag] in files, (target, flag)
        assert not any(f.endswith("client.key") for f in files)  # not the trainers' key
        stage2_pod = manifests.pod_spec(manifests.find(objects, "Job", "stage2"))
        (trainer,) = [c for c in stage2_pod["containers"] if c["name"] == "trainer"]
        files = _mounted_secret_files(stage2_pod, trainer, auth)
        sets = dict(a.removeprefix("--set=").split("=", 1) for a in trainer["args"]
                    if a.startswith("--set=teacher."))
        for key in ("teacher.tls_ca", "teacher.tls_cert", "teacher.tls_key", "teacher.token_file"):
            assert sets[key] in files, (target, key)
        assert not any(f.endswith("tls.key") for f in files)  # not the teacher's key
        # No token or key is written into an argument: only file paths.
        words = " ".join(teacher["args"] + trainer["args"])
        assert "placeholder" not in words
    for target in set(TARGETS) - set(TLS_TARGETS):
        assert not any(
            o["kind"] == "Secret" and o["metadata"]["name"].startswith("teacher-auth")
            for o in rendered[target]
        )


def render_overlay(path: str) -> tuple[list[dict[str, Any]], str]:
    """`kubectl kustomize` of an overlay outside manifests.TARGETS, as manifests.render does."""
    with tempfile.TemporaryDirectory(prefix="vidalign-kustomize-") as tmp:
        manifests._copy_tree(Path(tmp))
        proc = subprocess.run(
            [str(manifests.tool("kubectl")), "kustomize", f"{tmp}/{path}"], capture_output=True, text=True
        )
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d], proc.stdout


TLS_SETTINGS = {
    "teacher.tls_ca": "ca.crt",
    "teacher.tls_cert": "client.crt",
    "teacher.tls_key": "client.key",
    "teacher.token_file": "token",
}
"""Stage 2's client settings and the teacher-auth key each one's file holds."""


def test_the_tls_component_secures_the_kubeflow_trainjob(rendered, tmp_path):
    """k8s/overlays/kubeflow-tls (the kubeflow overlay + the teacher-tls component): the teacher
    as in gpu-tls; the TrainJob, which cannot mount a Secret, gets the CA, its client
    certificate and key and the token as environment variables from that Secret, writes them to
    files only its user can read, unsets them before torchrun, and passes the files."""
    path = "k8s/overlays/kubeflow-tls"
    objects, text = render_overlay(path)
    assert validate_deploy.validate_objects(path, text) == []
    auth = manifests.find(objects, "Secret", "teacher-auth")["metadata"]["name"]
    teacher = manifests.find(objects, "Deployment", "teacher")
    assert teacher == manifests.find(rendered["k8s/overlays/gpu-tls"], "Deployment", "teacher")
    assert not [o for o in objects if o["kind"] == "Job" and o["metadata"]["name"] == "stage2"]

    (trainjob,) = [o for o in objects if o["kind"] == "TrainJob"]
    (plain,) = [o for o in rendered["k8s/overlays/kubeflow"] if o["kind"] == "TrainJob"]
    env = {e["name"]: e for e in trainjob["spec"]["trainer"]["env"]}
    from_auth = {e["valueFrom"]["secretKeyRef"]["key"]: name for name, e in env.items()
                 if e.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == auth}
    assert set(from_auth) == set(TLS_SETTINGS.values())  # never the teacher's tls.key
    assert trainjob["spec"]["trainer"]["env"][: len(plain["spec"]["trainer"]["env"])] == (
        plain["spec"]["trainer"]["env"]
    )

    script = trainjob["spec"]["trainer"]["args"][0]
    assert "placeholder" not in script  # no certificate or token in the manifest
    lines = script.splitlines()
    writes = {}
    for n, line in enumerate(lines):
        match = re.fullmatch(r"""printf '%s\\n' "\$(\w+)" > (\S+)""", line)
        if match and match[1] in from_auth.values():
            writes[match[1]] = (match[2], n)
    assert lines.index("umask 077") < min(n for _, n in writes.values())
    (unset,) = [n for n, line in enumerate(lines) if line.startswith("unset ")]
    (start,) = [n for n, line in enumerate(lines) if line.startswith("exec torchrun ")]
    assert set(lines[unset].split()[1:]) == set(from_auth.values()) and unset < start

    def torchrun(job: dict[str, Any], objs: list[dict[str, Any]]) -> list[str]:
        (c,) = [c for c in manifests.containers(objs) if c.owner is job]
        (words,) = [w for w in manifests.commands(c, manifests.container_env(c, objs)) if w[0] == "torchrun"]
        return words

    secured, words = torchrun(trainjob, objects), torchrun(plain, rendered["k8s/overlays/kubeflow"])
    assert secured[: len(words)] == words, "the TLS script must run trainjob.yaml's command"
    added = secured[len(words):]
    assert sorted(w.split("=", 2)[1] for w in added) == sorted(TLS_SETTINGS)
    for key, secret_key in TLS_SETTINGS.items():
        assert setting(added, key) == writes[from_auth[secret_key]][0], key
    # Every other line of trainjob.yaml's script is in the TLS one, unchanged.
    plain_lines = plain["spec"]["trainer"]["args"][0].splitlines()
    assert [line for line in plain_lines if not line.startswith("exec ")] == [
        line for line in lines if line in plain_lines
    ]
    (tmp_path / "stage2.yaml").write_text(manifests.config_data(objects, "stage2-config")["stage2.yaml"])
    check_command(secured, tmp_path)


# --- jobs ---------------------------------------------------------------------------


def test_bucket_creation_is_idempotent(rendered):
    for target, objects in rendered.items():
        job = manifests.find(objects, "Job", "bucket")
        (mc,) = manifests.pod_spec(job)["containers"]
        script = " ".join(mc.get("command", []) + mc.get("args", []))
        assert "mc mb --ignore-existing" in script, target
        # The credentials are read at run time, never written into the manifest.
        assert "$AWS_SECRET_ACCESS_KEY" in script
    bucket = compose_config()["services"]["bucket"]
    assert "mc mb --ignore-existing" in " ".join(bucket["entrypoint"] + bucket["command"])


def test_stage2_is_an_indexed_job_with_a_rendezvous_service(rendered):
    for target in ("k8s/overlays/cpu", "k8s/overlays/gpu"):
        objects = rendered[target]
        ns = namespace_of(objects)
        job = manifests.find(objects, "Job", "stage2")
        spec = job["spec"]
        assert spec["completionMode"] == "Indexed"
        pod = spec["template"]["spec"]
        (trainer,) = [c for c in manifests.containers(objects) if c.owner is job and not c.init]
        env = manifests.container_env(trainer, objects)
        assert int(env["NNODES"]) == spec["completions"] == spec["parallelism"]
        service = manifests.find(objects, "Service", pod["subdomain"])
        assert (
            service["spec"]["clusterIP"] == "None"
            and service["spec"]["publishNotReadyAddresses"] is True
        )
        assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
        host, port = env["RDZV_ENDPOINT"].rsplit(":", 1)
        assert host == f"{job['metadata']['name']}-0.{pod['subdomain']}.{ns}.svc.cluster.local"
        assert int(port) in [p["port"] for p in service["spec"]["ports"]]
        index = next(e for e in trainer.spec["env"] if e["name"] == "NODE_RANK")
        assert "job-completion-index" in index["valueFrom"]["fieldRef"]["fieldPath"]


def test_kubeflow_overlay_replaces_the_indexed_job_with_a_trainjob(rendered):
    objects = rendered["k8s/overlays/kubeflow"]
    assert sorted(o["metadata"]["name"] for o in objects if o["kind"] == "Job") == sorted(
        ["bucket", "weights", *DATA_JOBS, *PIPELINE]
    )
    assert not [o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "stage2"]
    (trainjob,) = [o for o in objects if o["kind"] == "TrainJob"]
    assert trainjob["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    assert trainjob["spec"]["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
        "name": "torch-distributed",
    }
    assert trainjob["metadata"]["namespace"] == namespace_of(objects)
    # kustomize reached the TrainJob's references (hash suffixes) and image tag.
    names = {o["metadata"]["name"] for o in objects if o["kind"] in ("ConfigMap", "Secret")}
    for item in trainjob["spec"]["trainer"]["env"]:
        ref = item["valueFrom"].get("configMapKeyRef") or item["valueFrom"].get("secretKeyRef")
        assert ref["name"] in names, item
    assert trainjob["spec"]["trainer"]["image"].startswith("vidalign/trainer:")


# --- the commands are the CLI's ----------------------------------------------------------


def check_command(words: list[str], configs: Path) -> str:
    """Parse one command as the container would run it; returns what it runs.

    ``configs``: a directory with the config files that ``--config`` names
    (by file name: the ConfigMaps mounted at /etc/vidalign).
    """
    from torch.distributed.run import get_args_parser

    from vidalign.config import load_config
    from vidalign.motionenhancer import COGVIDEOX_MODELS
    from vidalign.students import STUDENT_MODELS
    from vidalign.vda import TEACHER_MODELS
    from vidalign_cli.main import build_parser
    from vidalign_trainer.features import FeaturesConfig
    from vidalign_trainer.sft import SFTConfig
    from vidalign_trainer.stage1 import Stage1Config
    from vidalign_trainer.stage2 import Stage2Config
    from vidalign_trainer.stage3 import Stage3Config

    if words[0] == "torchrun":
        launch = get_args_parser().parse_args(words[1:])
        assert launch.module and launch.training_script == "vidalign_cli.main", words
        words = ["vidalign", *launch.training_script_args]
    assert words[0] == "vidalign", words
    warnings = io.StringIO()
    with contextlib.redirect_stderr(warnings):
        args = build_parser().parse_args(words[1:])  # SystemExit on an unknown flag
    assert "deprecated" not in warnings.getvalue(), (words, warnings.getvalue())
    if args.command == "teacher" and args.action == "serve":
        assert args.teacher_model in TEACHER_MODELS and args.adapter, words
    elif args.command == "adapter":
        assert args.teacher_model in TEACHER_MODELS and args.student in STUDENT_MODELS, words
    elif args.command == "models" and args.action == "pull":
        assert args.name in {*TEACHER_MODELS, *STUDENT_MODELS, *COGVIDEOX_MODELS}, words
        # Into the store, or (the priors pod) from the store into a local directory.
        assert args.out.startswith("s3://") or (args.source or "").startswith("s3://"), words
    elif args.command == "train" or (args.command, getattr(args, "action", "")) == (
        "features",
        "extract",
    ):
        # Every --set key and value must fit the config (unknown keys are errors).
        kind = {
            "stage1": Stage1Config, "stage2": Stage2Config, "stage3": Stage3Config, "sft": SFTConfig
        }.get(getattr(args, "stage", ""), FeaturesConfig)
        config = load_config(kind, configs / Path(args.config).name, args.set)
        assert config.device in ("cpu", "cuda"), words
    elif args.command == "eval":
        assert args.out and args.out.startswith("s3://"), words
        return "eval"
    elif args.command == "data" and args.action == "synth":
        assert args.n > 0, words
    elif args.command == "data" and args.action == "prepare":
        assert args.n > 0 and args.out.startswith("s3://"), words
    elif args.command == "data" and args.action == "shard":
        from vidalign.data.videoset import SOURCES

        for source in args.source:
            kind, _, location = source.partition(":")
            assert kind in SOURCES and kind != "shards" and location, words
        assert args.out.startswith("s3://"), words
    elif args.command == "priors" and args.action == "extract":
        # A registry name, or the directory that an init container copied it into.
        assert args.teacher_model in COGVIDEOX_MODELS or args.teacher_model.startswith("/"), words
        assert args.out.startswith("s3://"), words
    return " ".join(words[1:3])


def test_every_command_in_the_manifests_is_a_real_vidalign_command(rendered, tmp_path):
    seen = set()
    for target, objects in rendered.items():
        configs = tmp_path / target.replace("/", "-")
        configs.mkdir()
        for name in TRAINER_CONFIGS:
            (configs / f"{name}.yaml").write_text(
                manifests.config_data(objects, f"{name}-config")[f"{name}.yaml"]
            )
        for c in manifests.containers(objects):
            if not c.is_vidalign:
                continue
            env = manifests.container_env(c, objects)
            runs = [cmd for cmd in manifests.commands(c, env) if cmd[0] in ("vidalign", "torchrun")]
            assert runs, f"{target}: {c.where} runs no vidalign command"
            for words in runs:
                assert not any("$(" in w or "${" in w for w in words), (
                    f"{target}: unexpanded {words}"
                )
                seen.add(check_command(words, configs))
    assert seen == {
        "teacher serve",
        "adapter init",
        "train stage2",
        "models pull",
        "features extract",
        "train stage1",
        "train stage3",
        "data synth",
        "data prepare",
        "data shard",
        "eval",
        "priors extract",
        "train sft",
    }


def pipeline_commands(objects, jobs=(*PIPELINE, *DATA_JOBS)) -> dict[str, list[list[str]]]:
    """The vidalign commands of each pipeline (and data) Job (init containers first)."""
    runs: dict[str, list[list[str]]] = {}
    for c in manifests.containers(objects):
        name = c.owner["metadata"]["name"]
        if c.owner["kind"] == "Job" and name in jobs:
            runs.setdefault(name, []).extend(
                manifests.commands(c, manifests.container_env(c, objects))
            )
    return runs


def setting(words: list[str], key: str) -> str:
    (value,) = [w.split("=", 2)[2] for w in words if w.startswith(f"--set={key}=")]
    return value


def test_pipeline_jobs_read_their_upstream_artifacts(rendered):
    """features -> stage 1, stage 2's encoder -> stage 3, all in the store; eval on SynthMotion
    (overlays/cpu) or MotionBench (the GPU overlays)."""
    for target, objects in rendered.items():
        config = manifests.config_data(objects, "vidalign-config")
        runs = pipeline_commands(objects, PIPELINE)
        assert set(runs) == set(PIPELINE), target
        (features,), (stage1,), (stage3,) = runs["features"], runs["stage1"], runs["stage3"]
        assert setting(features, "output.dir") == config["FEATURES_OUTPUT"]
        assert setting(stage1, "features") == config["FEATURES_OUTPUT"]
        assert setting(stage1, "output.dir") == config["STAGE1_OUTPUT"]
        assert setting(stage1, "teacher.model") == config["TEACHER_MODEL"]
        assert setting(stage1, "device") == config["TEACHER_DEVICE"]
        assert setting(features, "student") == setting(stage3, "student") == config["STUDENT_MODEL"]
        assert setting(stage3, "encoder") == f"{config['STAGE2_OUTPUT']}/encoder"
        assert setting(stage3, "output.dir") == config["STAGE3_OUTPUT"]
        for uri in ("FEATURES_OUTPUT", "STAGE1_OUTPUT", "STAGE3_OUTPUT", "EVAL_OUTPUT"):
            assert config[uri].startswith(config["STORE_URI"] + "/"), uri
        # The training commands that can resume do.
        assert "--resume" in stage1 and "--resume" in stage3
        if target in GPU_TARGETS:
            (evaluate,) = runs["eval"]
            assert "--data=/datasets/motionbench" in evaluate
        else:
            synth, evaluate = runs["eval"]
            assert synth[1:3] == ["data", "synth"]
            out = next(w for w in synth if w.startswith("--out=")).split("=", 1)[1]
            assert f"--data={out}" in evaluate
        assert evaluate[1] == "eval" and "--bench=motionbench" in evaluate
        assert f"--out={config['EVAL_OUTPUT']}" in evaluate
        # The same clips for the features and for stage 1 (it checks their digest).
        data = {
            name: yaml.safe_load(manifests.config_data(objects, f"{name}-config")[f"{name}.yaml"])[
                "data"
            ]
            for name in ("features", "stage1")
        }
        assert data["features"] == data["stage1"], target


def test_pipeline_jobs_are_applied_one_at_a_time(rendered):
    """`kubectl apply -k ... -l '!vidalign.io/step'` leaves exactly the pipeline Jobs out (in the
    GPU overlays also the data Jobs, and the teacher and stage 2, which need stage 1's adapter)."""
    for target, objects in rendered.items():
        labelled = {
            (o["kind"], o["metadata"]["name"]): o["metadata"]["labels"]["vidalign.io/step"]
            for o in objects
            if "vidalign.io/step" in o["metadata"].get("labels", {})
        }
        jobs = {name for (kind, name) in labelled if kind == "Job"}
        if target in GPU_TARGETS:
            stage2 = ("TrainJob" if target.endswith("kubeflow") else "Job", "stage2")
            assert labelled.pop(("Deployment", "teacher")) == labelled.pop(stage2) == "stage2"
            assert set(labelled.values()) == GPU_STEPS - {"stage2"}, target
            jobs -= {"stage2"}
        else:
            assert set(labelled.values()) == set(PIPELINE), target
        assert all(kind == "Job" and step == name for (kind, name), step in labelled.items()), target
        for name in jobs:
            job = manifests.find(objects, "Job", name)
            assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    for path, steps, waits in (
        ("k8s/base/kustomization.yaml", PIPELINE, ("features", "stage1", "stage3")),
        ("k8s/overlays/gpu/kustomization.yaml", GPU_STEPS,
         ("data", "features", "stage1", "stage2", "stage3", "sft-data", "priors")),
    ):
        text = (ROOT / path).read_text()
        for name in steps:
            assert f"-l vidalign.io/step={name}" in text, (path, name)
        for name in waits:
            assert f"wait --for=condition=complete --timeout=24h job/{name}" in text, (path, name)


def test_gpu_steps_are_applied_after_their_inputs():
    """The order in overlays/gpu/kustomization.yaml: each step after the Job it reads from has
    completed (the data Jobs first, stage 2 and the teacher only after stage 1)."""
    text = (ROOT / "k8s" / "overlays" / "gpu" / "kustomization.yaml").read_text()
    lines = [line.removeprefix("#").strip() for line in text.splitlines()]
    applied = {line.rsplit("=", 1)[1].split()[0]: n for n, line in enumerate(lines)
               if line.startswith("kubectl apply -k deploy/ -l vidalign.io/step=")}
    waited = {line.rsplit("/", 1)[1]: n for n, line in enumerate(lines)
              if line.startswith("kubectl -n vidalign wait --for=condition=complete")}
    assert set(applied) == GPU_STEPS
    inputs = {"features": "data", "stage1": "features", "stage2": "stage1", "stage3": "stage2",
              "priors": "sft-data", "sft": "priors"}
    for step, upstream in inputs.items():
        assert applied[upstream] < waited[upstream] < applied[step], (step, upstream)


def test_gpu_pods_load_the_weights_that_the_weights_job_stages(rendered):
    """The weights Job stages the teacher, the student and CogVideoX; every pod that runs one of
    them loads it from there (the priors pod through a verified local copy)."""
    for target in GPU_TARGETS:
        objects = rendered[target]
        config = manifests.config_data(objects, "vidalign-config")
        staged, loaded, copied = {}, {}, {}
        for c in manifests.containers(objects):
            if not c.is_vidalign:
                continue
            for words in manifests.commands(c, manifests.container_env(c, objects)):
                flags = dict(w.split("=", 1) for w in words if w.startswith("--") and "=" in w)
                if words[1:3] == ["models", "pull"]:
                    if c.owner["metadata"]["name"] == "weights":
                        staged[words[3]] = flags["--out"]
                    else:  # a pod's local copy of what the weights Job staged
                        copied[flags["--out"]] = (c.owner["metadata"]["name"], words[3], flags["--from"])
                for w in words:
                    if w.startswith("--weights="):
                        loaded[config["TEACHER_MODEL"]] = w.split("=", 1)[1]
                    if w.startswith("--set=teacher.weights="):
                        assert w.split("=", 2)[2] == loaded.get(
                            config["TEACHER_MODEL"], w.split("=", 2)[2]
                        )
                        loaded[config["TEACHER_MODEL"]] = w.split("=", 2)[2]
                    if w.startswith("--set=student_weights="):
                        loaded[config["STUDENT_MODEL"]] = w.split("=", 2)[2]
        # The priors Job loads CogVideoX from the directory its init container filled.
        ((priors,),) = [[w for w in cmd if w.startswith("--teacher-model=")]
                        for cmd in pipeline_commands(objects)["priors"] if cmd[1:3] == ["priors", "extract"]]
        directory = priors.split("=", 1)[1]
        ((out, (owner, model, source)),) = copied.items()
        assert owner == "priors" and directory == f"{out}/pipeline", target
        loaded[model] = source
        assert staged == loaded, target
        assert set(staged) == {config["TEACHER_MODEL"], config["STUDENT_MODEL"], config["PRIORS_MODEL"]}
        # Every pod that runs the student loads the staged copy.
        for name in ("stage2", "features", "stage3", "sft"):
            words = [w for c in manifests.containers(objects) if c.owner["metadata"]["name"] == name
                     for cmd in manifests.commands(c, manifests.container_env(c, objects)) for w in cmd]
            assert f"--set=student_weights={config['STUDENT_WEIGHTS']}" in words, (target, name)


def test_a_renamed_flag_would_fail_the_command_check(tmp_path):
    (tmp_path / "stage2.yaml").write_text("{}\n")
    config = tmp_path
    with pytest.raises(SystemExit):
        check_command(
            ["vidalign", "teacher", "serve", "--teacher-model=tiny-animatediff", "--adapters=x"], config
        )
    from vidalign.config import ConfigError

    with pytest.raises(ConfigError):
        check_command(
            ["vidalign", "train", "stage2", "--config=stage2.yaml", "--set=teacher.adress=x"],
            config,
        )


def test_both_pods_initialise_the_same_adapter(rendered):
    """The trainer sends the id of its own adapter file; only identical commands give identical
    bytes. (The GPU overlays load stage 1's adapter instead: the next test.)"""
    for target, objects in rendered.items():
        if target in GPU_TARGETS:
            continue
        inits = []
        for c in manifests.containers(objects):
            env = manifests.container_env(c, objects)
            for cmd in manifests.commands(c, env) if c.is_vidalign else []:
                if cmd[1:3] == ["adapter", "init"]:
                    inits.append([w for w in cmd[1:] if not w.startswith("--out=")])
        assert len(inits) == 2 and inits[0] == inits[1], (target, inits)
        # ... and the teacher loads the adapter that stage 2 names.
        config = manifests.config_data(objects, "vidalign-config")
        words = [
            w
            for c in manifests.containers(objects)
            if c.is_vidalign
            for cmd in manifests.commands(c, manifests.container_env(c, objects))
            for w in cmd
        ]
        assert f"--adapter={config['ADAPTER']}" in words, target
        assert f"--set=teacher.adapter={config['ADAPTER']}" in words, target


def test_gpu_teacher_loads_the_adapter_that_stage1_commits(rendered):
    """The GPU overlays' teacher loads stage 1's trained adapter from the store, and stage 2 names
    the same URI; no pod initialises a fresh one."""
    from vidalign_trainer.stage1 import ADAPTER, ADAPTER_FILE

    for target in GPU_TARGETS:
        objects = rendered[target]
        config = manifests.config_data(objects, "vidalign-config")
        # Where `vidalign train stage1` commits its adapter (Stage1.adapter_uri).
        assert config["ADAPTER"] == f"{config['STAGE1_OUTPUT']}/{ADAPTER}/{ADAPTER_FILE}", target
        (stage1,) = pipeline_commands(objects)["stage1"]
        assert setting(stage1, "output.dir") == config["STAGE1_OUTPUT"]
        words = {
            c.owner["metadata"]["name"]: [
                w for cmd in manifests.commands(c, manifests.container_env(c, objects)) for w in cmd
            ]
            for c in manifests.containers(objects)
            if c.is_vidalign and c.owner["metadata"]["name"] in ("teacher", "stage2") and not c.init
        }
        assert f"--adapter={config['ADAPTER']}" in words["teacher"], target
        assert f"--set=teacher.adapter={config['ADAPTER']}" in words["stage2"], target
        for c in manifests.containers(objects):
            commands = manifests.commands(c, manifests.container_env(c, objects)) if c.is_vidalign else []
            assert not any(cmd[1:3] == ["adapter", "init"] for cmd in commands), (target, c.where)
            assert not any(m["mountPath"] == "/adapters" for m in c.spec.get("volumeMounts", [])), c.where
        for name, kind in (("teacher", "Deployment"), ("stage2", "Job")):
            if target.endswith("kubeflow") and name == "stage2":
                continue
            pod = manifests.pod_spec(manifests.find(objects, kind, name))
            assert "adapters" not in {v["name"] for v in pod.get("volumes", [])}, (target, name)


# --- the recipe's data in the GPU overlays -------------------------------------------------

TOY_DATA = ("toy", "synth")
"""Data kinds of tests and demos: generated clips, never a deployment's training data."""


def _flags(words: list[str]) -> dict[str, str]:
    """--flag=value words (the last of a repeated flag wins; see _values)."""
    return dict(w.split("=", 1) for w in words if w.startswith("--") and "=" in w)


def _values(words: list[str], flag: str) -> list[str]:
    return [w.split("=", 1)[1] for w in words if w.startswith(f"{flag}=")]


def _data_sections(node: Any):
    """Every mapping under a `data` key of a parsed config."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "data" and isinstance(value, dict):
                yield value
            yield from _data_sections(value)
    elif isinstance(node, list):
        for item in node:
            yield from _data_sections(item)


def test_gpu_overlays_run_no_toy_or_synth_data(rendered):
    """deploy/ and the GPU overlays train on the recipe's data: no ConfigMap has a `kind: toy`
    or `synth` data section (or SynthMotion path), no container runs `vidalign data synth` or
    sets data.kind to toy/synth, and every trainer ConfigMap's `data` names a store URI."""
    for target in GPU_TARGETS:
        objects = rendered[target]
        store = manifests.config_data(objects, "vidalign-config")["STORE_URI"]
        for o in objects:
            if o["kind"] != "ConfigMap":
                continue
            for key, text in o.get("data", {}).items():
                where = (target, o["metadata"]["name"], key)
                assert "synthmotion" not in text.lower(), where
                if key.endswith(".yaml"):
                    for section in _data_sections(yaml.safe_load(text)):
                        assert section.get("kind", "toy") not in TOY_DATA, where
        for name in TRAINER_CONFIGS:
            (data,) = _data_sections(
                yaml.safe_load(manifests.config_data(objects, f"{name}-config")[f"{name}.yaml"])
            )
            assert data["path"].startswith(f"{store}/"), (target, name, data)
        for c in manifests.containers(objects):
            if not c.is_vidalign:
                continue
            for words in manifests.commands(c, manifests.container_env(c, objects)):
                where = (target, c.where, words)
                assert words[1:3] != ["data", "synth"], where
                assert not [w for w in words if w.removeprefix("--set=data.kind=") in TOY_DATA], where
                assert not [w for w in _values(words, "--source") if w.startswith("synth:")], where
                assert not [w for w in words if "synthmotion" in w.lower()], where


def test_gpu_stages_read_the_data_jobs_shards_at_the_papers_settings(rendered):
    """The data Jobs shard VDA's 10,000 OpenVid clips and MotionEnhancer's QA sets into the
    store; each stage reads those shards, all of them, at the papers' frames and settings."""
    from vidalign import papers
    from vidalign.students import STUDENT_MODELS

    for target in GPU_TARGETS:
        objects = rendered[target]
        config = manifests.config_data(objects, "vidalign-config")
        store = config["STORE_URI"]
        runs = pipeline_commands(objects)
        prepare, shard = runs["data"]
        (sft_shard,) = runs["sft-data"]
        assert prepare[1:3] == ["data", "prepare"] and shard[1:3] == sft_shard[1:3] == ["data", "shard"]
        assert int(_flags(prepare)["--n"]) == 10_000, target  # VDA §4.1
        subset = f"{_flags(prepare)['--out']}/subset"  # where `data prepare` commits the subset
        assert _values(shard, "--source") == [f"records:{subset}"], target
        assert [v.split(":", 1)[0] for v in _values(sft_shard, "--source")] == ["motionbench", "motionvid"]
        vda_shards, sft_shards = _flags(shard)["--out"], _flags(sft_shard)["--out"]
        assert vda_shards.startswith(f"{store}/") and sft_shards.startswith(f"{store}/")
        assert (vda_shards, sft_shards) == (config["VDA_SHARDS"], config["SFT_SHARDS"])

        configs = {
            name: yaml.safe_load(manifests.config_data(objects, f"{name}-config")[f"{name}.yaml"])
            for name in TRAINER_CONFIGS
        }
        student = STUDENT_MODELS[config["STUDENT_MODEL"]]
        for name, stage in configs.items():
            data = stage["data"]
            assert data["kind"] == "shards" and data["num_clips"] == 0, (target, name)
            assert data["path"] == (sft_shards if name == "sft" else vda_shards), (target, name)
            # The student's view: Video-LLaVA-7B samples 8 frames at 224 px (CLIP ViT-L/14).
            assert (data["frames"], data["size"]) == (student.num_frames, 224), (target, name)
        for name in ("stage1", "stage2", "stage3"):
            train = configs[name]["train"]
            assert train["lr"] == papers.VDA_LR and train["batch_size"] == papers.VDA_BATCH_SIZE, name
            assert train["steps"] * train["batch_size"] == 10_000, name  # one pass over the clips
        for name in ("stage1", "stage2"):
            assert configs[name]["teacher"]["frames"] == papers.VDA_DIFFUSION_FRAMES, name
            assert configs[name]["train"]["timestep_range"] == list(papers.VDA_TIMESTEP_RANGE), name
        assert configs["stage1"]["adapter"]["lora_rank"] == papers.VDA_LORA_RANK
        assert configs["stage1"]["adapter"]["projection"] == papers.VDA_PROJECTION
        assert configs["stage3"]["lora"]["rank"] == papers.VDA_LORA_RANK
        assert configs["stage3"]["data"]["tasks"] == ["caption"]  # VDA eq. 5: the same clips' captions
        sft = configs["sft"]
        assert "qa" in sft["data"]["tasks"]
        assert sft["align"]["weight"] == papers.ME_ALIGN_WEIGHT
        assert {k: sft["train"][k] for k in ("lr_vision", "lr_projector", "lr_llm", "weight_decay",
                                             "warmup_ratio", "batch_size")} == {
            "lr_vision": papers.ME_LR_VISION, "lr_projector": papers.ME_LR_MERGER,
            "lr_llm": papers.ME_LR_LLM, "weight_decay": papers.ME_WEIGHT_DECAY,
            "warmup_ratio": papers.ME_WARMUP_RATIO, "batch_size": papers.ME_BATCH_SIZE,
        }
        # Priors: CogVideoX over the SFT's clips at 49 frames (4k + 1), the priors the SFT reads.
        (extract,) = [cmd for cmd in runs["priors"] if cmd[1:3] == ["priors", "extract"]]
        priors = _flags(extract)
        assert (priors["--bench"], priors["--data"]) == ("shards", sft_shards), target
        assert (int(priors["--frames"]), int(priors["--height"]), int(priors["--width"])) == (49, 480, 720)
        assert config["PRIORS_MODEL"] == "cogvideox1.5-5b"
        (train_sft,) = runs["sft"]
        assert setting(train_sft, "priors") == priors["--out"] == config["PRIORS_OUTPUT"]
        assert not [w for w in train_sft if w.startswith("--set=data.")], target


# --- images and compose --------------------------------------------------------------------


def compose_config(profiles: tuple[str, ...] = ("tools",)) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        env = Path(tmp) / ".env"
        shutil.copyfile(ROOT / "deploy" / ".env.example", env)
        out = subprocess.run(
            [
                str(manifests.tool("docker-compose")),
                "-f",
                str(ROOT / "deploy" / "compose.yaml"),
                "--env-file",
                str(env),
                *(arg for profile in profiles for arg in ("--profile", profile)),
                "config",
                "--format",
                "json",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    return json.loads(out)


def test_compose_stack_waits_for_health_and_reserves_a_gpu():
    services = compose_config()["services"]
    assert set(services) == {"minio", "bucket", "weights", "adapter", "teacher", "trainer"}
    assert services["minio"]["image"].startswith("quay.io/minio/minio:RELEASE.")
    assert "healthcheck" in services["minio"] and "healthcheck" in services["teacher"]
    devices = services["teacher"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    depends = {name: cond["condition"] for name, cond in services["trainer"]["depends_on"].items()}
    assert depends == {
        "teacher": "service_healthy",
        "bucket": "service_completed_successfully",
        "adapter": "service_completed_successfully",
    }
    assert services["bucket"]["depends_on"]["minio"]["condition"] == "service_healthy"
    volumes = {v["target"]: v for v in services["minio"]["volumes"]}
    assert volumes["/data"]["type"] == "volume"
    with tempfile.TemporaryDirectory() as tmp:
        stage2_config = Path(tmp)
        shutil.copyfile(ROOT / "k8s" / "base" / "stage2.yaml", stage2_config / "stage2.yaml")
        for name in ("adapter", "teacher", "trainer"):
            check_command(["vidalign", *services[name]["command"]], stage2_config)
        weights = services["weights"]
        script = weights["command"][0].replace("$$", "$")
        pulls = manifests.shell_commands(script, weights["environment"])
        assert [words[:3] for words in pulls] == [["vidalign", "models", "pull"]] * 2
        for words in pulls:
            check_command(words, stage2_config)
    teacher_args = services["teacher"]["command"]
    trainer_args = services["trainer"]["command"]
    assert f"--weights={weights['environment']['TEACHER_WEIGHTS']}" in teacher_args
    assert f"--set=student_weights={weights['environment']['STUDENT_WEIGHTS']}" in trainer_args


def test_compose_pipeline_profiles_run_the_kubernetes_jobs_commands(rendered, tmp_path):
    """One profile per pipeline Job; the same commands, configs and store URIs as the GPU overlay
    (eval: as overlays/cpu, on SynthMotion; the GPU overlay's reads MotionBench from a volume)."""
    services = compose_config(VDA_PIPELINE)["services"]
    assert set(VDA_PIPELINE) <= set(services)
    assert set(VDA_PIPELINE).isdisjoint(compose_config()["services"])  # not started without --profile
    for name in ("stage2", *VDA_PIPELINE[:-1]):
        shutil.copyfile(ROOT / "k8s" / "base" / f"{name}.yaml", tmp_path / f"{name}.yaml")
    jobs = pipeline_commands(rendered["k8s/overlays/gpu"])
    jobs["eval"] = pipeline_commands(rendered["k8s/overlays/cpu"])["eval"]
    for name in VDA_PIPELINE:
        service = services[name]
        assert service["profiles"] == [name]
        if name == "eval":
            script = service["command"][0].replace("$$", "$")
            runs = manifests.shell_commands(script, service["environment"])
        else:
            runs = [["vidalign", *service["command"]]]
            mounts = {v["target"]: v["source"] for v in service["volumes"] if v["type"] == "bind"}
            assert mounts == {
                f"/etc/vidalign/{name}.yaml": str(ROOT / "k8s" / "base" / f"{name}.yaml")
            }
        for words in runs:
            check_command(words, tmp_path)
        # The Job's command, but for the paths inside the pod.
        strip = ("--out=", "--data=")
        assert [sorted(w for w in cmd if not w.startswith(strip)) for cmd in runs] == [
            sorted(w for w in cmd if not w.startswith(strip)) for cmd in jobs[name]
        ], name
        gpu = "deploy" in service and service["deploy"]["resources"]["reservations"]["devices"]
        assert bool(gpu) == (name != "eval"), name


def test_compose_refuses_to_start_without_credentials(tmp_path):
    empty = tmp_path / ".env"
    empty.write_text("")
    proc = manifests.check_compose(empty, env={"PATH": "/usr/bin:/bin"})
    # Which missing variable compose names first varies from run to run.
    assert proc.returncode != 0 and re.search(
        r"is missing a value: set (AWS_ACCESS_KEY_ID|AWS_SECRET_ACCESS_KEY|MINIO_ROOT_USER"
        r"|MINIO_ROOT_PASSWORD) in deploy/.env", proc.stderr
    ), proc.stderr


def _compose_env_example() -> dict[str, str]:
    pairs = {}
    for line in (ROOT / "deploy" / ".env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def _policy(script: str) -> tuple[list[str], list[str]]:
    """The actions and resources of the policy document a bucket script writes."""
    document = json.loads(script.split("<<EOF", 1)[1].split("EOF", 1)[0].replace("$$", "$"))
    (statement,) = document["Statement"]
    assert statement["Effect"] == "Allow"
    return sorted(statement["Action"]), sorted(statement["Resource"])


def test_compose_gives_the_root_credentials_only_to_minio_and_bucket(rendered):
    """As in k8s/: every other service reaches MinIO as the workloads' user, which the bucket
    service creates with the bucket-only policy of k8s/base/bucket-job.yaml."""
    env = _compose_env_example()
    root = (env["MINIO_ROOT_USER"], env["MINIO_ROOT_PASSWORD"])
    workloads = (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"])
    assert root[0] != workloads[0] and root[1] != workloads[1]
    services = compose_config((*VDA_PIPELINE, "tools"))["services"]
    assert set(VDA_PIPELINE) | {"weights", "teacher", "trainer"} <= set(services)
    holders = {name for name, service in services.items()
               if root[1] in {str(v) for v in service.get("environment", {}).values()}}
    assert holders == {"minio", "bucket"}
    for name, service in services.items():
        names = {k for k in service.get("environment", {}) if k.startswith("MINIO_ROOT_")}
        assert bool(names) == (name in holders), name
    assert services["minio"]["environment"]["MINIO_ROOT_USER"] == root[0]
    for name, service in services.items():
        environment = service.get("environment", {})
        if name not in holders and "AWS_ACCESS_KEY_ID" in environment:
            assert (environment["AWS_ACCESS_KEY_ID"], environment["AWS_SECRET_ACCESS_KEY"]) == workloads
        words = json.dumps(service.get("command", [])) + json.dumps(service.get("entrypoint", []))
        assert root[1] not in words and workloads[1] not in words, name
    # Every service that reaches the store starts once the user exists.
    for name in ("weights", "teacher", "trainer", *(n for n in VDA_PIPELINE)):
        assert services[name]["depends_on"]["bucket"]["condition"] == "service_completed_successfully"
    bucket = services["bucket"]
    assert (bucket["environment"]["WORKLOAD_ACCESS_KEY_ID"],
            bucket["environment"]["WORKLOAD_SECRET_ACCESS_KEY"]) == workloads
    script = bucket["command"][0]
    assert 'mc alias set store "$$AWS_ENDPOINT_URL" "$$MINIO_ROOT_USER" "$$MINIO_ROOT_PASSWORD"' in script
    assert 'mc admin user add store "$$WORKLOAD_ACCESS_KEY_ID" "$$WORKLOAD_SECRET_ACCESS_KEY"' in script
    assert "mc admin policy attach store vidalign-workloads" in script
    (mc,) = manifests.pod_spec(manifests.find(rendered["deploy"], "Job", "bucket"))["containers"]
    assert _policy(script) == _policy(mc["args"][0])
    assert '"s3:*"' not in script


def test_one_dockerfile_builds_both_images_on_a_shared_base():
    """Makefile, compose and the local runner build the targets of the root Dockerfile."""
    from run_cpu_overlay_locally import DOCKERFILE, IMAGE_TARGETS, target_instructions

    assert DOCKERFILE == ROOT / "Dockerfile"
    assert not list((ROOT / "services").glob("*/Dockerfile")), "one Dockerfile: the root one"
    instructions = dockerfile.parse_file(str(DOCKERFILE))
    stages = {i.value[-1]: i.value[0] for i in instructions if i.cmd == "FROM" and len(i.value) == 3}
    assert stages["teacher"] == stages["trainer"] == "base"
    teacher, trainer = (target_instructions(t) for t in ("teacher", "trainer"))
    # The base stage is every line the images share: both start with the same
    # instructions, up to the FROM of their own stage.
    shared = next(n for n, i in enumerate(teacher) if i.cmd == "FROM" and n > 0)
    assert [i.original for i in teacher[:shared]] == [i.original for i in trainer[:shared]]
    assert trainer[shared].original == "FROM base AS trainer"
    own = [i.cmd for i in teacher[shared + 1 :] + trainer[shared + 1 :]]
    assert set(own) <= {"EXPOSE", "HEALTHCHECK", "CMD"}, "what differs is only how each image runs"
    assert IMAGE_TARGETS == {"vidalign/teacher": "teacher", "vidalign/trainer": "trainer"}
    makefile = (ROOT / "Makefile").read_text()
    for target in ("teacher", "trainer"):
        assert f"docker build --target {target} -t $(IMAGE_PREFIX)/{target}:$(IMAGE_TAG) ." in makefile
    compose = compose_config()
    builds = {
        name: (service["image"], service["build"])
        for name, service in compose["services"].items()
        if "build" in service
    }
    assert builds, "compose builds the vidalign images"
    for name, (image, build) in builds.items():
        assert Path(build["context"]) == ROOT, name
        assert build.get("dockerfile", "Dockerfile") == "Dockerfile", name
        assert build["target"] == IMAGE_TARGETS[image.split(":")[0]], name


@pytest.mark.parametrize("service", ["teacher", "trainer"])
def test_dockerfile(service):
    from run_cpu_overlay_locally import target_instructions

    instructions = target_instructions(service)  # the base stage's, then the target's own
    args = {}  # ARG defaults, the global ones (above the first FROM) included
    for i in dockerfile.parse_file(str(ROOT / "Dockerfile")):
        if i.cmd == "ARG" and "=" in i.value[0]:
            key, _, value = i.value[0].partition("=")
            args[key] = value
    cmds = [i.cmd for i in instructions]
    bases = [args.get(i.value[0].strip("${}"), i.value[0]) for i in instructions if i.cmd == "FROM"]
    assert bases == ["nvidia/cuda:12.8.1-base-ubuntu24.04", "base"]
    assert args["UV_IMAGE"].startswith("ghcr.io/astral-sh/uv:")
    for image in (args["CUDA_IMAGE"], args["UV_IMAGE"]):
        assert ":" in image and not image.endswith(":latest"), image
    runs = [i.value[0] for i in instructions if i.cmd == "RUN"]
    assert any(
        "download.pytorch.org/whl/cu128 torch==2.13.0"
        in r.replace("${TORCH_INDEX}", args["TORCH_INDEX"])
        for r in runs
    )
    assert any("-r requirements.txt" in r for r in runs)
    copies = [i.value for i in instructions if i.cmd == "COPY" and not i.flags]
    first_source = next(n for n, c in enumerate(copies) if c[0] in ("libs", "services"))
    deps = next(n for n, c in enumerate(copies) if "pyproject.toml" in c)
    assert deps < first_source, "dependencies must be installed before the source is copied"
    assert any("pip install --no-deps ." in r for r in runs)
    (user,) = [i.value[0] for i in instructions if i.cmd == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    entry = next(i for i in instructions if i.cmd == "ENTRYPOINT")
    assert entry.json and list(entry.value) == ["vidalign"]
    cmd = next(i for i in instructions if i.cmd == "CMD")
    assert cmd.json
    from vidalign_cli.main import build_parser

    build_parser().parse_args(list(cmd.value))
    assert ("HEALTHCHECK" in cmds) == (service == "teacher")
    assert cmds.index("USER") > cmds.index("RUN")


def test_dockerignore_keeps_the_venv_caches_runs_and_credentials_out():
    lines = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert lines[0] == "*", "allow-list: everything is excluded first"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {
        "pyproject.toml",
        "requirements.txt",
        "requirements-dev.txt",
        "README.md",
        "libs",
        "services",
    }


# --- the CPU overlay, run as local processes ---------------------------------------


@pytest.mark.slow
def test_cpu_overlay_pods_run_as_local_processes(tmp_path):
    import run_cpu_overlay_locally

    # Then the pipeline Jobs, in the README's order, each reading its upstream's
    # artifact from the store: features -> stage 1, stage 2's encoder -> stage 3.
    result = run_cpu_overlay_locally.run(tmp_path, steps=2, timeout=300, pipeline=PIPELINE)
    names = {p.name for p in result["files"]}
    assert "encoder.safetensors" in names, names
    assert result["adapter_sha256"]
    assert list(result["jobs"]) == list(PIPELINE)
    store = result["store"]
    assert (store / "runs" / "stage1" / "adapter" / "adapter.safetensors").is_file()
    assert (store / "runs" / "stage3" / "lora" / "adapter_model.safetensors").is_file()
    assert "motionbench.json" in names, names
    assert (store / "priors" / "synthmotion" / "index" / "MANIFEST.json").is_file()
    assert (store / "runs" / "sft" / "model" / "MANIFEST.json").is_file()


def test_every_deployed_teacher_binds_every_interface_explicitly(rendered):
    """`teacher serve` binds loopback by default; each deployment opens it on purpose."""
    for target, objects in rendered.items():
        teacher = manifests.pod_spec(manifests.find(objects, "Deployment", "teacher"))
        (container,) = [c for c in teacher["containers"] if c["name"] == "teacher"]
        assert "--host=0.0.0.0" in container["args"], target
    assert "--host=0.0.0.0" in compose_config()["services"]["teacher"]["command"]
    (cmd,) = [
        i for i in dockerfile.parse_file(str(ROOT / "Dockerfile")) if i.cmd.lower() == "cmd"
        and "teacher" in i.value
    ]
    words = list(cmd.value)
    assert words[words.index("--host") + 1] == "0.0.0.0"
