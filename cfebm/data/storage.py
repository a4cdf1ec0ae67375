"""fsspec access with ``storage_options`` and storage failures turned into DataError.

Every path in the data pipeline may be local or any fsspec URL (``s3://`` with the endpoint
and credentials from the environment, as s3fs/botocore read them, or from
``storage_options``). Nothing here assumes a local file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from cfebm.data.errors import DataError

# botocore's names for "no usable credentials"; matched by name so this module does not
# import botocore (it is only present with s3fs).
_CREDENTIAL_ERRORS = {
    "NoCredentialsError",
    "PartialCredentialsError",
    "CredentialRetrievalError",
    "NoAuthTokenError",
}


def filesystem(
    url: str, storage_options: dict | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for ``url`` and the path inside it; unknown protocols raise DataError."""
    from cfebm.io import fs_and_path

    try:
        return fs_and_path(url, storage_options)
    except (ImportError, ValueError, TypeError) as e:
        raise DataError(f"cannot open {url}: {e}") from e


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def to_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A URL for ``path`` inside ``fs`` that a user can paste (for messages and manifests)."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


_UNREACHABLE_ERRORS = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ConnectionClosedError",
    "ClientConnectorError",
    "ServerTimeoutError",
}


def is_unreachable_error(error: BaseException) -> bool:
    """The storage endpoint did not answer (a wrong or unreachable AWS_ENDPOINT_URL)."""
    return type(error).__name__ in _UNREACHABLE_ERRORS or isinstance(
        error, (ConnectionRefusedError, TimeoutError)
    )


def unreachable_message(error: BaseException) -> str:
    import os

    endpoint = getattr(error, "kwargs", {}).get("endpoint_url") or os.environ.get(
        "AWS_ENDPOINT_URL", "the default AWS endpoint"
    )
    endpoint = endpoint.split("/", 3)[:3]
    return (
        f"the storage endpoint {'/'.join(endpoint)} does not answer; check "
        "AWS_ENDPOINT_URL (or storage_options.endpoint_url) and that the server runs"
    )


def is_credentials_error(error: BaseException) -> bool:
    return type(error).__name__ in _CREDENTIAL_ERRORS


@contextlib.contextmanager
def storage_errors(url: str, what: str = "access") -> Iterator[None]:
    """Re-raise missing objects, denied access, missing credentials and an endpoint that
    does not answer as one DataError naming ``url``."""
    try:
        yield
    except DataError:
        raise
    except FileNotFoundError as e:
        raise DataError(f"cannot {what} {url}: not found") from e
    except PermissionError as e:
        raise DataError(f"cannot {what} {url}: access denied ({e})") from e
    except Exception as e:
        if is_unreachable_error(e):
            raise DataError(f"cannot {what} {url}: {unreachable_message(e)}") from None
        if is_credentials_error(e):
            raise DataError(
                f"cannot {what} {url}: no credentials ({e}); set AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for a non-AWS store) or pass "
                "them in storage_options"
            ) from e
        raise
