"""S3-compatible object storage for snapshots: checksummed multipart upload, complete marker, verified parallel download."""
from __future__ import annotations

import base64
import concurrent.futures as cf
import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import urlparse

from ..snapshot import manifest as mf
from ..snapshot import verify as sv
from .. import config
from ..formats import REMOTE_MARKER
from ..durable import fsync_path
from ..errors import DynsnapError, SnapshotCorrupt, SnapshotExists, SnapshotNotFound, StorageError
from .names import NAME

__all__ = ["S3Store", "COMPLETE", "PART_SIZE"]

#: The object written last: its presence makes a snapshot visible in the bucket.
COMPLETE = "COMPLETE"
PART_SIZE = 16 << 20
Progress = Optional[Callable[[str, int, int], Any]]


def _b64sha(data: bytes | memoryview) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def _why(e: BaseException) -> str:
    """One phrase for a failed S3 call: its error code and message, or the connection problem (no credentials)."""
    resp = getattr(e, "response", None)
    if isinstance(resp, dict) and "Error" in resp:
        err = resp["Error"]
        return f"{err.get('Code', '?')}: {err.get('Message', '')}".rstrip(": ")
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text



class _Counter:
    """Bytes moved so far by the worker threads, reported as ``progress(phase, done, total)``."""

    def __init__(self, phase: str, total: int, progress: Optional[Callable[[str, int, int], Any]]):
        self.phase, self.total, self.progress = phase, total, progress
        self.done = 0
        self._lock = threading.Lock()

    def __call__(self, n: int) -> None:
        with self._lock:
            self.done += n
            if self.progress:
                self.progress(self.phase, self.done, self.total)

class S3Store:
    """Snapshots under ``s3://BUCKET/PREFIX/<name>/``: the snapshot's files as objects, then ``COMPLETE``.

    ``COMPLETE`` (JSON) holds the manifest's sha256 and every part's sha256; a snapshot without it is never
    listed nor downloaded. Credentials come from boto3's usual chain (environment, shared files, instance or
    web identity); the endpoint from ``endpoint_url``, ``$DYNSNAP_S3_ENDPOINT`` or ``$AWS_ENDPOINT_URL``.
    """

    def __init__(self, url: str, *, endpoint_url: Optional[str] = None, part_size: int = PART_SIZE,
                 threads: int = 8, connect_timeout: float = 5, read_timeout: float = 60, attempts: int = 3):
        u = urlparse(url)
        if u.scheme != "s3" or not u.netloc:
            raise DynsnapError(f"storage URL {url!r} is not s3://BUCKET[/PREFIX]", stage="storage")
        self.url = url.rstrip("/")
        self.bucket = u.netloc
        self.prefix = u.path.strip("/")
        self.part_size = part_size
        self.threads = threads
        import boto3
        from botocore.config import Config
        endpoint = endpoint_url or config.get("s3_endpoint")
        cfg = Config(connect_timeout=connect_timeout, read_timeout=read_timeout,
                     retries={"max_attempts": attempts, "mode": "standard"}, max_pool_connections=threads * 2,
                     request_checksum_calculation="when_required", response_checksum_validation="when_required")
        self.client = boto3.session.Session().client("s3", endpoint_url=endpoint, config=cfg)

    # keys
    def _key(self, name: str, rel: str = "") -> str:
        from .names import check_name
        check_name(name)
        base = f"{self.prefix}/{name}" if self.prefix else name
        return f"{base}/{rel}" if rel else base

    def where(self, name: str) -> str:
        return f"s3://{self.bucket}/{self._key(name)}"

    def _fail(self, what: str, e: BaseException, stage: str, name: str) -> StorageError:
        return StorageError(f"{what} {self.where(name)} failed: {_why(e)}", stage=stage, path=self.where(name))

    # listing
    def _marker(self, name: str, raw: bool = False) -> Optional[dict]:
        """The parsed COMPLETE marker, None when absent; other failures raise StorageError (or, with ``raw``,
        the client's own exception for the caller to word)."""
        from botocore.exceptions import ClientError
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(name, COMPLETE))["Body"].read()
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            if raw:
                raise
            raise self._fail("reading", e, "storage", name) from None
        except Exception as e:  # noqa: BLE001 - connection errors of any kind
            if raw:
                raise
            raise self._fail("reading", e, "storage", name) from None
        try:
            marker = json.loads(body)
        except ValueError:
            raise SnapshotCorrupt(f"{self.where(name)}/{COMPLETE} is not valid JSON", stage="download") from None
        return marker

    def exists(self, name: str) -> bool:
        return self._marker(name) is not None

    def list(self) -> list[dict]:
        """Complete snapshots in the bucket: name, bytes, created, files (incomplete uploads are never listed)."""
        rows = []
        base = f"{self.prefix}/" if self.prefix else ""
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base)
            keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
        except Exception as e:  # noqa: BLE001
            raise StorageError(f"listing s3://{self.bucket}/{base} failed: {_why(e)}", stage="storage") from None
        for k in keys:
            rest = k[len(base):]
            if rest.count("/") == 1 and rest.endswith("/" + COMPLETE):
                name = rest.split("/", 1)[0]
                if not NAME.match(name) or ".." in name:
                    continue          # not written by dynsnap: never a name the agent would use
                marker = self._marker(name)
                if marker:
                    rows.append({"name": name, "location": "remote", "url": self.where(name),
                                 "bytes": marker.get("total_bytes"), "created": marker.get("created")})
        return sorted(rows, key=lambda r: r["name"])

    def manifest(self, name: str) -> dict:
        """The manifest of a complete snapshot, checked against the sha256 its marker recorded."""
        return json.loads(self._manifest_raw(name))

    def _manifest_raw(self, name: str) -> bytes:
        marker = self._marker(name)
        if marker is None:
            raise SnapshotNotFound(f"no complete snapshot {self.where(name)}", stage="download")
        try:
            raw = self.client.get_object(Bucket=self.bucket, Key=self._key(name, mf.MANIFEST_NAME))["Body"].read()
        except Exception as e:  # noqa: BLE001
            raise self._fail("reading the manifest of", e, "download", name) from None
        if hashlib.sha256(raw).hexdigest() != marker.get("manifest_sha256"):
            raise SnapshotCorrupt(f"{self.where(name)}/{mf.MANIFEST_NAME} does not match the sha256 in its "
                                  f"{COMPLETE} marker", stage="download")
        return raw

    # upload
    def upload(self, snap_dir: Path, name: Optional[str] = None, progress: Progress = None) -> dict:
        """Upload a committed local snapshot; the marker goes last. On failure nothing is listed, the partial
        objects are removed (best effort; they are invisible anyway) and StorageError says why."""
        snap_dir = Path(snap_dir)
        name = name or snap_dir.name
        m = mf.read(snap_dir)
        rels = [f["path"] for f in m["files"]]
        total = sum(f["size"] for f in m["files"]) + (snap_dir / mf.MANIFEST_NAME).stat().st_size
        advance = _Counter("upload", total, progress)
        parts: dict[str, list[str]] = {}
        uploads: dict[str, str] = {}
        try:
            if self._marker(name, raw=True) is not None:
                raise SnapshotExists(f"{self.where(name)} already holds a complete snapshot", stage="upload",
                                     path=self.where(name))
            with cf.ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="dynsnap-upload") as pool:
                for rel in rels:
                    parts[rel] = self._upload_file(pool, snap_dir / rel, name, rel, advance, uploads)
                parts[mf.MANIFEST_NAME] = self._upload_file(pool, snap_dir / mf.MANIFEST_NAME, name,
                                                            mf.MANIFEST_NAME, advance, uploads)
            marker = {"format": REMOTE_MARKER.format, "name": name, "created": m["created"], "total_bytes": m["total_bytes"],
                      "part_size": self.part_size,
                      "manifest_sha256": hashlib.sha256((snap_dir / mf.MANIFEST_NAME).read_bytes()).hexdigest(),
                      "parts_sha256": parts, "uploaded": time.time()}
            body = json.dumps(marker, sort_keys=True).encode()
            self.client.put_object(Bucket=self.bucket, Key=self._key(name, COMPLETE), Body=body,
                                   ChecksumSHA256=_b64sha(body))
        except BaseException as e:
            for key, upload_id in uploads.items():
                try:
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
                except Exception:  # noqa: BLE001 - best effort: invisible without the marker anyway
                    pass
            if not isinstance(e, SnapshotExists):
                self.remove_incomplete(name)
            if isinstance(e, DynsnapError) or not isinstance(e, Exception):
                raise
            raise StorageError(f"uploading {snap_dir} to {self.where(name)} failed: {_why(e)}; the local snapshot "
                               "is intact and nothing was listed in the bucket", stage="upload",
                               path=self.where(name)) from None
        return {"url": self.where(name), "bytes": total}

    def _upload_file(self, pool: cf.ThreadPoolExecutor, path: Path, name: str, rel: str,
                     advance: Callable[[int], None], uploads: dict[str, str]) -> list[str]:
        key = self._key(name, rel)
        size = path.stat().st_size
        if size <= self.part_size:
            data = path.read_bytes()
            sha = _b64sha(data)
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ChecksumSHA256=sha)
            advance(size)
            return [sha]
        upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=key,
                                                        ChecksumAlgorithm="SHA256")["UploadId"]
        uploads[key] = upload_id
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            def part(i: int) -> dict:
                data = os.pread(fd, self.part_size, i * self.part_size)
                sha = _b64sha(data)
                r = self.client.upload_part(Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=i + 1,
                                            Body=data, ChecksumSHA256=sha)
                advance(len(data))
                return {"PartNumber": i + 1, "ETag": r["ETag"], "ChecksumSHA256": sha}
            n = (size + self.part_size - 1) // self.part_size
            done = list(pool.map(part, range(n)))
        finally:
            os.close(fd)
        self.client.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                              MultipartUpload={"Parts": done})
        del uploads[key]
        return [p["ChecksumSHA256"] for p in done]

    # download
    def download(self, name: str, cache: Path, progress: Progress = None) -> Path:
        """Download a complete snapshot into ``cache/<name>`` (parallel ranged reads, every part's sha256 and
        every file's xxh3 checked), then rename it into place; return its path. A verified copy already in the
        cache is used as it is."""
        from ..snapshot import STAGING_TAG, clean_stale_staging
        cache = Path(cache)
        dest = cache / name
        marker = self._marker(name)
        if marker is None:
            raise SnapshotNotFound(f"no complete snapshot {self.where(name)}", stage="download")
        if dest.is_dir():
            try:
                m = mf.read(dest)
                if hashlib.sha256((dest / mf.MANIFEST_NAME).read_bytes()).hexdigest() == marker["manifest_sha256"]:
                    sv.check_sizes(dest, m)
                    return dest
            except DynsnapError:
                pass
            raise SnapshotExists(f"{dest} exists in the node cache but is not {self.where(name)}; remove it "
                                 f"(dynsnap rm {dest})", stage="download", path=str(dest))
        cache.mkdir(parents=True, exist_ok=True)
        clean_stale_staging(cache)
        staging = cache / f".{name}{STAGING_TAG}{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            raw = self._manifest_raw(name)
            (staging / mf.MANIFEST_NAME).write_bytes(raw)
            m = mf.read(staging)
            total = sum(f["size"] for f in m["files"])
            advance = _Counter("download", total, progress)
            part_size = int(marker.get("part_size") or self.part_size)
            jobs = []
            fds = {}
            for f in m["files"]:
                path = staging / f["path"]
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
                fds[f["path"]] = fd
                os.ftruncate(fd, f["size"])
                shas = marker["parts_sha256"].get(f["path"])
                if shas is None:
                    raise SnapshotCorrupt(f"{self.where(name)}/{COMPLETE} lists no checksums for {f['path']}",
                                          stage="download")
                nparts = max(1, (f["size"] + part_size - 1) // part_size)
                if len(shas) != nparts:
                    raise SnapshotCorrupt(f"{self.where(name)}/{COMPLETE} has {len(shas)} part checksums for "
                                          f"{f['path']}, expected {nparts}", stage="download")
                for i in range(nparts):
                    jobs.append((f, i, nparts, shas[i]))

            def fetch(job: tuple) -> None:
                f, i, nparts, sha = job
                key = self._key(name, f["path"])
                if nparts == 1:
                    data = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
                else:
                    end = min(f["size"], (i + 1) * part_size) - 1
                    data = self.client.get_object(Bucket=self.bucket, Key=key,
                                                  Range=f"bytes={i * part_size}-{end}")["Body"].read()
                want_len = min(part_size, f["size"] - i * part_size) if nparts > 1 else f["size"]
                if len(data) != want_len or _b64sha(data) != sha:
                    raise SnapshotCorrupt(f"{self.where(name)}/{f['path']} part {i + 1} does not match its sha256 "
                                          f"in {COMPLETE} ({len(data)} bytes): the object was altered or damaged",
                                          stage="download", path=f"{self.where(name)}/{f['path']}")
                view = memoryview(data)
                off = i * part_size
                while view:
                    n = os.pwrite(fds[f["path"]], view, off)
                    view, off = view[n:], off + n
                advance(len(data))
            try:
                with cf.ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="dynsnap-download") as pool:
                    for fut in [pool.submit(fetch, j) for j in sorted(jobs, key=lambda j: -j[0]["size"])]:
                        fut.result()
                for fd in fds.values():
                    os.fsync(fd)
            finally:
                for fd in fds.values():
                    os.close(fd)
            sv.verify_files(staging, m, direct=False)
            fsync_path(staging)
            os.rename(staging, dest)
            fsync_path(cache)
        except BaseException as e:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(e, DynsnapError) or not isinstance(e, Exception):
                raise
            raise StorageError(f"downloading {self.where(name)} failed: {_why(e)}; nothing was restored",
                               stage="download", path=self.where(name)) from None
        return dest

    # removal
    def _keys(self, name: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                      Prefix=self._key(name) + "/")
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def remove(self, name: str) -> bool:
        """Delete a snapshot from the bucket: the marker first (it disappears at once), then its objects."""
        try:
            keys = self._keys(name)
            if not keys:
                return False
            self.client.delete_object(Bucket=self.bucket, Key=self._key(name, COMPLETE))
            self._delete(keys)
        except Exception as e:  # noqa: BLE001
            raise self._fail("removing", e, "remove", name) from None
        return True

    def remove_incomplete(self, name: str) -> None:
        """Remove the objects and pending multipart uploads of a snapshot that has no marker (best effort)."""
        try:
            if self._marker(name) is not None:
                return
            self._delete(self._keys(name))
            resp = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=self._key(name) + "/")
            for u in resp.get("Uploads", []):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=u["Key"], UploadId=u["UploadId"])
        except Exception:  # noqa: BLE001 - invisible without the marker anyway
            pass

    def _delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            chunk = keys[i:i + 1000]
            if chunk:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in chunk]})
