"""S3 blob store (boto3): AWS S3 or any S3-compatible store through an endpoint URL.

URL form (``from_url``)::

    s3://bucket/prefix?endpoint=http://127.0.0.1:9000&region=us-east-1

Layout: object ``kind/name`` is the S3 key ``<prefix>/<kind>/<name>`` (flat: S3 needs no fan-out
directories). Credentials come from boto3's usual chain (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, instance roles ...).

Behaviour:

- retries: botocore's "standard" mode (``max_attempts`` in total) retries 5xx, throttling and
  connection errors with jittered exponential backoff. A body cut off mid-transfer is not
  retried by botocore, so ``get``/``get_range`` retry those themselves (same attempt budget).
- one client with ``max_pool_connections`` keep-alive connections (default 32: above casfs's
  16 I/O threads plus the build's upload workers).
- ranged GETs (``Range: bytes=a-b``) for reads inside packs.
- bodies are bounded before they are read: a range by its length, a whole object by the
  largest its kind can be (``casfs.objects.base.max_object_len``); an answer that declares
  more is a ``StoreError`` (``casfs.httpclient.TooLarge``), not retried.
- objects of ``multipart_threshold`` bytes (64 MiB) or more are uploaded as parallel multipart
  uploads.
- request checksums only "when required": the new default trailing checksums of boto3 >= 1.36
  are refused by many S3-compatible stores, and casfs verifies every chunk by digest anyway.
- a missing object is a KeyError; every other failure is a ``StoreError`` that says what to do
  (missing bucket, access denied, no credentials, endpoint unreachable).
"""

from __future__ import annotations

import io
import os
import time
from typing import Iterator
from urllib.parse import SplitResult, parse_qs, quote, urlencode

from ..errors import StoreError
from ..httpclient import Backoff, TooLarge, parse_content_range
from ..layout import FLAT, relpath
from .base import max_object_len

try:
    import boto3
    import botocore.exceptions as bexc
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"S3 stores need boto3: pip install 'casfs[s3]' ({e})") from None

try:
    from urllib3.exceptions import HTTPError as _Urllib3Error
except ImportError:  # pragma: no cover - urllib3 always comes with botocore
    _Urllib3Error = OSError  # type: ignore[misc,assignment]

MULTIPART_THRESHOLD = 64 << 20
MULTIPART_CHUNKSIZE = 16 << 20



class _Truncated(Exception):
    """A response whose framing headers are missing or disagree with its body."""


# Failures while reading a response body (botocore does not retry those).
_BODY_ERRORS: tuple[type[BaseException], ...] = (
    _Truncated, bexc.IncompleteReadError, bexc.ResponseStreamingError, bexc.ReadTimeoutError,
    bexc.ConnectionClosedError, _Urllib3Error, ConnectionError, TimeoutError,
)
_BACKOFF = Backoff(0.1, 2.0)  # between our own retries of cut-off responses
_MISSING = {"NoSuchKey", "404", "NotFound"}
_DENIED = {"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
           "ExpiredToken", "InvalidToken"}


def _read_body(resp: dict, offset: int, length: int | None, cap: int,
               where: str) -> tuple[bytes, int | None]:
    """The body of a get_object response, checked against its Content-Length/Content-Range,
    and the object's total size (None when the server did not say). Bounded before anything is
    read: a whole object by ``cap``, a range by its length; a 200 to a ranged request (the
    server ignored the range) is read only up to the range's end.

    Raises:
        TooLarge: the answer declares more bytes than the request can have (not retried).
        _Truncated or a body read error: for a response to retry.
    """
    body = resp["Body"]
    try:
        expect = resp.get("ContentLength")
        if expect is None:
            raise _Truncated("no Content-Length")
        status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        ignored = length is not None and status == 200 and "ContentRange" not in resp
        if ignored:
            want = min(expect, offset + length)  # the object's head will do
        else:
            most = cap if length is None else length
            if expect > most:
                raise TooLarge(f"{where} declared {expect} bytes where at most {most} can come; "
                               "refused (a broken or hostile server?)")
            want = expect
        data = body.read(want) if want else b""
    finally:
        body.close()  # a body not read to its end is dropped with its connection
    if len(data) != want:
        raise _Truncated(f"got {len(data)} bytes, Content-Length {expect}")
    if length is None:
        return data, len(data)
    if ignored:  # slice the head of the whole object
        return data[offset:offset + length], expect
    cr = parse_content_range(resp.get("ContentRange"))
    if cr is None or cr.first != offset or cr.length != len(data) or len(data) > length:
        raise _Truncated(f"asked for bytes {offset}-{offset + length - 1}, "
                         f"got {resp.get('ContentRange')!r} ({len(data)} bytes)")
    return data, cr.total


def from_url(url: str, parts: SplitResult) -> "S3ObjectStore":
    """The store for ``s3://bucket/prefix?endpoint=http://127.0.0.1:9000&region=us-east-1``
    (endpoint also from ``CASFS_S3_ENDPOINT`` or ``AWS_ENDPOINT_URL``).

    Raises:
        StoreError: for a URL without a bucket.
    """
    if not parts.netloc:
        raise StoreError(f"{url}: an S3 URL needs a bucket: s3://bucket/prefix")
    q = parse_qs(parts.query)
    endpoint = (q.get("endpoint") or [None])[0] or os.environ.get("CASFS_S3_ENDPOINT") \
        or os.environ.get("AWS_ENDPOINT_URL")
    region = (q.get("region") or [None])[0]
    return S3ObjectStore(parts.netloc, parts.path.strip("/"), endpoint_url=endpoint, region=region)


class S3ObjectStore:
    """Objects as S3 keys ``<prefix>/<kind>/<name>`` in one bucket. Thread-safe.

    Args:
        bucket: the bucket name (it must exist; see ``create_bucket``).
        prefix: key prefix inside the bucket ("" for the bucket root).
        endpoint_url: an S3-compatible endpoint (``http://127.0.0.1:9000``); None for AWS.
        region: the signing region; default from boto3's config chain, else us-east-1.
        max_attempts: attempts per request, first included (botocore "standard" retries).
        connect_timeout, read_timeout: seconds, per attempt.
        max_pool_connections: keep-alive connections shared by all threads.
        multipart_threshold: objects this large (bytes) or larger upload as multipart.
        multipart_chunksize: bytes per part of a multipart upload.
        path_style: address buckets as ``endpoint/bucket/key``; default True with an
            ``endpoint_url`` (what most S3-compatible stores expect), else boto3's choice.
        list_page_size: keys per LIST request (S3 caps it at 1000).

    Raises:
        StoreError: for an invalid bucket or endpoint (no network access happens here).
    """

    read_only = False

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 region: str | None = None, max_attempts: int = 5, connect_timeout: float = 5.0,
                 read_timeout: float = 60.0, max_pool_connections: int = 32,
                 multipart_threshold: int = MULTIPART_THRESHOLD,
                 multipart_chunksize: int = MULTIPART_CHUNKSIZE,
                 path_style: bool | None = None, list_page_size: int = 1000) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url or None
        self.max_attempts = max(1, max_attempts)
        session = boto3.session.Session()  # clients of one session are thread-safe
        self.region = region or session.region_name or "us-east-1"
        if path_style is None:
            path_style = self.endpoint_url is not None
        config = Config(
            region_name=self.region,
            retries={"mode": "standard", "total_max_attempts": self.max_attempts},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=max_pool_connections,
            tcp_keepalive=True,
            s3={"addressing_style": "path" if path_style else "auto"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        try:
            self.client = session.client("s3", endpoint_url=self.endpoint_url, config=config)
        except ValueError as e:
            raise StoreError(f"invalid S3 endpoint {self.endpoint_url!r}: {e}") from None
        except bexc.BotoCoreError as e:
            raise StoreError(f"cannot set up the S3 client for bucket {bucket!r}: {e}") from None
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold, multipart_chunksize=multipart_chunksize,
            max_concurrency=max(1, min(8, max_pool_connections)), use_threads=True)
        self.multipart_threshold = multipart_threshold
        self.list_page_size = list_page_size
        q = {k: v for k, v in (("endpoint", self.endpoint_url), ("region", region)) if v}
        self.url = f"s3://{bucket}/{self.prefix}" + (f"?{urlencode(q, quote_via=quote, safe=':/')}" if q else "")
        self._bucket_ok = False

    def __repr__(self) -> str:
        return f"<S3ObjectStore {self.url}>"

    # -- keys and errors -------------------------------------------------------------------

    def _key(self, key: str) -> str:
        path = relpath(key, FLAT)
        return f"{self.prefix}/{path}" if self.prefix else path

    def _where(self) -> str:
        return f"s3://{self.bucket}" + (f" at {self.endpoint_url}" if self.endpoint_url else "")

    def _error(self, op: str, key: str | None, e: BaseException) -> StoreError:
        """A StoreError with a message a user can act on."""
        what = f"{op} {key}" if key else op
        where = self._where()
        if isinstance(e, bexc.ClientError):
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket":
                return StoreError(f"{what}: bucket {self.bucket!r} does not exist ({where}); create it "
                                  f"(S3ObjectStore.create_bucket(), or `aws s3 mb s3://{self.bucket}`)")
            if code in _DENIED:
                return StoreError(f"{what}: access denied by {where} ({code}); check the credentials "
                                  "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and the "
                                  "bucket policy")
            return StoreError(f"{what} failed on {where}: HTTP {status} {code}: "
                              f"{e.response.get('Error', {}).get('Message', '')}".rstrip(": "))
        if isinstance(e, bexc.NoCredentialsError):
            return StoreError(f"{what}: no S3 credentials found; set AWS_ACCESS_KEY_ID and "
                              "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)")
        if isinstance(e, (bexc.EndpointConnectionError, bexc.ConnectTimeoutError)):
            return StoreError(f"{what}: cannot reach {where} after {self.max_attempts} attempts ({e}); "
                              "check the endpoint URL and that the server is up")
        return StoreError(f"{what} failed on {where} after {self.max_attempts} attempts: {e}")

    def _missing(self, e: BaseException) -> bool:
        if not isinstance(e, bexc.ClientError):
            return False
        return str(e.response.get("Error", {}).get("Code", "")) in _MISSING

    def _check_bucket(self, op: str, key: str) -> None:
        """After a HEAD 404 (which cannot tell a missing key from a missing bucket), make sure
        the bucket exists; checked once per store."""
        if self._bucket_ok:
            return
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except bexc.ClientError as e:
            if self._missing(e) or str(e.response.get("Error", {}).get("Code")) == "NoSuchBucket":
                raise StoreError(f"{op} {key}: bucket {self.bucket!r} does not exist ({self._where()}); "
                                 f"create it (S3ObjectStore.create_bucket(), or "
                                 f"`aws s3 mb s3://{self.bucket}`)") from None
            raise self._error(op, key, e) from None
        except (bexc.BotoCoreError, ConnectionError) as e:
            raise self._error(op, key, e) from None
        self._bucket_ok = True

    # -- the ObjectStore protocol ----------------------------------------------------------

    def _read(self, op: str, key: str, offset: int = 0,
              length: int | None = None) -> tuple[bytes, int | None]:
        """GET an object (or ``length`` bytes at ``offset``), retrying cut-off responses.
        Returns the bytes and the object's size (None if unknown).

        botocore retries failed requests, but not a body that stops short, nor headers cut off
        (which http.client may take for a complete response without a body): every response
        must carry a Content-Length (and for ranges a Content-Range) that the body matches.
        """
        args = {"Bucket": self.bucket, "Key": self._key(key)}
        if length is not None:
            args["Range"] = f"bytes={offset}-{offset + length - 1}"
        err: BaseException | None = None
        for attempt in range(self.max_attempts):
            if attempt:
                time.sleep(_BACKOFF.delay(attempt))
            try:
                resp = self.client.get_object(**args)
            except bexc.ClientError as e:
                if self._missing(e):
                    raise KeyError(key) from None
                if str(e.response.get("Error", {}).get("Code")) == "InvalidRange":
                    return b"", 0 if offset == 0 else None  # at or past the end, like pread
                raise self._error(op, key, e) from None
            except ValueError as e:  # botocore could not parse cut-off headers
                err = e
                continue
            except (bexc.BotoCoreError, ConnectionError) as e:  # botocore's retries are spent
                raise self._error(op, key, e) from None
            try:
                return _read_body(resp, offset, length, max_object_len(key), f"{op} {key} from {self._where()}")
            except _BODY_ERRORS as e:
                err = e
        raise self._error(op, key, err or RuntimeError("no attempt made"))

    def get(self, key: str) -> bytes:
        """The whole object. Raises KeyError if missing, StoreError on failure."""
        return self._read("get", key)[0]

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (fewer at the end of the object, b"" past it).

        Raises:
            ValueError: for a negative offset or length.
            KeyError: if the object is missing.
            StoreError: on any other failure.
        """
        if offset < 0 or length < 0:
            raise ValueError("negative range")
        if length == 0:
            if not self.contains(key):
                raise KeyError(key)
            return b""
        return self._read("get_range", key, offset, length)[0]

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` (multipart from ``multipart_threshold`` bytes).

        Raises:
            StoreError: on failure (the object is then absent or the old one).
        """
        s3key = self._key(key)
        try:
            if len(data) >= self.multipart_threshold:
                self.client.upload_fileobj(io.BytesIO(data), self.bucket, s3key, Config=self._transfer)
            else:
                self.client.put_object(Bucket=self.bucket, Key=s3key, Body=data)
        except (bexc.ClientError, bexc.BotoCoreError, ConnectionError) as e:
            # upload_fileobj re-raises the failing part's own exception
            raise self._error("put", key, e) from None

    def contains(self, key: str) -> bool:
        """Whether ``key`` exists (HEAD). Raises StoreError on failure or a missing bucket,
        ValueError for an invalid key."""
        s3key = self._key(key)  # before the loop: its ValueError is not a cut-off response
        err: BaseException | None = None
        for attempt in range(self.max_attempts):
            if attempt:
                time.sleep(_BACKOFF.delay(attempt))
            try:
                self.client.head_object(Bucket=self.bucket, Key=s3key)
                return True
            except bexc.ClientError as e:
                if self._missing(e):
                    self._check_bucket("contains", key)
                    return False
                raise self._error("contains", key, e) from None
            except ValueError as e:  # botocore could not parse cut-off headers
                err = e
            except (bexc.BotoCoreError, ConnectionError) as e:
                raise self._error("contains", key, e) from None
        raise self._error("contains", key, err or RuntimeError("no attempt made"))

    def size(self, key: str) -> int:
        """Bytes in object ``key``. Raises KeyError if missing, StoreError on failure.

        A 1-byte ranged GET, not a HEAD: a HEAD cut off inside its headers can carry a
        truncated Content-Length that nothing reveals; a body byte after the headers proves
        they arrived whole, and Content-Range carries the total.
        """
        total = self._read("size", key, 0, 1)[1]
        if total is None:
            raise StoreError(f"size {key}: {self._where()} did not report the object's size")
        return total

    def mtime(self, key: str) -> float:
        """When ``key`` was last written (seconds since the epoch, the server's clock: its
        LastModified). Raises KeyError if missing, StoreError on failure. gc uses it for its
        grace period and for the leases of running builds (``casfs.leases``)."""
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except bexc.ClientError as e:
            if self._missing(e):
                raise KeyError(key) from None
            raise self._error("mtime", key, e) from None
        except (bexc.BotoCoreError, ConnectionError, ValueError) as e:
            raise self._error("mtime", key, e) from None
        return head["LastModified"].timestamp()

    def delete(self, key: str) -> None:
        """Remove ``key``; removing a missing key is not an error."""
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except (bexc.ClientError, bexc.BotoCoreError, ConnectionError) as e:
            if self._missing(e):
                return
            raise self._error("delete", key, e) from None

    def list(self, prefix: str) -> Iterator[str]:
        """Keys (``kind/name``) starting with ``prefix`` (e.g. "tags/"), in key order."""
        base = f"{self.prefix}/" if self.prefix else ""
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=base + prefix,
                                           PaginationConfig={"PageSize": self.list_page_size}):
                for obj in page.get("Contents", ()):
                    yield obj["Key"][len(base):]
        except (bexc.ClientError, bexc.BotoCoreError, ConnectionError) as e:
            raise self._error("list", prefix, e) from None

    # -- administration --------------------------------------------------------------------

    def create_bucket(self) -> None:
        """Create the bucket (in ``self.region``); an existing bucket we own is fine.

        Raises:
            StoreError: when the name is taken by someone else or creation fails.
        """
        args: dict = {"Bucket": self.bucket}
        if self.region != "us-east-1":
            args["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self.client.create_bucket(**args)
        except bexc.ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code == "BucketAlreadyOwnedByYou":
                pass
            elif code == "BucketAlreadyExists":
                raise StoreError(f"bucket name {self.bucket!r} is taken by another account; "
                                 "choose another name") from None
            else:
                raise self._error("create_bucket", None, e) from None
        except (bexc.BotoCoreError, ConnectionError) as e:
            raise self._error("create_bucket", None, e) from None
        self._bucket_ok = True
