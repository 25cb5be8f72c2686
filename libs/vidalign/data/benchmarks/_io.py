"""Reading benchmark files with line numbers, so every error points at a record.

``json.load`` forgets where each record started; here a JSON array is walked
element by element with ``JSONDecoder.raw_decode``, so a loader can say
``test_q.json:118: question_id: expected a string or integer, got null``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vidalign.data.benchmarks.records import MissingVideosWarning
from vidalign.errors import InvalidInput, NotFound

_DECODER = json.JSONDecoder()
_WHITESPACE = " \t\n\r"


def read_text(path: Path) -> str:
    if not path.is_file():
        raise NotFound(f"{path}: file does not exist")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise InvalidInput(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WHITESPACE:
        i += 1
    return i


def json_records(path: Path, key: str | None = None) -> list[tuple[int, Any]]:
    """(start line, element) for each element of a JSON array.

    The array is the whole document, or the value of ``key`` in a top-level
    object (SEED-Bench keeps its records under ``"questions"``). The document
    is first parsed whole, so any syntax error (a trailing comma, say) is
    reported with its line by the json module; the walk after it only finds
    where each element starts.
    """
    text = read_text(path)
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        raise InvalidInput(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if key is not None and not (isinstance(document, dict) and isinstance(document.get(key), list)):
        raise InvalidInput(f"{path}: expected a JSON object with a {key!r} array")
    if key is None and not isinstance(document, list):
        raise InvalidInput(f"{path}: expected a JSON array, got {type(document).__name__}")

    i = _skip(text, 0)
    if key is not None:
        i = _skip(text, i + 1)  # past "{"
        while True:
            name, i = _DECODER.raw_decode(text, i)
            i = _skip(text, _skip(text, i) + 1)  # past ":"
            if name == key:
                break
            _, i = _DECODER.raw_decode(text, i)
            i = _skip(text, _skip(text, i) + 1)  # past ","
    i = _skip(text, i + 1)  # past "["
    records: list[tuple[int, Any]] = []
    line, counted = 1, 0
    while text[i] != "]":
        line += text.count("\n", counted, i)
        counted = i
        value, i = _DECODER.raw_decode(text, i)
        records.append((line, value))
        i = _skip(text, i)
        if text[i] == ",":
            i = _skip(text, i + 1)
    return records


def jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, object) for each non-blank line of a JSON Lines file."""
    with _open_lines(path) as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                raise InvalidInput(f"{path}:{number}: not valid JSON ({err.msg})") from None


def _open_lines(path: Path):
    if not path.is_file():
        raise NotFound(f"{path}: file does not exist")
    return path.open(encoding="utf-8-sig")


def array_or_lines(path: Path) -> list[tuple[int, Any]]:
    """Records of a file that is either one JSON array or JSON Lines."""
    head = read_text(path).lstrip()
    return json_records(path) if head.startswith("[") else list(jsonl_records(path))


def need(record: Any, name: str, kinds: type | tuple[type, ...], where: str) -> Any:
    """``record[name]``, checked to be one of ``kinds``; ``where`` is ``"file:line"`` (+ context)."""
    if not isinstance(record, dict):
        raise InvalidInput(f"{where}: expected a JSON object, got {type(record).__name__}")
    if name not in record:
        raise InvalidInput(f"{where}: missing field {name!r}")
    value = record[name]
    if not isinstance(value, kinds) or isinstance(value, bool):
        names = " or ".join(k.__name__ for k in (kinds if isinstance(kinds, tuple) else (kinds,)))
        raise InvalidInput(f"{where}: {name}: expected {names}, got {json.dumps(value)[:80]}")
    return value


def text_field(record: Any, name: str, where: str) -> str:
    """A non-empty string field; ids may be integers in some releases."""
    value = need(record, name, (str, int), where)
    if isinstance(value, str) and not value.strip():
        raise InvalidInput(f"{where}: {name}: expected a non-empty string")
    return str(value)


def string_list(record: Any, name: str, where: str, minimum: int = 2) -> list[str]:
    value = need(record, name, list, where)
    if len(value) < minimum or not all(isinstance(v, str) and v.strip() for v in value):
        raise InvalidInput(
            f"{where}: {name}: expected a list of at least {minimum} non-empty strings, "
            f"got {json.dumps(value)[:120]}"
        )
    return value


def video_root(path: Path, video_dir: str | Path | None) -> Path:
    """Where a set's relative video paths resolve: ``video_dir``, by default the directory of
    the annotation file ``path``."""
    return Path(video_dir) if video_dir is not None else path.parent


class VideoIndex:
    """Resolves video paths and remembers which ones do not exist."""

    def __init__(self) -> None:
        self._seen: dict[Path, bool] = {}

    def check(self, path: Path) -> Path:
        if path not in self._seen:
            self._seen[path] = path.is_file()
        return path

    @property
    def missing(self) -> list[Path]:
        return [p for p, exists in self._seen.items() if not exists]

    def warn(self, name: str, source: Path) -> list[Path]:
        """The missing list, after a warning that names a few of them."""
        missing = self.missing
        if missing:
            shown = ", ".join(str(p) for p in missing[:3])
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            warnings.warn(
                f"{name} ({source}): {len(missing)} of {len(self._seen)} videos are missing: "
                f"{shown}{more}; the loaded set's .missing lists them",
                MissingVideosWarning,
                stacklevel=3,
            )
        return missing
