"""What may be recorded or printed of a location: no credential ever leaves the process.

Caches, student folders and dataset cards are shared, and logs are read by others; what they record
of a storage location must be safe to publish. Two rules, both allow-lists, so a credential under a
name nobody foresaw (a token, a session key, an SSE key) is hidden too:

- storage options (`--storage-option`, a config's `storage_options:`): a value is kept only under
  a key known to be harmless (`SAFE_OPTION_KEYS`: where the store is and how to reach it); every other
  value becomes `REDACTED`. Nested mappings (`client_kwargs`, `config_kwargs`) follow the same rule.
- other option mappings (`--engine-arg`, `--hf-arg`), mostly harmless tuning, drop the values of keys
  that name a credential (`hf_token`, `hub_token`, `api_key`, ...: `is_credential_key`).
- URLs: the user info (`user:password@`) becomes `REDACTED@`, and so does every query value except a
  few harmless keys (`SAFE_QUERY_KEYS`), since pre-signed URLs carry their signature there.

    redact_url("https://me:pw@host/data.jsonl")      # 'https://<redacted>@host/data.jsonl'
    redact_options({"key": "AKIA...", "endpoint_url": "http://minio:9000"})
    # {'key': '<redacted>', 'endpoint_url': 'http://minio:9000'}
    redact_text("cannot open s3://k:s@bucket/x: timed out")   # every URL in a message
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote, urlencode

__all__ = ["REDACTED", "SAFE_OPTION_KEYS", "credentials_in", "is_credential_key", "redact_options", "redact_text",
           "redact_url"]

REDACTED = "<redacted>"

# fsspec / s3fs / gcsfs / adlfs / botocore keys that say where a store is and how to talk to it, never
# who you are. Anything else (key, secret, token, password, session tokens, SSE keys, ...) is hidden.
SAFE_OPTION_KEYS = frozenset({
    "endpoint_url", "region_name", "anon", "use_ssl", "verify", "requester_pays", "version_aware",
    "client_kwargs", "config_kwargs", "signature_version", "s3", "addressing_style", "retries", "max_attempts",
    "attempts", "total_max_attempts",
    "connect_timeout", "read_timeout", "timeout", "max_pool_connections",
    "default_block_size", "default_fill_cache", "default_cache_type", "block_size", "cache_type",
    "use_listings_cache", "listings_expiry_time", "skip_instance_cache", "max_concurrency",
    "project", "account_name", "requests_timeout",
})
SAFE_QUERY_KEYS = frozenset({"download", "revision", "version", "versionId", "split", "format"})

# Words of an option name that mark a credential; `max_num_batched_tokens` (plural) is not one.
_CREDENTIAL_WORDS = frozenset({"token", "secret", "password", "passwd", "credential", "credentials", "apikey", "auth",
                               "authorization", "sas"})
_CREDENTIAL_KEYS = ("api_key", "access_key", "private_key", "account_key", "session_key")

# scheme://[userinfo@]rest, up to whitespace or a quote: what a message can quote of a location.
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^/?#]*@)")


def redact_url(url: str) -> str:
    """`url` with its user info and query values (but `SAFE_QUERY_KEYS`') replaced by `REDACTED`;
    a plain path comes back unchanged."""
    if "://" not in url:
        return url
    url = _USERINFO.sub(lambda m: m.group(1) + REDACTED + "@", url)
    base, sep, rest = url.partition("?")
    if not sep:
        return url
    query, hash_sep, fragment = rest.partition("#")
    pairs = [(k, v if k in SAFE_QUERY_KEYS else REDACTED) for k, v in parse_qsl(query, keep_blank_values=True)]
    return base + "?" + urlencode(pairs, safe="<>") + hash_sep + fragment


def redact_options(options: dict | None) -> dict | None:
    """A copy of fsspec storage options that is safe to record: values under `SAFE_OPTION_KEYS` kept
    (nested mappings and URLs redacted in turn), every other value `REDACTED`."""
    if options is None:
        return None
    return {key: _safe_value(value) if key in SAFE_OPTION_KEYS else REDACTED for key, value in options.items()}


def _safe_value(value):
    if isinstance(value, dict):
        return redact_options(value)
    if isinstance(value, str):
        return redact_url(value)
    if isinstance(value, (list, tuple)):
        return [_safe_value(v) for v in value]
    return value


def is_credential_key(name: str) -> bool:
    """Whether an option named `name` holds a credential (`hf_token`, `hub_token`, `api_key`, `password`)."""
    name = name.lower().replace("-", "_")
    return bool(set(name.split("_")) & _CREDENTIAL_WORDS) or name.endswith(_CREDENTIAL_KEYS)


def redact_text(text: str) -> str:
    """`text` (an error message, a progress line) with every URL in it redacted."""
    return _URL.sub(lambda m: redact_url(m.group(0)), text)


def credentials_in(argv: list[str], storage_options: dict | None = None) -> set[str]:
    """The credentials a command line carries: the user info of its URLs (whole, and user and password
    apart) and the storage options' values outside the allow-list. A message that quotes one outside a
    URL (a client's "Invalid bucket name 'key:secret@bucket'") is cleaned of them by the CLI."""
    found = set()
    for arg in argv:
        for url in _URL.findall(arg):
            m = _USERINFO.match(url)
            if m:
                info = m.group(2)[:-1]
                found.update({info, *map(unquote, info.split(":", 1))})
    for key, value in _flatten(storage_options or {}):
        if key not in SAFE_OPTION_KEYS and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            found.add(str(value))  # a YAML-read value may be a number
    return {s for s in found if len(s) >= 4}  # shorter ones would blank out ordinary words


def _flatten(options: dict):
    for key, value in options.items():
        if isinstance(value, dict):
            yield from _flatten(value)
        else:
            yield key, value

