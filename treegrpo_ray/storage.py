"""Where a run's outputs live: one resolution of `tracking.output_dir`, one filesystem layer.

`tracking.output_dir` is a local or NFS path, or a URI that `pyarrow.fs` (the layer Ray Train's
own `storage_path` uses) understands: `s3://bucket/prefix`, `gs://bucket/prefix`, `hdfs://...`.
S3 options ride in the query string, as pyarrow reads them, e.g. a MinIO or other S3-compatible
server: `s3://bucket/outputs?endpoint_override=minio:9000&scheme=http`; credentials come from the
usual AWS environment variables or instance role, never from the config.

The driver resolves the location once, before anything starts (`resolve_output_dir`), and every
actor and Ray Train worker receives that absolute path or URI. A relative path resolves against
the current directory, except under `ray job submit`, whose driver runs in a temporary copy of
the working dir that Ray deletes: there it resolves against `~/treegrpo_ray/` (Ray Train's own
default is `~/ray_results`), and the driver prints where. On a multi-node cluster use a path
every node mounts (NFS, a ReadWriteMany PVC) or object storage; the learner checks that it sees
the driver's files (`probe`) before the first iteration.

A location is a plain string; `join` appends path parts (before a URI's query string).
"""
from __future__ import annotations

import functools
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

URI_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "file")
RAY_JOB_BASE = "~/treegrpo_ray"


def _pa():
    """pyarrow.fs, imported on first I/O (config validation needs only the string helpers)."""
    import pyarrow.fs
    return pyarrow.fs


QUERY_SECRETS = ("secret", "key", "token", "password", "session", "credential")


def redact(text: str | None) -> str | None:
    """scheme://user:pass@host/p?secret_key=s -> scheme://***@host/p?secret_key=***, for anything
    printed, logged or returned; other text unchanged."""
    if not text or "://" not in str(text):
        return text
    uri, q, query = str(text).partition("?")
    if q:
        query = "&".join(f"{k}=***" if e and any(w in k.lower() for w in QUERY_SECRETS) else f"{k}{e}{v}"
                         for k, e, v in (p.partition("=") for p in query.split("&")))
    head, sep, rest = uri.partition("://")
    host, slash, path = rest.partition("/")
    if "@" in host:
        uri = f"{head}://***@{host.rsplit('@', 1)[1]}{slash}{path}"
    return uri + q + query


def is_uri(location: str) -> bool:
    return "://" in str(location)


def under_ray_job(env=os.environ) -> bool:
    """True in the driver process `ray job submit` starts (Ray's job supervisor sets this)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in env


def resolve_output_dir(output_dir: str, *, env=os.environ) -> str:
    """The absolute path or URI the run's outputs go to; see the module docstring."""
    output_dir = str(output_dir)
    if output_dir.startswith("file://"):
        output_dir = output_dir[len("file://"):]
    if is_uri(output_dir):
        return output_dir
    path = Path(output_dir).expanduser()
    if not path.is_absolute():
        base = Path(RAY_JOB_BASE).expanduser() if under_ray_job(env) else Path.cwd()
        path = base / path
    return os.path.normpath(str(path))


def check_location(output_dir: str) -> str | None:
    """A problem with output_dir's form (no I/O), or None."""
    if not is_uri(output_dir):
        return None
    scheme = output_dir.split("://", 1)[0].lower()
    if scheme not in URI_SCHEMES:
        return f"URI scheme '{scheme}://' is not one pyarrow.fs can open ({', '.join(s + '://' for s in URI_SCHEMES)})"
    bucket = output_dir.split("://", 1)[1].split("?", 1)[0].strip("/")
    if scheme != "file" and not bucket:
        return "names no bucket or path after the scheme"
    return None


def join(location: str, *parts: str) -> str:
    location = str(location)
    if is_uri(location):
        base, sep, query = location.partition("?")
        return "/".join([base.rstrip("/"), *parts]) + sep + query
    return os.path.join(location, *parts)


def name(location: str) -> str:
    return str(location).partition("?")[0].rstrip("/").rsplit("/", 1)[-1]


def parent(location: str) -> str:
    location = str(location)
    if is_uri(location):
        base, sep, query = location.partition("?")
        return base.rstrip("/").rsplit("/", 1)[0] + sep + query
    return os.path.dirname(os.path.normpath(location))


def filesystem(location: str) -> tuple:
    """(pyarrow filesystem, path inside it) for a location. Cached: listing a run's checkpoints
    on S3 asks about the same few locations many times, and each S3FileSystem is a client."""
    location = str(location)
    if is_uri(location):
        return _from_uri(location)
    return _pa().LocalFileSystem(), os.path.abspath(location)  # not cached: depends on the cwd


@functools.lru_cache(maxsize=512)
def _from_uri(location: str) -> tuple:
    return _pa().FileSystem.from_uri(location)


def is_local(location: str) -> bool:
    return isinstance(filesystem(location)[0], _pa().LocalFileSystem)


def exists(location: str) -> bool:
    fs, path = filesystem(location)
    return fs.get_file_info(path).type != _pa().FileType.NotFound


def is_file(location: str) -> bool:
    fs, path = filesystem(location)
    return fs.get_file_info(path).type == _pa().FileType.File


def mtime(location: str) -> float:
    fs, path = filesystem(location)
    info = fs.get_file_info(path)
    return info.mtime.timestamp() if info.mtime is not None else 0.0


def list_dirs(location: str) -> list[str]:
    """Locations of the directories directly under `location` (none if it does not exist)."""
    fs, path = filesystem(location)
    infos = fs.get_file_info(_pa().FileSelector(path, allow_not_found=True))
    return [join(location, i.base_name) for i in infos if i.type == _pa().FileType.Directory]


def write_bytes(location: str, data: bytes) -> None:
    fs, path = filesystem(location)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def read_bytes(location: str) -> bytes:
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_text(location: str, text: str) -> None:
    write_bytes(location, text.encode())


def read_text(location: str) -> str:
    return read_bytes(location).decode()


def delete_dir(location: str) -> None:
    fs, path = filesystem(location)
    try:
        fs.delete_dir(path)
    except FileNotFoundError:
        pass


def delete_file(location: str) -> None:
    fs, path = filesystem(location)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def upload_file(local: str | Path, location: str) -> None:
    fs, path = filesystem(location)
    _pa().copy_files(str(local), path, source_filesystem=_pa().LocalFileSystem(), destination_filesystem=fs)


def upload_dir(local: str | Path, location: str) -> None:
    """Copy a local directory tree to `location` (which is replaced whole)."""
    delete_dir(location)
    fs, path = filesystem(location)
    fs.create_dir(path, recursive=True)
    _pa().copy_files(str(local), path, source_filesystem=_pa().LocalFileSystem(), destination_filesystem=fs)


def download_dir(location: str, local: str | Path) -> Path:
    fs, path = filesystem(location)
    Path(local).mkdir(parents=True, exist_ok=True)
    _pa().copy_files(path, str(local), source_filesystem=fs, destination_filesystem=_pa().LocalFileSystem())
    return Path(local)


@contextmanager
def local_copy(location: str):
    """A local directory holding `location`'s files: the directory itself when local, else a
    temporary download removed on exit."""
    if is_local(location):
        yield Path(filesystem(location)[1])
        return
    with tempfile.TemporaryDirectory(prefix="treegrpo-dl-") as d:
        yield download_dir(location, d)


@contextmanager
def staged_dir(location: str):
    """A local directory to write `location`'s contents into: the directory itself when local,
    else a temporary one uploaded to `location` when the block exits without error."""
    if is_local(location):
        path = Path(filesystem(location)[1])
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    d = tempfile.mkdtemp(prefix="treegrpo-up-")
    try:
        yield Path(d)
        upload_dir(d, location)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def write_probe(root: str) -> str:
    """A small file the driver writes under root; the learner checks it sees it (shared storage)."""
    probe = join(root, f".probe-{uuid.uuid4().hex[:12]}")  # removed once the learner has looked
    write_text(probe, "written by the treegrpo_ray driver; the learner must see this file\n")
    return probe


def unshared_storage_error(root: str, host: str) -> str:
    return (f"tracking.output_dir {root} is not shared: the driver wrote a file there that the learner on node "
            f"'{host}' cannot see, so checkpoints and the export would be split across machines. Use a path "
            "every node mounts (NFS, a ReadWriteMany PVC mounted on the head and the learner pods) or object "
            "storage (tracking.output_dir=s3://bucket/prefix).")
