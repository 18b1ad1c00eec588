"""What the data tools share: one-line errors (exit 2, no traceback) and reading a jsonl document's texts."""
import argparse
import json
import sys
from typing import Callable


class InputError(Exception):
    """Bad input or options; a tool reports it as one `error: ...` line and exits with status 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are InputError (one line) instead of usage text + exit."""

    def error(self, message: str):
        raise InputError(message)


def document_texts(raw: bytes, lineno: int, keys: list[str]) -> list[str] | None:
    """The texts under `keys` of one jsonl line; None for a blank line; InputError naming the line."""
    if not raw.strip():
        return None
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise InputError(f"line {lineno}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise InputError(f"line {lineno}: expected a JSON object, got {type(doc).__name__}")
    texts = []
    for key in keys:
        text = doc.get(key)
        if not isinstance(text, str):
            kind = "missing" if text is None else type(text).__name__
            raise InputError(f"line {lineno}: key {key!r} is {kind}, expected a string")
        texts.append(text)
    return texts


def run_tool(body: Callable[[list[str] | None], None], argv: list[str] | None = None,
             expected: tuple[type[BaseException], ...] = ()) -> int:
    """Run a tool's body; InputError, OSError and `expected` errors become `error: ...` and status 2."""
    try:
        body(argv)
    except (InputError, OSError, *expected) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
