"""Secrets out of everything the project records about its settings.

Settings travel into manifests, checkpoints, MLflow params and artifacts, metrics files,
logs and Ray job metadata. :func:`redact` is applied to every such record: values of keys
that name a credential (``secret``, ``token``, ``password``, ``key`` of fsspec storage
options, ...) and the credential-bearing parts of URLs (``user:password@``, pre-signed
``X-Amz-*`` or ``token=`` query parameters) are replaced by :data:`REDACTED`.
:func:`public` gives a stage's options in that form, and :func:`flatten` names them by
their params.yaml keys, as MLflow's parameters and DVC's comparisons show them.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDACTED = "***"

_SECRET_KEY = re.compile(
    r"(^key$|^secret$|secret|passw|token|credential|access_key|api_?key|private|signature"
    r"|^auth|session)",
    re.IGNORECASE,
)
_SECRET_QUERY = re.compile(
    r"(^x-amz-(signature|credential|security-token)$|^x-goog-(signature|credential)$|token"
    r"|^sig$|signature|passw|secret|^key$|api_?key|credential|^code$)",
    re.IGNORECASE,
)
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def is_secret_key(name: str) -> bool:
    return bool(_SECRET_KEY.search(str(name)))


def redact_url(url: str) -> str:
    """``url`` without a password in its authority or credential-bearing query values."""
    if not _URL.match(url):
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:{REDACTED}@{host}" if ":" in userinfo else f"{REDACTED}@{host}"
    query = parts.query
    pairs = parse_qsl(query, keep_blank_values=True) if query else []
    if any(_SECRET_QUERY.search(k) for k, _ in pairs):
        query = urlencode(
            [(k, REDACTED if _SECRET_QUERY.search(k) else v) for k, v in pairs], safe="*"
        )
    if netloc == parts.netloc and query == parts.query:
        return url  # nothing to hide: unchanged (urlunsplit would drop "////" of sqlite)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """Free text (a log line, an error message) with every URL in it redacted."""
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), str(text))


def public_env(environ: dict[str, str], prefixes: tuple[str, ...], names=()) -> dict[str, str]:
    """The variables of ``environ`` that start with ``prefixes`` (or are in ``names``),
    without those that hold a credential (``AWS_SECRET_ACCESS_KEY``, ``..._TOKEN``, ...):
    what may be handed to jobs and workers, whose settings Ray records. Credentials reach
    them through the nodes' own environment (instance roles, secrets mounted as
    variables)."""
    return {
        k: redact_url(v)
        for k, v in environ.items()
        if (k.startswith(prefixes) or k in names) and not is_secret_key(k)
    }


def secret_keys(value: Any, prefix: str = "") -> list[str]:
    """The dotted keys of ``value`` whose values :func:`redact` would hide."""
    found: list[str] = []
    if isinstance(value, dict):
        for k, v in value.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if is_secret_key(k) and v not in (None, "", {}):
                found.append(key)
            else:
                found += secret_keys(v, key)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found += secret_keys(v, f"{prefix}[{i}]")
    elif isinstance(value, str) and redact_url(value) != value:
        found.append(prefix)
    return found


def redact(value: Any) -> Any:
    """A copy of ``value`` (nested dicts, lists, strings) with every secret replaced."""
    if isinstance(value, dict):
        return {
            k: (REDACTED if is_secret_key(k) and v not in (None, "", {}) else redact(v))
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    if isinstance(value, str):
        return redact_url(value)
    return value


def public(options: Any) -> dict:
    """The resolved options as plain, secret-free data (for --dry-run, logs and MLflow)."""
    plain = dataclasses.asdict(options) if dataclasses.is_dataclass(options) else options
    return redact(json.loads(json.dumps(plain, default=str)))


def flatten(d: Mapping, prefix: str = "") -> dict[str, str]:
    """Nested settings -> {"train.model.base_width": "16"}: the params.yaml keys as DVC
    names them. Tables keyed by resolution stay one JSON value."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v and not all(isinstance(x, int) for x in v):
            out.update(flatten(v, f"{key}."))
        elif isinstance(v, (list, tuple, dict)):
            out[key] = json.dumps({str(a): b for a, b in v.items()} if isinstance(v, dict) else v)
        else:
            out[key] = str(v)
    return out
