"""A real S3-compatible server on localhost for the object-storage tests (moto's server mode).

Not a mock of the client: s3fs/botocore speak HTTP to a moto server in a thread of the
test process, exactly as they would to S3, MinIO or Ceph. Credentials and the endpoint
reach the clients the way a user's do, through the usual AWS environment variables
(``AWS_ENDPOINT_URL`` is honoured by botocore >= 1.31), so every process the tests
start, Ray workers included, finds the same server.
"""

from __future__ import annotations

import os
import socket

import pytest

ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def skip_without_s3():
    """Skip (with the install line) where the object-storage test extras are absent."""
    for module in ("s3fs", "moto.server", "boto3"):
        pytest.importorskip(module, reason="the object-storage tests need s3fs and moto[server]: "
                                           "pip install -e '.[test]'")


class S3Server:
    """A moto S3 server; :meth:`env` is what a process needs to reach it, :meth:`upload` fills a bucket."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)

    def env(self) -> dict:
        return dict(ENV, AWS_ENDPOINT_URL=self.endpoint, AWS_ENDPOINT_URL_S3=self.endpoint)

    def start(self) -> "S3Server":
        import logging

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, **{k.lower(): v for k, v in ENV.items()
                                                                   if k != "AWS_DEFAULT_REGION"},
                            region_name=ENV["AWS_DEFAULT_REGION"])

    def bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def upload(self, folder, url: str) -> str:
        """Every file under ``folder`` to ``url`` (``s3://bucket/prefix``), keeping relative paths."""
        bucket, _, prefix = url[len("s3://"):].partition("/")
        client = self.client()
        folder = os.fspath(folder)
        for dirpath, _, files in os.walk(folder):
            for f in files:
                path = os.path.join(dirpath, f)
                key = "/".join(p for p in (prefix.strip("/"), os.path.relpath(path, folder).replace(os.sep, "/")) if p)
                client.upload_file(path, bucket, key)
        return url.rstrip("/")


@pytest.fixture(scope="session")
def s3_server():
    """A started :class:`S3Server` with its credentials and endpoint in this process's environment."""
    skip_without_s3()
    from s3fs import S3FileSystem

    server = S3Server().start()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    S3FileSystem.clear_instance_cache()  # an s3fs made before this server would not know its endpoint
    try:
        yield server
    finally:
        server.stop()
        S3FileSystem.clear_instance_cache()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
