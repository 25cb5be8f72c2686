"""Run the CPU overlay's pods as local processes: what the cluster would run, here.

Renders ``k8s/overlays/cpu`` and runs, with the commands, arguments and
environment taken from the rendered objects:

1. the teacher pod: its ``adapter-init`` init container, then ``teacher serve``,
   polled through the pod's own gRPC startup/readiness/liveness probes (and the
   teacher image's HEALTHCHECK) until SERVING;
2. the stage-2 pod: its ``adapter-init`` (it must write the same bytes as the
   teacher pod's, or the trainer would ask for an adapter the teacher lacks),
   then the trainer container (torchrun -> ``vidalign train stage2``) for a few
   steps against the teacher; it must exit 0;
3. with ``--pipeline features,stage1,stage3,eval,priors,sft`` (any of them, in that
   order), the pipeline Jobs one after the other, as the README applies them:
   init containers, then the container, each to exit 0, reading its upstream's
   artifacts from the store (features -> stage 1; stage 2's encoder -> stage 3).

What differs from the cluster, and only that: cluster DNS names become
127.0.0.1 with a free port per (workload, container port); each pod's volumes
become directories under the work dir (ConfigMap volumes get their files);
the store URI ``s3://<bucket>`` becomes a local directory; ``--host=0.0.0.0``
becomes 127.0.0.1; ``train.steps`` (and stage 1's ``eval.num_clips``) is lowered. Secrets are the example values.

    .venv/bin/python scripts/run_cpu_overlay_locally.py [--steps 3] [--workdir DIR] \
        [--pipeline features,stage1,stage3,eval,priors,sft]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from manifests import ROOT, Container, container_env, containers, expand, find, pod_spec, render

COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
LAUNCHERS = {
    "vidalign": [sys.executable, "-m", "vidalign_cli.main"],
    "torchrun": [sys.executable, "-m", "torch.distributed.run"],
}
DOCKERFILE = ROOT / "Dockerfile"
IMAGE_TARGETS = {"vidalign/teacher": "teacher", "vidalign/trainer": "trainer"}
"""The build target (a stage of DOCKERFILE) of each vidalign image."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def target_instructions(target: str, path: Path = DOCKERFILE) -> list:
    """The instructions that make up build target ``target``: its stage's, after those
    of the stages it is built FROM (``FROM base AS teacher``), starting at the first FROM.
    """
    import dockerfile

    stages: dict[str, list] = {}
    current: list = []
    for instr in dockerfile.parse_file(str(path)):
        if instr.cmd == "FROM":
            parent, *alias = instr.value
            current = [*stages.get(parent, []), instr]
            if len(alias) == 2 and alias[0].lower() == "as":
                stages[alias[1]] = current
        elif current:
            current.append(instr)
    if target not in stages:
        raise ValueError(f"{path} has no build target {target!r}; targets: {sorted(stages)}")
    return stages[target]


def image_env(image: str) -> dict[str, str]:
    """ENV of the image's build target, base stages included: the caches point into /cache."""
    env: dict[str, str] = {}
    for instr in target_instructions(IMAGE_TARGETS[image.split(":")[0]]):
        if instr.cmd == "ENV":
            values = list(instr.value)
            env.update(zip(values[0::2], values[1::2], strict=True))
    return env


class LocalCluster:
    """Maps what the cluster provides (DNS, volumes, store) onto this machine."""

    def __init__(self, objects: list[dict[str, Any]], workdir: Path) -> None:
        self.objects = objects
        self.workdir = workdir
        self.namespace = find(objects, "Namespace", "vidalign")["metadata"]["name"]
        self.ports: dict[tuple[str, int], int] = {}
        self.store = workdir / "store"
        self.bucket = self._config_value("STORE_BUCKET")

    def _config_value(self, key: str) -> str:
        for obj in self.objects:
            if obj["kind"] == "ConfigMap" and key in obj.get("data", {}):
                return obj["data"][key]
        raise KeyError(key)

    def local_port(self, workload: dict[str, Any], container_port: int) -> int:
        key = (f"{workload['kind']}/{workload['metadata']['name']}", container_port)
        if key not in self.ports:
            self.ports[key] = free_port()
        return self.ports[key]

    def _service_target(self, service_name: str, port: int) -> int:
        service = find(self.objects, "Service", service_name)
        selector = service["spec"]["selector"]
        spec_port = next(p for p in service["spec"]["ports"] if p["port"] == port)
        for obj in self.objects:
            pod = pod_spec(obj)
            if pod is None:
                continue
            labels = (obj["spec"]["template"]["metadata"] or {}).get("labels", {})
            if all(labels.get(k) == v for k, v in selector.items()):
                target = spec_port.get("targetPort", port)
                for c in pod["containers"]:
                    for p in c.get("ports", []):
                        if target in (p["containerPort"], p.get("name")):
                            return self.local_port(obj, p["containerPort"])
        raise KeyError(f"Service {service_name}:{port} selects no container port")

    def localize(self, text: str, mounts: dict[str, Path]) -> str:
        """Cluster paths, DNS names and the store URI in ``text``, as local ones (one pass each)."""
        if mounts:  # first, and in one pass: a replaced path must not match a mount again
            alternatives = "|".join(re.escape(m) for m in sorted(mounts, key=len, reverse=True))
            text = re.sub(
                rf"(^|=)({alternatives})(?=/|$)",
                lambda m: m.group(1) + str(mounts[m.group(2)]),
                text,
            )
        ns = re.escape(self.namespace)

        def dns(match: re.Match[str]) -> str:
            return f"127.0.0.1:{self._service_target(match.group(1), int(match.group(2)))}"

        text = re.sub(rf"(?:[a-z0-9-]+\.)?([a-z0-9-]+)\.{ns}\.svc\.cluster\.local:(\d+)", dns, text)
        return text.replace(f"s3://{self.bucket}", str(self.store))

    def pod_dirs(self, workload: dict[str, Any]) -> dict[str, Path]:
        """One directory per volume of the pod; ConfigMap volumes hold their files."""
        pod = pod_spec(workload)
        root = self.workdir / "pods" / workload["metadata"]["name"]
        dirs = {}
        for volume in pod.get("volumes", []):
            path = root / volume["name"]
            path.mkdir(parents=True, exist_ok=True)
            if "configMap" in volume:
                cm = next(
                    o
                    for o in self.objects
                    if o["kind"] == "ConfigMap"
                    and o["metadata"]["name"] == volume["configMap"]["name"]
                )
                for key, value in cm.get("data", {}).items():
                    (path / key).write_text(value)
            dirs[volume["name"]] = path
        return dirs

    def process(
        self, container: Container, dirs: dict[str, Path], extra_args: tuple[str, ...] = ()
    ) -> tuple[list[str], dict[str, str]]:
        """The argv and environment of ``container`` as a local process."""
        mounts = {
            m["mountPath"]: dirs[m["name"]]
            for m in container.spec.get("volumeMounts", [])
            if m["mountPath"] != "/dev/shm"
        }
        env = container_env(container, self.objects, field_values={COMPLETION_INDEX: "0"})
        env.pop("AWS_ENDPOINT_URL", None)  # the store is a local directory here
        # Expand with the cluster's values, then localize once (like the env values).
        args = [
            expand(a, env) for a in [*container.spec["command"], *container.spec.get("args", [])]
        ]
        args = [self.localize(a, mounts) for a in args]
        env = {k: self.localize(v, mounts) for k, v in env.items()}
        args = [a.replace("--host=0.0.0.0", "--host=127.0.0.1") for a in args]
        for port in container.spec.get("ports", []):
            local = self.local_port(container.owner, port["containerPort"])
            mapped = {f"{flag}={port['containerPort']}": f"{flag}={local}"
                      for flag in ("--port", "--metrics-port")}
            args = [mapped.get(a, a) for a in args]
        leftover = [a for a in args if "svc.cluster.local" in a or "s3://" in a or "$(" in a]
        if leftover:
            raise ValueError(f"{container.where}: arguments the local run cannot map: {leftover}")
        image = {
            k: self.localize(v, mounts)
            for k, v in image_env(container.image).items()
            if any(v.startswith(m) for m in mounts)
        }
        process_env = {
            k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "VIDALIGN_", "PET_"))
        }
        process_env |= image | env
        process_env.setdefault("OMP_NUM_THREADS", "2")
        launcher = LAUNCHERS[args[0]]
        return [*launcher, *args[1:], *extra_args], process_env


def run_init(cluster: LocalCluster, container: Container, dirs: dict[str, Path], log: Path) -> None:
    argv, env = cluster.process(container, dirs)
    print(f"[{container.where}] {' '.join(argv[2:])}", flush=True)
    with log.open("w") as out:
        proc = subprocess.run(argv, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{container.where} exited {proc.returncode}; see {log}")


def grpc_probe(address: str, service: str) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2
            )
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def healthcheck_command(address: str) -> list[str]:
    """The teacher image's HEALTHCHECK, pointed at ``address``."""
    for instr in target_instructions(IMAGE_TARGETS["vidalign/teacher"]):
        if instr.cmd == "HEALTHCHECK":
            words = list(instr.value)
            assert words[0] == "CMD" and instr.json, "HEALTHCHECK must be CMD in exec form"
            return [
                sys.executable if w == "python" else w.replace("127.0.0.1:50051", address)
                for w in words[1:]
            ]
    raise ValueError("the Dockerfile's teacher target has no HEALTHCHECK")


def wait_for_probes(
    cluster: LocalCluster, teacher: Container, proc: subprocess.Popen, timeout: float
) -> None:
    """Poll the container's startup probe, then check readiness and liveness once."""
    spec = teacher.spec
    deadline = time.monotonic() + timeout
    probe = spec["startupProbe"]["grpc"]
    address = f"127.0.0.1:{cluster.local_port(teacher.owner, probe['port'])}"
    while not grpc_probe(address, probe.get("service", "")):
        if proc.poll() is not None:
            raise RuntimeError(f"the teacher exited with status {proc.returncode} before SERVING")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the teacher's startup probe did not pass within {timeout:.0f} s")
        time.sleep(0.5)
    for kind in ("readinessProbe", "livenessProbe"):
        probe = spec[kind]["grpc"]
        address = f"127.0.0.1:{cluster.local_port(teacher.owner, probe['port'])}"
        if not grpc_probe(address, probe.get("service", "")):
            raise RuntimeError(f"the teacher's {kind} (service {probe.get('service', '')!r}) fails")
    check = subprocess.run(healthcheck_command(address), capture_output=True, text=True, timeout=60)
    if check.returncode != 0:
        raise RuntimeError(
            f"the teacher image's HEALTHCHECK fails on a SERVING teacher: {check.stderr}"
        )
    print(
        f"[teacher] SERVING on {address}: startup, readiness, liveness probes and HEALTHCHECK pass",
        flush=True,
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


PIPELINE = ("features", "stage1", "stage3", "eval", "priors", "sft")
"""The pipeline Jobs (label vidalign.io/step), in the order the README applies them."""
FAST = {
    # Fewer steps and evaluation clips: the same commands, a shorter run.
    "stage1": ("--set=train.steps={steps}", "--set=eval.num_clips=1"),
    "stage3": ("--set=train.steps={steps}",),
    "priors": ("--steps=1",),
    "sft": ("--set=train.steps={steps}", "--set=data.num_clips=4"),
}


def run_job(cluster: LocalCluster, name: str, steps: int, timeout: float, logs: Path) -> list[str]:
    """Run the Job ``name``'s init containers, then its container, to exit 0; returns its argv."""
    job = find(cluster.objects, "Job", name)
    dirs = cluster.pod_dirs(job)
    ours = [c for c in containers(cluster.objects) if c.owner is job]
    for init in [c for c in ours if c.init]:
        run_init(cluster, init, dirs, logs / f"{name}-{init.spec['name']}.log")
    (main,) = [c for c in ours if not c.init]
    extra = tuple(a.format(steps=steps) for a in FAST.get(name, ()))
    argv, env = cluster.process(main, dirs, extra_args=extra)
    print(f"[{main.where}] {' '.join(argv[2:])}", flush=True)
    with (logs / f"{name}.log").open("w") as out:
        result = subprocess.run(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout
        )
    if result.returncode != 0:
        raise RuntimeError(f"Job {name} exited {result.returncode}; see {logs / f'{name}.log'}")
    return argv


def run(
    workdir: Path, steps: int, timeout: float = 600.0, pipeline: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Run both pods, then the ``pipeline`` Jobs in order; returns what happened (raises on any failure).

    The pipeline Jobs read their upstream's artifacts from the (local) store, as
    on the cluster: stage 1 needs features, stage 3 needs the stage-2 encoder.
    """
    objects = render("k8s/overlays/cpu")
    cluster = LocalCluster(objects, workdir)
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    deployment = find(objects, "Deployment", "teacher")
    job = find(objects, "Job", "stage2")
    by_owner = {}
    for c in containers(objects):
        by_owner.setdefault(c.owner["metadata"]["name"] + ("/init" if c.init else ""), []).append(c)
    if job["spec"]["completions"] != 1:
        raise ValueError("the CPU overlay's stage-2 Job must run one node to run locally")

    teacher_dirs = cluster.pod_dirs(deployment)
    for init in by_owner.get("teacher/init", []):
        run_init(cluster, init, teacher_dirs, logs / f"teacher-{init.spec['name']}.log")
    (teacher,) = by_owner["teacher"]
    argv, env = cluster.process(teacher, teacher_dirs)
    print(f"[{teacher.where}] {' '.join(argv[2:])}", flush=True)
    teacher_log = (logs / "teacher.log").open("w")
    proc = subprocess.Popen(argv, env=env, stdout=teacher_log, stderr=subprocess.STDOUT)
    try:
        wait_for_probes(cluster, teacher, proc, timeout)

        trainer_dirs = cluster.pod_dirs(job)
        for init in by_owner.get("stage2/init", []):
            run_init(cluster, init, trainer_dirs, logs / f"stage2-{init.spec['name']}.log")
        digests = {
            "teacher": sha256(teacher_dirs["adapters"] / "adapter.safetensors"),
            "stage2": sha256(trainer_dirs["adapters"] / "adapter.safetensors"),
        }
        if len(set(digests.values())) != 1:
            raise RuntimeError(f"the two pods' adapter-init wrote different adapters: {digests}")
        print(f"[adapter] both pods wrote sha256:{digests['teacher']}", flush=True)

        (trainer,) = by_owner["stage2"]
        argv, env = cluster.process(
            trainer, trainer_dirs, extra_args=(f"--set=train.steps={steps}",)
        )
        print(f"[{trainer.where}] {' '.join(argv[2:])}", flush=True)
        with (logs / "stage2.log").open("w") as out:
            result = subprocess.run(
                argv, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout
            )
        if result.returncode != 0:
            raise RuntimeError(f"stage 2 exited {result.returncode}; see {logs / 'stage2.log'}")
        output = [p for p in cluster.store.rglob("*") if p.is_file()]
        if not output:
            raise RuntimeError(f"stage 2 exited 0 but wrote nothing under {cluster.store}")
        print(
            f"[stage2] exit 0 after {steps} steps; {len(output)} files under {cluster.store}",
            flush=True,
        )
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        teacher_log.close()
    if proc.returncode != 0:
        raise RuntimeError(
            f"the teacher exited {proc.returncode} on SIGTERM; see {logs / 'teacher.log'}"
        )
    jobs = {}
    for name in pipeline:
        jobs[name] = run_job(cluster, name, steps, timeout, logs)
        print(f"[{name}] exit 0", flush=True)
    output = [p for p in cluster.store.rglob("*") if p.is_file()]
    return {
        "jobs": jobs,
        "adapter_sha256": digests["teacher"],
        "store": cluster.store,
        "files": output,
        "logs": logs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="stage-2 steps (train.steps)")
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: a temp dir)")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument(
        "--pipeline",
        default="",
        help=f"comma-separated pipeline Jobs to run after stage 2, in order ({','.join(PIPELINE)})",
    )
    args = parser.parse_args(argv)
    pipeline = tuple(name for name in args.pipeline.split(",") if name)
    if unknown := set(pipeline) - set(PIPELINE):
        parser.error(f"--pipeline: unknown Jobs {sorted(unknown)}")
    with tempfile.TemporaryDirectory(prefix="vidalign-cpu-overlay-") as tmp:
        workdir = args.workdir or Path(tmp)
        try:
            run(workdir, args.steps, args.timeout, pipeline)
        except (RuntimeError, TimeoutError, ValueError, OSError) as err:
            print(f"FAILED: {err}", file=sys.stderr)
            for log in sorted((workdir / "logs").glob("*.log")):
                print(
                    f"--- {log.name} (tail)\n{''.join(log.read_text().splitlines(True)[-30:])}",
                    file=sys.stderr,
                )
            return 1
    print(f"the CPU overlay's pods ran locally (teacher, stage2, {', '.join(pipeline) or '-'}): OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
