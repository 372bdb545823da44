"""Fetching training images by URI, with img2dataset-grade care: the second stage of copy detection.

A training set that ships only CLIP embeddings (LAION) is checked for copies by fetching the images of
each generation's CLIP candidates (raymem.copy_candidates). Those images live on web servers, in S3, on
local disks and inside WebDataset shards, and many of them are gone: a fetch must never fail a scan.
Every URI gets exactly one outcome:

    ok            bytes read, within the size limit, and decodable as an image
    no_uri        the training row has no image_uri
    not_found     404 / 410, or a missing file, bucket key or tar member
    http_error    any other HTTP status >= 400 (after retries for 429 and 5xx)
    timeout       no complete answer within `timeout_s` (connect, each read, and the whole body)
    unreachable   connection refused / DNS failure / S3 error (after retries)
    too_large     Content-Length, the bytes read, or the decoded pixel count over the limit
    not_image     the server says the body is not an image (Content-Type)
    undecodable   bytes that PIL cannot decode (truncated, HTML, ...)
    unsupported   a URI scheme raymem cannot read (e.g. a tar member behind http)

Retries (429, 5xx, timeouts, refused connections) back off exponentially with jitter. Concurrency is
bounded per host inside each fetching actor (`per_host`), so a scan with many candidates on one server
does not hammer it. Errors and logs carry URIs without their query string or user info (signed URLs
hold credentials there).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import random
import tarfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, fields
from urllib.parse import urlsplit, urlunsplit

from raymem import uri as uris

STATUSES = (
    "ok",
    "no_uri",
    "not_found",
    "http_error",
    "timeout",
    "unreachable",
    "too_large",
    "not_image",
    "undecodable",
    "unsupported",
)
RETRYABLE = {"timeout", "unreachable", "http_error"}  # http_error only for 429 and 5xx (see _fetch_http)
USER_AGENT = "raymem (memorization scanner; +https://github.com/raymem/raymem)"


@dataclass(frozen=True)
class FetchLimits:
    timeout_s: float = 10.0
    retries: int = 2  # attempts after the first
    backoff_s: float = 0.5  # first retry waits about this long, doubling after
    max_bytes: int = 25_000_000
    max_pixels: int = 100_000_000
    per_host: int = 8

    @classmethod
    def of(cls, settings) -> FetchLimits:
        """The limits of a config section with the same field names (`embedding.copy_detection.candidates`)."""
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})


@dataclass
class Fetched:
    uri: str | None
    status: str
    data: bytes | None = None
    error: str | None = None
    http_status: int | None = None
    attempts: int = 0
    seconds: float = 0.0

    @property
    def sha256(self) -> str | None:
        return hashlib.sha256(self.data).hexdigest() if self.data is not None else None


def public_uri(uri: str | None) -> str | None:
    """A URI as it may appear in logs and errors: no user info, no query string, no fragment secrets."""
    if not uri or "://" not in uri:
        return uri
    parts = urlsplit(uri)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", parts.fragment if parts.scheme != "s3" else ""))


def host_of(uri: str | None) -> str:
    if not uri:
        return ""
    if uri.startswith(("http://", "https://")):
        return urlsplit(uri).netloc.rsplit("@", 1)[-1]
    if uri.startswith("s3://"):
        return "s3://" + uri[5:].split("/", 1)[0]
    return "local"


class _Failure(Exception):
    def __init__(self, status: str, error: str, http_status: int | None = None, retry: bool = False):
        super().__init__(error)
        self.status, self.error, self.http_status, self.retry = status, error, http_status, retry


class Fetcher:
    """Fetches many URIs concurrently: `threads` in all, at most `limits.per_host` per host."""

    def __init__(self, limits: FetchLimits = FetchLimits(), threads: int = 16):
        self.limits = limits
        self.threads = threads
        self._hosts: dict[str, threading.BoundedSemaphore] = defaultdict(
            lambda: threading.BoundedSemaphore(limits.per_host)
        )
        self._hosts_lock = threading.Lock()
        self._local = threading.local()

    def fetch_many(self, uris_: list[str | None]) -> list[Fetched]:
        """One outcome per URI, in order. Tar members are read shard by shard (one pass per shard)."""
        from concurrent.futures import ThreadPoolExecutor

        results: list[Fetched | None] = [None] * len(uris_)
        members: dict[str, list[tuple[int, str]]] = defaultdict(list)
        singles = []
        for i, u in enumerate(uris_):
            container = _tar_container(u)
            if container is not None and not container.startswith(("http://", "https://")):
                members[container].append((i, u.split("#", 1)[1]))
            else:
                singles.append(i)
        with ThreadPoolExecutor(max_workers=max(1, self.threads)) as pool:
            futures = {i: pool.submit(self.fetch, uris_[i]) for i in singles}
            shard_futures = [pool.submit(self._fetch_tar, c, wanted) for c, wanted in members.items()]
            for i, f in futures.items():
                results[i] = f.result()
            for f in shard_futures:
                for i, fetched in f.result():
                    results[i] = fetched
        return results  # type: ignore[return-value]

    def fetch(self, uri: str | None) -> Fetched:
        start = time.monotonic()
        if not uri:
            return Fetched(uri, "no_uri", error="the training row has no image_uri")
        attempts = 0
        while True:
            attempts += 1
            try:
                with self._slot(uri):
                    data = self._read(uri)
                fetched = Fetched(uri, "ok", data)
                break
            except _Failure as f:
                if f.retry and attempts <= self.limits.retries:
                    time.sleep(self.limits.backoff_s * 2 ** (attempts - 1) * (0.5 + random.random()))
                    continue
                fetched = Fetched(uri, f.status, None, f"{public_uri(uri)}: {f.error}"[:500], f.http_status)
                break
        if fetched.status == "ok":
            fetched = self._check_image(fetched)
        fetched.attempts, fetched.seconds = attempts, time.monotonic() - start
        return fetched

    # -- one read ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _slot(self, uri: str):
        with self._hosts_lock:
            sem = self._hosts[host_of(uri)]
        with sem:
            yield

    def _read(self, uri: str) -> bytes:
        if uri.startswith(("http://", "https://")):
            if _tar_container(uri) is not None:
                raise _Failure("unsupported", "tar members are read from local paths and s3:// only")
            return self._fetch_http(uri)
        if "://" in uri and not uri.startswith(("s3://", "file://")):
            raise _Failure("unsupported", f"unsupported URI scheme '{uri.split('://', 1)[0]}'")
        return self._fetch_file(uri.removeprefix("file://"))

    def _session(self):
        import requests

        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            session.headers["User-Agent"] = USER_AGENT
        return session

    def _fetch_http(self, uri: str) -> bytes:
        import requests

        limits = self.limits
        deadline = time.monotonic() + limits.timeout_s
        try:
            with self._session().get(uri, stream=True, timeout=(limits.timeout_s, limits.timeout_s)) as resp:
                code = resp.status_code
                if code in (404, 410):
                    raise _Failure("not_found", f"HTTP {code}", code)
                if code >= 400:
                    raise _Failure("http_error", f"HTTP {code}", code, retry=code == 429 or code >= 500)
                kind = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
                if kind and not (
                    kind.startswith("image/") or kind in ("application/octet-stream", "binary/octet-stream")
                ):
                    raise _Failure("not_image", f"Content-Type {kind}", code)
                length = resp.headers.get("Content-Length")
                if length and length.isdigit() and int(length) > limits.max_bytes:
                    raise _Failure("too_large", f"Content-Length {length} > {limits.max_bytes} bytes", code)
                body = bytearray()
                while chunk := resp.raw.read1(65536, decode_content=True):  # what has arrived, not a full 64 kB
                    body += chunk
                    if len(body) > limits.max_bytes:
                        raise _Failure("too_large", f"more than {limits.max_bytes} bytes", code)
                    if time.monotonic() > deadline:  # a server trickling bytes must not hold a thread forever
                        raise _Failure("timeout", f"body not complete after {limits.timeout_s:g} s", code, retry=True)
                return bytes(body)
        except _Failure:
            raise
        except (requests.Timeout, TimeoutError) as err:
            raise _Failure(
                "timeout", f"no answer within {limits.timeout_s:g} s ({type(err).__name__})", retry=True
            ) from None
        except requests.TooManyRedirects:
            raise _Failure("http_error", "too many redirects") from None
        except (requests.ConnectionError, OSError) as err:
            # a stalled body surfaces as a ConnectionError wrapping a read timeout
            if "timed out" in str(err).lower():
                raise _Failure("timeout", f"no answer within {limits.timeout_s:g} s", retry=True) from None
            raise _Failure("unreachable", f"connection failed ({type(err).__name__})", retry=True) from None

    def _fetch_file(self, uri: str) -> bytes:
        import pyarrow.fs as pafs

        try:
            fs, path = uris.filesystem(uri)
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.NotFound:
                raise _Failure("not_found", "no such file")
            if info.size is not None and info.size > self.limits.max_bytes:
                raise _Failure("too_large", f"{info.size} bytes > {self.limits.max_bytes}")
            with fs.open_input_stream(path) as f:
                return f.read()
        except _Failure:
            raise
        except OSError as err:
            raise _Failure("unreachable", _one_line(err), retry=uris.is_remote(uri)) from None

    def _fetch_tar(self, container: str, wanted: list[tuple[int, str]]) -> list[tuple[int, Fetched]]:
        """Every wanted member of one tar shard, in one sequential pass over it."""
        start = time.monotonic()
        by_name: dict[str, list[int]] = defaultdict(list)
        for i, name in wanted:
            by_name[name].append(i)
        found: dict[str, Fetched] = {}
        failure = None
        try:
            with self._slot(container):
                fs, path = uris.filesystem(container)
                with fs.open_input_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
                    for member in tar:
                        if member.name not in by_name or not member.isfile():
                            continue
                        uri = f"{container}#{member.name}"
                        if member.size > self.limits.max_bytes:
                            found[member.name] = Fetched(
                                uri,
                                "too_large",
                                error=f"{public_uri(uri)}: {member.size} bytes > {self.limits.max_bytes}",
                            )
                        else:
                            found[member.name] = Fetched(uri, "ok", tar.extractfile(member).read())
                        if len(found) == len(by_name):
                            break
        except FileNotFoundError:
            failure = ("not_found", "no such tar shard")
        except (OSError, tarfile.TarError) as err:
            failure = ("unreachable", _one_line(err))
        out = []
        for name, indices in by_name.items():
            uri = f"{container}#{name}"
            fetched = found.get(name)
            if fetched is None:
                status, why = failure or ("not_found", "no such member in the tar shard")
                fetched = Fetched(uri, status, error=f"{public_uri(uri)}: {why}")
            elif fetched.status == "ok":
                fetched = self._check_image(fetched)
            fetched.attempts, fetched.seconds = 1, time.monotonic() - start
            out += [(i, fetched) for i in indices]
        return out

    def _check_image(self, fetched: Fetched) -> Fetched:
        """Decodable, and not a decompression bomb."""
        from PIL import Image

        try:
            with Image.open(io.BytesIO(fetched.data)) as im:
                if im.width * im.height > self.limits.max_pixels:
                    return Fetched(
                        fetched.uri, "too_large", error=f"{public_uri(fetched.uri)}: {im.width}x{im.height} pixels"
                    )
                im.load()
        except Image.DecompressionBombError as err:
            return Fetched(fetched.uri, "too_large", error=f"{public_uri(fetched.uri)}: {err}"[:500])
        except Exception as err:  # noqa: BLE001 - any decoder failure is this status
            return Fetched(fetched.uri, "undecodable", error=f"{public_uri(fetched.uri)}: {_one_line(err)}"[:500])
        return fetched


def decode_rgb(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


def _tar_container(uri: str | None) -> str | None:
    if uri and "#" in uri:
        container = uri.split("#", 1)[0]
        if container.endswith(".tar"):
            return container
    return None


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {text}"[:300]
