"""What may travel and what may be shown: credentials stay out of job specs, logs, MLflow
params, checkpoints and exported files.

Ray's job API returns a job's runtime env unredacted to anyone who can reach the dashboard,
so the launchers pass S3 and MLflow *settings* to the workers (endpoint, region, tracking
URI) and credentials only when asked to; on a cluster the instance role serves S3.
"""
from __future__ import annotations

import os
import re

PASSED_PREFIXES = ("AWS_", "MLFLOW_")
SECRET_WORDS = ("SECRET", "TOKEN", "PASSWORD", "ACCESS_KEY", "CREDENTIAL")
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^/@:\s]*):(?P<password>[^/@\s]+)@")


def redact(text: str) -> str:
    """``scheme://user:password@host`` -> ``scheme://user:***@host``, anywhere in ``text``."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)


def is_secret(name: str, value: str) -> bool:
    return any(w in name.upper() for w in SECRET_WORDS) or redact(value) != value


def forwarded_env(credentials: bool = False, environ: dict | None = None) -> dict[str, str]:
    """The ``AWS_*`` / ``MLFLOW_*`` variables to give a job or its workers: settings always,
    credentials (keys, tokens, passwords, a URI with a password) only when ``credentials``."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items()
            if k.startswith(PASSED_PREFIXES) and (credentials or not is_secret(k, v))}


def redact_tree(tree):
    """A config dict (or any nesting of dicts, lists and strings) with every URI's password hidden."""
    if isinstance(tree, dict):
        return {k: redact_tree(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(redact_tree(v) for v in tree)
    return redact(tree) if isinstance(tree, str) else tree


def split_userinfo(uri: str) -> tuple[str, str, str]:
    """(URI without ``user:password@``, user, password), the last two percent-decoded."""
    from urllib.parse import unquote

    m = _USERINFO.search(uri)
    if not m or not uri.startswith(m.group(0)):
        return uri, "", ""
    return m["scheme"] + uri[m.end():], unquote(m["user"]), unquote(m["password"])
