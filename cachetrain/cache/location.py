"""Where a cache store lives: a local folder (a `pathlib.Path`) or an object store (`RemotePath`).

`cache.location` may be an fsspec URL, `s3://bucket/prefix` (the `cachetrain[s3]` extra: s3fs), so a
run's caches can live on S3-compatible storage while its checkpoints stay local. A `RemotePath` offers
the few pathlib methods the cache code uses on a store (`/`, `name`, `exists`, `is_file`, `read_bytes`,
`write_bytes`, `unlink`), so that code reads the same for both; what differs is said where it differs:
- local chunk files are memory-mapped, fadvised and fsynced; objects are read whole with one GET each
  (several in flight: cachetrain/cache/feeds.py `ReadFeed`) and written whole with one PUT each, which
  an object store applies atomically: an object is there in full or not at all, so nothing is fsynced;
- presence and sizes of a store's chunks come from one listing (`sizes`), not a stat per chunk;
- zarr reaches objects through its `FsspecStore` (`zarr_store`).

Credentials and the endpoint come from the standard environment only (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION), never
from the config, and are never printed: a URL with credentials in it is refused. A dropped connection,
a timeout, a throttle or a 5xx is retried by botocore's "standard" mode with exponential backoff,
AWS_MAX_ATTEMPTS attempts in all (default `ATTEMPTS`); after the last, the operation fails with one
line naming the object and the reason (`remote_errors`).
"""

from __future__ import annotations

import atexit
import functools
import os
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Iterator

from cachetrain.errors import CacheError

ATTEMPTS = 5  # per request, the first included, unless AWS_MAX_ATTEMPTS says otherwise
CONNECT_TIMEOUT_S, READ_TIMEOUT_S = 10, 30


def location(text: str | os.PathLike) -> Path | RemotePath:
    """A store's (or a cache folder's) location from the config or the command line: a URL with a scheme
    other than file:// is remote; anything else is a local path."""
    if isinstance(text, (Path, RemotePath)):
        return text
    text = str(text)
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    if "://" in text:
        return RemotePath(text)
    return Path(text)


def is_remote(path: Path | RemotePath) -> bool:
    return isinstance(path, RemotePath)


def zarr_store(path: Path | RemotePath, read_only: bool = False):
    """What zarr opens for a store folder (or one of its arrays): the local path, or an FsspecStore on the
    same (configured) file system as every other access to that object store."""
    if not isinstance(path, RemotePath):
        return str(path)
    from zarr.storage import FsspecStore
    return FsspecStore(_filesystem(path.scheme, asynchronous=True), path=path.key, read_only=read_only)


def remove_tree(path: Path | RemotePath) -> None:
    """Delete a store folder and everything in it (a store being rebuilt)."""
    if isinstance(path, RemotePath):
        path.rmtree()
    elif path.exists():
        import shutil
        shutil.rmtree(path)


@functools.cache
def _filesystem(scheme: str, asynchronous: bool = False):
    """The fsspec file system for a scheme, one per process (and per mode: zarr needs the asynchronous one).
    Listings are never cached: another rank or a repair may have changed the store since."""
    if scheme == "s3":
        try:
            import s3fs
        except ImportError:
            raise CacheError("s3:// cache locations need s3fs: pip install 'cachetrain[s3]'") from None
        attempts = int(os.environ.get("AWS_MAX_ATTEMPTS", ATTEMPTS))
        fs = s3fs.S3FileSystem(
            asynchronous=asynchronous, use_listings_cache=False, skip_instance_cache=True,
            # total_max_attempts counts the first try; botocore's max_attempts would count only the retries
            config_kwargs={"retries": {"total_max_attempts": attempts, "mode": "standard"},
                           "connect_timeout": CONNECT_TIMEOUT_S, "read_timeout": READ_TIMEOUT_S})
        # botocore's attempts are the only ones: s3fs's own loop (5 by default) around each of them
        # multiplied them (15 connections and 27 s where 2 attempts of 1 s were asked, by hand)
        fs.retries = 1
        if asynchronous:
            atexit.register(_close_async, fs)
        return fs
    import fsspec
    try:
        return fsspec.filesystem(scheme, asynchronous=asynchronous) if asynchronous else fsspec.filesystem(scheme)
    except (ImportError, ValueError) as e:
        raise CacheError(f"{scheme}:// cache locations are not supported here ({_one_line(e)})") from None


def _close_async(fs) -> None:
    """Close the connection pool of zarr's (asynchronous) file system on zarr's event loop, before that loop
    stops: left open, aiohttp prints "Unclosed client session" as the process exits. Sync instances close
    their own (s3fs registers that)."""
    client = getattr(fs, "_s3", None)
    if client is None:
        return
    try:
        from zarr.core.sync import sync
        sync(client.__aexit__(None, None, None))
    except Exception:  # noqa: BLE001 - at exit, a pool that cannot be closed is no one's problem
        pass


def _one_line(e: BaseException) -> str:
    """The error's text on one line, all of it up to 240 characters: botocore puts the reason on the line
    after "Parameter validation failed:"."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 240 else text[:237] + "..."


# what botocore raises before any request is sent, or for a request no retry can change: nothing was retried
_NOT_RETRIED = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError", "ParamValidationError",
                "NoRegionError", "InvalidRegionError", "ProfileNotFound", "InvalidConfigError",
                "UnknownSignatureVersionError", "InvalidS3AddressingStyleError"}
_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError", "ProfileNotFound"}


def _retried(e: BaseException) -> bool:
    """Whether botocore's standard mode retried `e` (a connection error, a timeout, a throttle, a 5xx)."""
    if isinstance(e, (PermissionError, ValueError)):  # s3fs: 403 -> PermissionError, a bad argument -> ValueError
        return False
    return type(e).__name__ not in _NOT_RETRIED


def is_transport_error(e: BaseException) -> bool:
    """Whether `e`, raised while talking to an object store, is about the conversation (a connection, a
    timeout, a 5xx, access denied), not about what the store holds: such an error must never make a store
    look absent, stale or corrupt, which would have it deleted or rebuilt. A missing object is not one."""
    if isinstance(e, FileNotFoundError):
        return False
    if isinstance(e, (OSError, TimeoutError)):  # s3fs maps botocore's errors to OSError (PermissionError, EIO, ...)
        return True
    return type(e).__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec")


def transport_failure(e: BaseException, url: str, what: str) -> CacheError:
    """The one line for a transport error (after botocore's retries), naming the object and what was done."""
    if isinstance(e, PermissionError):
        return CacheError(f"{url}: {what}: access denied ({_one_line(e)}); credentials come from the AWS_* "
                          f"environment variables")
    if type(e).__name__ in _CREDENTIALS:
        return CacheError(f"{url}: {what} failed ({type(e).__name__}: {_one_line(e)}); credentials come from the "
                          f"AWS_* environment variables (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
                          f"AWS_PROFILE); nothing was changed")
    if not _retried(e):  # a retry could not change it: saying "retried" would send the user after the network
        return CacheError(f"{url}: {what} failed ({type(e).__name__}: {_one_line(e)}); nothing was changed")
    attempts = os.environ.get("AWS_MAX_ATTEMPTS", ATTEMPTS)
    return CacheError(f"{url}: {what} failed ({type(e).__name__}: {_one_line(e)}); connection errors, timeouts "
                      f"and 5xx are retried, {attempts} attempts in all (AWS_MAX_ATTEMPTS); nothing was changed "
                      f"because of it")


def raise_if_transport(e: BaseException, path, what: str) -> None:
    """Re-raise `e` as one line when `path` is remote and `e` a transport error; otherwise return."""
    if isinstance(path, RemotePath) and is_transport_error(e):
        raise transport_failure(e, str(path), what) from None


@contextmanager
def remote_errors(what: str, url: str) -> Iterator[None]:
    """Turn what an object store raised after its retries into one line naming the object. A missing
    object stays FileNotFoundError: callers name what is missing in their own words."""
    try:
        yield
    except FileNotFoundError:
        raise
    except CacheError:
        raise
    except Exception as e:  # noqa: BLE001 - botocore's and aiohttp's errors have no common base
        if isinstance(e, MemoryError):
            raise
        raise transport_failure(e, url, what) from None


class RemotePath:
    """An object-store location, `scheme://bucket/key`, with the pathlib methods the cache code uses.
    Pickles as its URL (a worker process makes its own connection)."""

    def __init__(self, url: str):
        scheme, sep, rest = url.partition("://")
        netloc = rest.split("/", 1)[0]
        if "@" in netloc:
            raise CacheError(f"{scheme}://...@{netloc.split('@')[-1]}: credentials do not belong in a cache "
                             f"location; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY instead")
        if not sep or not netloc or "?" in rest or "#" in rest or ".." in rest.split("/"):
            raise CacheError(f"{url}: expected scheme://bucket/prefix (no '?', '#' or '..')")
        self.scheme = scheme
        self.key = "/".join(part for part in rest.split("/") if part)  # bucket/prefix, no empty parts

    # -- naming ------------------------------------------------------------------------------------------
    def __str__(self) -> str:
        return f"{self.scheme}://{self.key}"

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __reduce__(self):
        return RemotePath, (str(self),)

    def __truediv__(self, part: str | os.PathLike) -> RemotePath:
        """A key below this one (a relative path; '/'-separated parts are fine, '..' is refused)."""
        part = str(part)
        if part.startswith("/") or ".." in part.split("/") or "?" in part or "#" in part:
            raise CacheError(f"{self}: {part!r} is not a key below it")
        return RemotePath(f"{self}/{part}")

    @property
    def name(self) -> str:
        return PurePosixPath(self.key).name

    @property
    def parent(self) -> RemotePath:
        if "/" not in self.key:
            raise CacheError(f"{self}: a bucket has no parent")
        return RemotePath(f"{self.scheme}://{self.key.rsplit('/', 1)[0]}")

    @property
    def bucket(self) -> str:
        return self.key.split("/", 1)[0]

    def resolve(self) -> RemotePath:
        return self

    def relative_to(self, other: RemotePath) -> PurePosixPath:
        return PurePosixPath(self.key).relative_to(other.key)

    @property
    def fs(self):
        return _filesystem(self.scheme)

    # -- reading ------------------------------------------------------------------------------------------
    def exists(self) -> bool:
        """An object, or a folder (a prefix some object has)."""
        with remote_errors("looking it up", str(self)):
            return self.fs.exists(self.key)

    def is_file(self) -> bool:
        with remote_errors("looking it up", str(self)):
            return self.fs.isfile(self.key)

    def read_bytes(self, start: int | None = None, end: int | None = None) -> bytes:
        """The object, or bytes [start, end) of it (start < 0: the last -start bytes): one GET."""
        with remote_errors("reading it", str(self)):
            return self.fs.cat_file(self.key, start=start, end=end)

    def sizes(self) -> dict[str, int]:
        """{key below this folder: size} of every object under it, from one listing (paged by the store)."""
        with remote_errors("listing it", str(self)):
            found = self.fs.find(self.key, detail=True)
        return {k[len(self.key) + 1:]: int(v["size"]) for k, v in found.items() if k.startswith(self.key + "/")}

    def tails(self, files: list[RemotePath], n: int) -> list[bytes | None]:
        """The last n bytes of each file (None: missing), the requests in flight together."""
        with remote_errors("reading checksums", str(self)):
            got = self.fs.cat_ranges([f.key for f in files], [-n] * len(files), [None] * len(files),
                                     on_error="return")
        for f, g in zip(files, got):  # a missing object is None; any other failure is not "missing"
            if isinstance(g, BaseException) and not isinstance(g, FileNotFoundError):
                raise transport_failure(g, str(f), "reading its checksum")
        return [None if isinstance(g, BaseException) else g for g in got]

    # -- writing ------------------------------------------------------------------------------------------
    def write_bytes(self, data: bytes) -> None:
        with remote_errors("writing it", str(self)):
            self.fs.pipe_file(self.key, data)

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            with remote_errors("deleting it", str(self)):
                self.fs.rm_file(self.key)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def rmtree(self) -> None:
        with remote_errors("deleting it", str(self)):
            if self.fs.exists(self.key):
                self.fs.rm(self.key, recursive=True)

    def check_bucket(self, write: bool) -> None:
        """Before any work: a missing bucket, or one these credentials may not use, is one line. A command
        that writes puts and deletes a small object under this prefix (a credential may be scoped to the
        prefix, and may be read-only); one that only reads lists the prefix."""
        try:
            if write:
                probe = self / f".cachetrain-probe-{os.getpid()}"
                with remote_errors("writing a test object", str(self)):
                    self.fs.pipe_file(probe.key, b"")
                    self.fs.rm_file(probe.key)
            else:
                with remote_errors("listing it", str(self)):
                    self.fs.find(self.key, maxdepth=1)
        except FileNotFoundError:
            raise CacheError(f"{self}: bucket {self.bucket!r} not found (cache.location)") from None
