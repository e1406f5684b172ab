"""Secrets out of every line we print or write: URL credentials and query strings, redacted in one place.

A user-supplied location (`cache.location`, `cache.remote_copies`, `run_dir`, `data.root`, `--run`,
`$CACHETRAIN_DATA`, `$AWS_ENDPOINT_URL`) may carry a secret: `s3://KEY:SECRET@bucket/prefix`, or a
query string such as `?aws_secret_access_key=...`. `redact(text)` replaces, in any text, the credentials
of a URL (everything between `scheme://` and the last `@`) and its query string and fragment (from the
first `?` or `#`) with `***`; also a query string (`?name=value`) after a plain path, and `user:pass@`
without a scheme.

It works on words (split at white space and quotes), so it finds a location inside an error line, a repr,
a list or a `--set key=value`, and it errs on the side of hiding: a key with an `@` in it loses what comes
before the `@`. AWS secret keys contain `/` and `+`, so a URL's credentials are not assumed to end at its
first `/`.

Used by every user error (`cachetrain/errors.py`: their messages are redacted when raised), by the config
checks that refuse a secret in any string value (`cachetrain/config.py`), and by the object-store errors
(`cachetrain/cache/location.py`); the command line redacts every line it prints as an error.
"""

from __future__ import annotations

import re

MASK = "***"

_WORD = re.compile(r"[^\s'\"`]+")  # a location inside a message: no white space, no quotes
# scheme:/ or scheme:// (pathlib folds "s3://x" into "s3:/x"), anywhere in the word ("key=s3://...")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:/+")
_QUERY = re.compile(r"\?[^?]*=")  # a query string after a plain path: '?name=value'


def redact(text: str) -> str:
    """`text` with the credentials and query strings of any location in it replaced by `***`."""
    if "@" not in text and "?" not in text and "#" not in text:  # the common case, without a regex
        return text
    return _WORD.sub(lambda m: _redact_word(m.group(0)), text)


def has_secret(text: str) -> bool:
    """Whether `text` holds URL credentials or a query string (which `redact` would hide)."""
    return redact(text) != text


def _redact_word(word: str) -> str:
    scheme = _SCHEME.search(word)
    if scheme is not None:
        head, rest = word[:scheme.end()], word[scheme.end():]
        if "@" in rest:  # user:password@host, the password possibly holding '/', '?', '#' or ':'
            rest = MASK + rest[rest.rindex("@"):]
        cut = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=-1)
        if cut >= 0:
            rest = rest[:cut + 1] + MASK
        return head + rest
    if "@" in word:  # KEY:SECRET@bucket without a scheme; the value of a key=value word
        before, at, after = word.rpartition("@")
        start = before.rfind("=") + 1
        if ":" in before[start:]:
            word = word[:start] + MASK + at + after
    query = _QUERY.search(word)
    if query is not None:
        word = word[:query.start() + 1] + MASK
    return word
