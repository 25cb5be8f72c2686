"""An OpenAI-compatible chat-completions client: the LLM behind judges and caption rewriting.

``POST {base_url}/chat/completions`` with the standard library only. Timeouts,
HTTP 429 and 5xx, and replies the caller cannot parse are retried, up to
``max_attempts`` in all, ``backoff`` seconds apart, doubling; other HTTP
errors (a refused key, an unknown model) fail at once. The key is sent only
in the Authorization header: it is in no ``repr``, log line or message.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from vidalign.errors import InvalidInput, Unavailable
from vidalign.log import get_logger

log = get_logger("vidalign.llm")

T = TypeVar("T")


class _Retry(Exception):
    """A failure worth another attempt: a timeout, 429, 5xx or a reply we cannot parse."""


@dataclass
class ChatClient:
    base_url: str
    """Including the API version, e.g. ``https://api.openai.com/v1``."""
    model: str
    api_key: str = field(repr=False)
    timeout: float = 60.0
    max_attempts: int = 4
    backoff: float = 1.0
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise InvalidInput(f"max_attempts: expected >= 1, got {self.max_attempts}")
        if not self.base_url.startswith(("http://", "https://")):
            raise InvalidInput(f"base_url: expected an http(s) URL, got {self.base_url!r}")

    @classmethod
    def env_values(cls, prefix: str) -> dict[str, str]:
        """``base_url``, ``model``, ``api_key`` from ``{prefix}_BASE_URL``, ``_MODEL``, ``_API_KEY``."""
        values = {}
        for name, suffix in (("base_url", "BASE_URL"), ("model", "MODEL"), ("api_key", "API_KEY")):
            value = os.environ.get(f"{prefix}_{suffix}", "")
            if not value:
                raise InvalidInput(f"environment variable {prefix}_{suffix} is not set")
            values[name] = value
        return values

    def ask(self, messages: list[dict[str, str]], parse: Callable[[str], T], what: str) -> T:
        """The parsed reply; ``parse`` raises InvalidInput on a reply worth asking again."""
        problem = ""
        for attempt in range(self.max_attempts):
            if attempt:
                delay = self.backoff * 2 ** (attempt - 1)
                log.warning("llm_retry", what=what, attempt=attempt + 1, delay_s=delay, problem=problem)
                self.sleep(delay)
            try:
                reply = self._complete(messages)  # refusals raise InvalidInput through here
            except _Retry as err:
                problem = str(err)
                continue
            try:
                return parse(reply)
            except InvalidInput as err:
                problem = str(err)
        raise Unavailable(f"{what}: no usable reply after {self.max_attempts} attempts; last: {problem}")

    def _complete(self, messages: list[dict[str, str]]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0}).encode()
        request = urllib.request.Request(
            self.base_url.rstrip("/") + "/chat/completions",
            data=body,
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.api_key}"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as err:
            if err.code == 429 or err.code >= 500:
                raise _Retry(f"HTTP {err.code} from {self.base_url}") from None
            raise InvalidInput(
                f"HTTP {err.code} from {self.base_url} for model {self.model!r} "
                "(check the model name and the API key)"
            ) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
            reason = getattr(err, "reason", err)
            raise _Retry(f"cannot reach {self.base_url}: {reason}") from None
        try:
            return json.loads(payload)["choices"][0]["message"]["content"]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError):
            raise _Retry(f"not a chat-completions reply: {payload[:200]!r}") from None
