"""``vidalign teacher serve``'s limit flags (and ``--metrics-port``, ``--max-batch``,
``--max-wait-ms``) and their range checks.

Kept apart from ``vidalign_teacher.limits`` so that building the CLI's parser
imports neither grpc nor torch. Each flag out of its range is a one-line error
naming the flag (exit status 2), before anything starts.
"""

from __future__ import annotations

import argparse
from typing import Any

from vidalign.config import ConfigError

MIB = 1 << 20


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-concurrent-rpcs", type=int, default=8, metavar="N",
                        help="model calls admitted at once (reading, waiting, computing)")
    parser.add_argument("--max-queued", type=int, default=16, metavar="N",
                        help="model calls waiting for a slot; beyond: RESOURCE_EXHAUSTED at once")
    parser.add_argument("--max-inflight-mb", type=float, default=2048, metavar="MIB",
                        help="request bytes all calls together may hold, counted as they arrive")
    parser.add_argument("--stream-idle-timeout-s", type=float, default=30.0, metavar="S",
                        help="cancel a model call whose client sends nothing for this long")
    parser.add_argument("--request-read-timeout-s", type=float, default=300.0, metavar="S",
                        help="cancel a model call whose request is still arriving this long "
                             "after it was admitted (a slow sender)")
    parser.add_argument("--max-batch", type=int, default=1, metavar="N",
                        help="dynamic batching: join concurrent DenoisingLoss calls with "
                             "compatible shapes into one model run of up to N samples; 1: off "
                             "(helps where one call's batch leaves the device underused)")
    parser.add_argument("--max-wait-ms", type=float, default=10.0, metavar="MS",
                        help="with --max-batch > 1: longest wait for other calls to join a "
                             "batch (less once it is full); 0: only those already queued")
    parser.add_argument("--metrics-port", type=int, default=0, metavar="PORT",
                        help="serve Prometheus metrics over HTTP at PORT/metrics; 0: off")


def _check(flag: str, value: float, low: float, high: float | None = None, *, open_low: bool = False) -> None:
    bad = value <= low if open_low else value < low
    if bad or (high is not None and value > high) or value != value:  # NaN too
        if high is not None:
            want = f"within {low:g}..{high:g}"
        else:
            want = f"greater than {low:g}" if open_low else f"at least {low:g}"
        raise ConfigError(f"{flag} must be {want}, got {value:g}")


def limit_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Check every ranged flag of ``teacher serve``; the ServerConfig fields of the new ones."""
    _check("--port", args.port, 0, 65535)
    _check("--metrics-port", args.metrics_port, 0, 65535)
    # -1: no health port; 0: a free one (gRPC would bind 99999 modulo 65536, and take -2 as none).
    _check("--health-port", args.health_port, -1, 65535)
    _check("--workers", args.workers, 1, 1024)
    _check("--max-message-mb", args.max_message_mb, 2, 2047)
    _check("--max-request-mb", args.max_request_mb, 0, open_low=True)
    _check("--max-inflight-mb", args.max_inflight_mb, 0, open_low=True)
    _check("--max-concurrent-rpcs", args.max_concurrent_rpcs, 1, 1024)
    _check("--max-queued", args.max_queued, 0, 4096)
    _check("--stream-idle-timeout-s", args.stream_idle_timeout_s, 0, open_low=True)
    _check("--request-read-timeout-s", args.request_read_timeout_s, 0, open_low=True)
    _check("--max-batch", args.max_batch, 1, 4096)
    _check("--max-wait-ms", args.max_wait_ms, 0, 10_000)
    if args.max_inflight_mb < args.max_request_mb:
        raise ConfigError(
            f"--max-inflight-mb ({args.max_inflight_mb:g}) must be at least --max-request-mb "
            f"({args.max_request_mb:g}): a request of the largest size could never be read"
        )
    return {
        "max_concurrent_rpcs": args.max_concurrent_rpcs,
        "max_queued": args.max_queued,
        "max_inflight_bytes": int(args.max_inflight_mb * MIB),
        "stream_idle_timeout_s": args.stream_idle_timeout_s,
        "request_read_timeout_s": args.request_read_timeout_s,
        "metrics_port": args.metrics_port,
        "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms,
    }
