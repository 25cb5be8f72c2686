"""Every deployed teacher serves Prometheus metrics on a named container port and its
pods say where (the prometheus.io/* annotations); ``teacher serve --metrics-port``."""

from __future__ import annotations

import manifests
import pytest
from manifests import TARGETS


@pytest.mark.parametrize("target", list(TARGETS))
def test_teacher_pods_expose_and_announce_the_metrics_port(target):
    objects = manifests.render(target)
    deployment = manifests.find(objects, "Deployment", "teacher")
    template = deployment["spec"]["template"]
    (container,) = [c for c in template["spec"]["containers"] if c["name"] == "teacher"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    (flag,) = [a for a in container["args"] if a.startswith("--metrics-port=")]
    port = int(flag.split("=", 1)[1])
    assert ports["metrics"] == port and port not in (ports["grpc"], 50052)
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"
