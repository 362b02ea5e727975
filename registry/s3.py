"""S3 backend (AWS, MinIO, Ceph, moto ...): conditional writes do the locking.

Create-only is ``PutObject`` with ``If-None-Match: *``; compare-and-swap is
``PutObject`` with ``If-Match: <etag>``. Retries and timeouts come from
botocore's config (standard retry mode), credentials from the standard chain.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import boto3
import botocore.exceptions as bexc
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from adapterctl.errors import (
    AdapterctlError,
    AlreadyExists,
    Conflict,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from adapterctl.registry.store import CHUNK_SIZE, ObjectInfo, ObjectStore, ProgressCallback, check_key

log = logging.getLogger(__name__)

_MISSING = {"NoSuchKey", "404", "NotFound"}
_PRECONDITION = {"PreconditionFailed", "ConditionalRequestConflict"}
_DENIED = {"AccessDenied", "403", "AllAccessDisabled"}
_BAD_CREDENTIALS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}
_UNREACHABLE = (bexc.ConnectionError, bexc.HTTPClientError)


@dataclass(frozen=True)
class S3Options:
    """Client settings; ``None`` means "from the environment / botocore default"."""

    endpoint_url: str | None = None  # else $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL
    path_style: bool | None = None  # None: path-style when an endpoint URL is set
    region: str | None = None  # else the standard chain ($AWS_REGION, profile ...)
    # boto3's default request checksums break MinIO/Ceph/B2; None: "when_required"
    # when an endpoint URL is set, botocore's default otherwise.
    checksums_when_required: bool | None = None
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    max_attempts: int = 3  # botocore standard mode: exponential backoff with jitter
    multipart_threshold: int = 64 << 20


class S3Store(ObjectStore):
    """An :class:`ObjectStore` over ``s3://bucket/prefix``."""

    def __init__(self, bucket: str, prefix: str = "", options: S3Options | None = None) -> None:
        if not bucket:
            raise InvalidArgument("S3 registry URI needs a bucket: s3://BUCKET/PREFIX")
        opts = options or S3Options()
        self.bucket = bucket
        self._prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.uri = f"s3://{bucket}/{self._prefix}"
        self.endpoint_url = (
            opts.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        )
        custom = bool(self.endpoint_url)
        path_style = custom if opts.path_style is None else opts.path_style
        when_required = custom if opts.checksums_when_required is None else opts.checksums_when_required
        checksum_args = (
            {"request_checksum_calculation": "when_required", "response_checksum_validation": "when_required"}
            if when_required
            else {}
        )
        config = Config(
            retries={"mode": "standard", "max_attempts": opts.max_attempts},
            connect_timeout=opts.connect_timeout,
            read_timeout=opts.read_timeout,
            s3={"addressing_style": "path" if path_style else "auto"},
            max_pool_connections=32,
            **checksum_args,
        )
        session = boto3.session.Session(region_name=opts.region)
        self._client = session.client("s3", endpoint_url=self.endpoint_url, config=config)
        self._transfer = TransferConfig(
            multipart_threshold=opts.multipart_threshold, multipart_chunksize=opts.multipart_threshold
        )

    # -- reads ---------------------------------------------------------------
    def get(self, key: str) -> tuple[bytes, str]:
        with self._errors(key):
            resp = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            return resp["Body"].read(), resp["ETag"]

    def head(self, key: str) -> ObjectInfo:
        with self._errors(key):
            resp = self._client.head_object(Bucket=self.bucket, Key=self._key(key))
        return ObjectInfo(key, resp["ContentLength"], resp["LastModified"].timestamp())

    def read_chunks(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        with self._errors(key):
            body = self._client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            with contextlib.closing(body):
                yield from body.iter_chunks(chunk_size)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        with self._errors(prefix):
            for page in self._pages(Prefix=self._prefix + prefix):
                for obj in page.get("Contents", []):
                    key = obj["Key"][len(self._prefix):]
                    yield ObjectInfo(key, obj["Size"], obj["LastModified"].timestamp())

    def list_dirs(self, prefix: str) -> Iterator[str]:
        with self._errors(prefix):
            for page in self._pages(Prefix=self._prefix + prefix, Delimiter="/"):
                for common in page.get("CommonPrefixes", []):
                    yield common["Prefix"][len(self._prefix) + len(prefix):].rstrip("/")

    # -- writes --------------------------------------------------------------
    def put(self, key: str, data: bytes) -> str:
        with self._errors(key):
            return self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)["ETag"]

    def put_if_absent(self, key: str, data: bytes) -> str:
        with self._errors(key, precondition=lambda: AlreadyExists(f"{key} already exists in {self.uri}")):
            return self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")["ETag"]

    def put_if_match(self, key: str, data: bytes, etag: str) -> str:
        def lost() -> Conflict:
            return Conflict(f"{key} was changed or deleted concurrently")

        with self._errors(key, precondition=lost, missing=lost):
            return self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfMatch=etag)["ETag"]

    def put_file(self, key: str, fileobj: BinaryIO, size: int, callback: ProgressCallback | None = None) -> None:
        with self._errors(key):
            self._client.upload_fileobj(fileobj, self.bucket, self._key(key), Callback=callback, Config=self._transfer)

    def delete(self, key: str) -> None:
        with self._errors(key):
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def touch(self, key: str) -> None:
        source = {"Bucket": self.bucket, "Key": self._key(key)}
        with self._errors(key):
            self._client.copy_object(
                Bucket=self.bucket, Key=self._key(key), CopySource=source, MetadataDirective="REPLACE"
            )

    def purge_incomplete(self, older_than: float) -> int:
        """Abort multipart uploads under the prefix started before ``older_than``."""
        aborted = 0
        with self._errors(self._prefix):
            paginator = self._client.get_paginator("list_multipart_uploads")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._prefix):
                for upload in page.get("Uploads", []):
                    if upload["Initiated"].timestamp() < older_than:
                        self._client.abort_multipart_upload(
                            Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                        )
                        aborted += 1
        return aborted

    # -- helpers -------------------------------------------------------------
    def _key(self, key: str) -> str:
        return self._prefix + check_key(key)

    def _pages(self, **kwargs) -> Iterator[dict]:
        return self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, **kwargs)

    @contextlib.contextmanager
    def _errors(
        self,
        key: str,
        precondition: Callable[[], AdapterctlError] | None = None,
        missing: Callable[[], AdapterctlError] | None = None,
    ) -> Iterator[None]:
        """Translate botocore exceptions into the domain errors of :mod:`adapterctl.errors`."""
        try:
            yield
        except bexc.ClientError as exc:
            raise self._translate(exc, key, precondition, missing) from exc
        except (bexc.NoCredentialsError, bexc.PartialCredentialsError) as exc:
            raise Unauthenticated(f"no usable AWS credentials for {self.uri}: {exc}") from exc
        except _UNREACHABLE as exc:
            raise Unavailable(f"S3 endpoint {self.endpoint_url or 'AWS'} unreachable for {self.uri}: {exc}") from exc

    def _translate(self, exc: bexc.ClientError, key: str, precondition, missing) -> AdapterctlError:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        if precondition and (code in _PRECONDITION or status in (409, 412)):
            return precondition()
        if code == "NoSuchBucket":
            return NotFound(f"S3 bucket {self.bucket!r} does not exist{where} (registry {self.uri})")
        if code in _MISSING:
            return missing() if missing else NotFound(f"{key} not found in {self.uri}")
        if code in _DENIED:
            return PermissionDenied(f"access denied to {self.uri}{key}{where}")
        if code in _BAD_CREDENTIALS:
            return Unauthenticated(f"S3 rejected the credentials for {self.uri}{where}: {code}")
        if status >= 500:
            return Unavailable(f"S3{where} failed on {key} after retries: {code or status}")
        return AdapterctlError(
            f"S3 error on {self.uri}{key}: {code or status}: {error.get('Message', '')}".rstrip(": ")
        )
