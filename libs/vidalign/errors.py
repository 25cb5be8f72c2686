"""Domain errors shared by the libraries and the services.

Libraries raise these; the teacher service maps each class to one gRPC status
code (see ``vidalign_teacher.errors``), so a caller gets a message a person can
act on instead of a stack trace. The message must say what was wrong and what
was expected, e.g. ``"features: expected 3 dims (B, T, d_v), got shape (4, 32)"``.
"""


class VidalignError(Exception):
    """Base class of every error vidalign raises on purpose."""


class InvalidInput(VidalignError, ValueError):
    """The caller sent something malformed: wrong shape, dtype, NaN, bad value."""


class NotFound(VidalignError, LookupError):
    """A named thing (model, adapter, artifact) does not exist here."""


class ResourceExhausted(VidalignError):
    """The request is larger than a configured limit."""


class Unavailable(VidalignError):
    """The service cannot answer now (still loading, shutting down, unreachable)."""


class FailedPrecondition(VidalignError):
    """The service cannot answer this kind of request as configured (e.g. an RPC
    that the hosted model family does not support)."""


class Unauthenticated(VidalignError):
    """A server rejected the credentials (the message never includes them)."""


def require_finite(name: str, tensor) -> None:
    """InvalidInput naming ``name`` when ``tensor`` holds NaN or Inf."""
    import torch

    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise InvalidInput(f"{name}: {bad} of {tensor.numel()} values are NaN or Inf")
