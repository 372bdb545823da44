"""Local paths and s3:// URIs behind one small interface (pyarrow.fs underneath).

S3 settings come from the usual AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION,
AWS_ENDPOINT_URL for S3-compatible servers). Credentials are never logged or written to outputs.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

REMOTE_SCHEMES = ("s3://",)


def is_remote(uri: str) -> bool:
    return uri.startswith(REMOTE_SCHEMES)


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return str(Path(base, *parts))


def _s3_filesystem() -> pafs.S3FileSystem:
    kwargs: dict = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    # An S3 outage of a few seconds to a minute is retried with exponential backoff (AWS's standard
    # strategy) before it fails the scan; RAYMEM_S3_RETRIES sets the attempts per request.
    attempts = int(os.environ.get("RAYMEM_S3_RETRIES", "10"))
    kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=attempts)
    kwargs["connect_timeout"] = float(os.environ.get("RAYMEM_S3_CONNECT_TIMEOUT_S", "5"))
    return pafs.S3FileSystem(**kwargs)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for `uri` and the path inside it."""
    if is_remote(uri):
        return _s3_filesystem(), uri[len("s3://") :].rstrip("/")
    return pafs.LocalFileSystem(), str(Path(uri).absolute())


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def read_bytes(uri: str) -> bytes:
    """The bytes of a file; `<shard>.tar#<member>` reads one member of a tar (WebDataset images)."""
    if "#" in uri:
        container, member = uri.split("#", 1)
        if container.endswith(".tar"):
            import tarfile

            fs, path = filesystem(container)
            with fs.open_input_file(path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
                try:
                    return tar.extractfile(member).read()
                except KeyError:
                    raise FileNotFoundError(f"{container}: no member {member}") from None
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = filesystem(uri)
    parent = posixpath.dirname(path) if is_remote(uri) else str(Path(path).parent)
    fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Readers never see a half-written file: local writes go through a rename; an S3 PUT is atomic."""
    if is_remote(uri):
        write_bytes(uri, data)
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # a full disk must not keep the partial file
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def staged_local_file(uri: str, suffix: str = ""):
    """A local temporary path to write `uri` through: renamed (local) or uploaded (s3) on success only."""
    if is_remote(uri):
        fd, tmp = tempfile.mkstemp(suffix=suffix, prefix=".raymem-")
    else:
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=Path(uri).parent, prefix=f".{Path(uri).name}.", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        move(tmp, uri)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Files below `uri` (recursive), sorted, skipping hidden and underscore-prefixed names."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type == pafs.FileType.File:
        return [uri]
    out = []
    for entry in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        name = posixpath.basename(entry.path)
        rel_parts = posixpath.relpath(entry.path, path).split("/")
        if entry.type != pafs.FileType.File or any(p.startswith((".", "_")) for p in rel_parts):
            continue
        if name.endswith(suffix):
            out.append(("s3://" + entry.path) if is_remote(uri) else entry.path)
    return sorted(out)


def delete_file(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_file(path)


def delete_dir(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def move(src: str, dst: str) -> None:
    """Rename on local disks; copy then delete on object stores (S3 has no rename)."""
    if not is_remote(src) and not is_remote(dst):
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
        return
    fs_src, p_src = filesystem(src)
    fs_dst, p_dst = filesystem(dst)
    pafs.copy_files(p_src, p_dst, source_filesystem=fs_src, destination_filesystem=fs_dst)
    fs_src.delete_file(p_src)


def local_copy(uri: str, cache_root: str | None = None) -> str:
    """A local path holding `uri` (file or prefix); remote objects are downloaded once into a cache."""
    if not is_remote(uri):
        return uri
    cache = Path(cache_root or os.environ.get("RAYMEM_CACHE", Path.home() / ".cache" / "raymem"))
    target = cache / "s3" / uri[len("s3://") :].rstrip("/")
    marker = target.parent / f".{target.name}.complete"
    if marker.exists():
        return str(target)
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri}: no such object or prefix")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".download-"))
    try:
        dest = tmp / "payload"
        local = pafs.LocalFileSystem()
        if info.type == pafs.FileType.File:
            pafs.copy_files(path, str(dest), source_filesystem=fs, destination_filesystem=local)
        else:
            for entry in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
                if entry.type != pafs.FileType.File:
                    continue
                target_file = dest / posixpath.relpath(entry.path, path)
                target_file.parent.mkdir(parents=True, exist_ok=True)
                pafs.copy_files(entry.path, str(target_file), source_filesystem=fs, destination_filesystem=local)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        os.replace(dest, target)
        marker.touch()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
