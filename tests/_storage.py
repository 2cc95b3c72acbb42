"""Object-store emulators on 127.0.0.1 for the storage tests: a Google Cloud Storage
emulator (gcp-storage-emulator) and an S3 one (moto's server mode), each on a free port, in
memory, with one bucket made. `emulator(kind)` starts one and returns the environment that
points every client at it:

* gs://: ``STORAGE_EMULATOR_HOST`` (gcsfs and google-cloud-storage, the latter used by
  tensorboardX), ``TENSORSTORE_GCS_HTTP_URL`` (tensorstore, which writes orbax's arrays),
  ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` (tensorstore's credentials: any string) and
  ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` (gcsfs would otherwise ask the storage-control
  API, which the emulator lacks, for the bucket's layout and warn on every call).

  The emulator implements no preconditions (``ifGenerationMatch``) and sends no
  ``x-goog-generation`` header with a download; real GCS does both and tensorstore (orbax's
  OCDBT manifests) and ddx's workdir lease rely on them. It also serves one connection at a
  time with a listen backlog of 5, so tensorstore's parallel requests are refused and retried
  with back-off (a checkpoint took 6x longer). `_patch_gcs_emulator` adds the preconditions
  and the header, and serves connections on threads; requests are still handled one at a
  time under one lock, so a precondition is checked and applied atomically, as on GCS.
* s3://: ``AWS_ENDPOINT_URL`` (boto3, s3fs and tensorstore), ``S3_ENDPOINT`` (tensorboardX),
  and any key id and secret (moto accepts all).

``python -m tests._storage gs|s3`` serves one until interrupted, printing its environment.
"""

from __future__ import annotations

import functools
import http.server
import logging
import os
import sys
import threading
import time
from http import HTTPStatus

from tests._tiny import free_port

BUCKET = "ddx-test"


class Emulator:
  def __init__(self, kind: str, bucket: str = BUCKET):
    self.kind, self.bucket = kind, bucket
    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    for name in ("gcp_storage_emulator", "werkzeug", "moto"):
      logging.getLogger(name).setLevel(logging.CRITICAL)
    if kind == "gs":
      from gcp_storage_emulator.server import create_server  # noqa: PLC0415

      _patch_gcs_emulator()
      self._server = create_server("127.0.0.1", self.port, in_memory=True, default_bucket=bucket)
      self.env = {
        "STORAGE_EMULATOR_HOST": self.url,
        "TENSORSTORE_GCS_HTTP_URL": self.url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
        "GOOGLE_CLOUD_PROJECT": "test",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
      }
    elif kind == "s3":
      from moto.server import ThreadedMotoServer  # noqa: PLC0415

      self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
      self.env = {
        "AWS_ENDPOINT_URL": self.url,
        "S3_ENDPOINT": self.url,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
      }
    else:
      raise ValueError(f"kind: 'gs' or 's3', got {kind!r}")

  def start(self) -> "Emulator":
    self._server.start()
    if self.kind == "s3":
      import boto3  # noqa: PLC0415

      boto3.client("s3", endpoint_url=self.url, region_name="us-east-1").create_bucket(Bucket=self.bucket)
    return self

  def stop(self) -> None:
    self._server.stop()

  def root(self, name: str) -> str:
    """``<kind>://<bucket>/<name>``."""
    return f"{self.kind}://{self.bucket}/{name}"


@functools.cache
def _patch_gcs_emulator() -> None:
  from gcp_storage_emulator import server  # noqa: PLC0415
  from gcp_storage_emulator.exceptions import NotFound  # noqa: PLC0415
  from gcp_storage_emulator.handlers import objects  # noqa: PLC0415

  lock = threading.RLock()

  def generation(storage, bucket, name):
    try:
      return str(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
      return None

  def holds(request, storage, name) -> bool:
    if name is None:
      return True
    q, cur = request.query, generation(storage, request.params["bucket_name"], name)
    if "ifGenerationMatch" in q:
      want = q["ifGenerationMatch"][0]
      if (cur is not None) if want == "0" else (cur != want):
        return False
    if "ifGenerationNotMatch" in q and cur == q["ifGenerationNotMatch"][0]:
      return False
    return True

  def upload_name(request):
    if "name" in request.query:
      return request.query["name"][0]
    data = request.data
    return data.get("meta", data).get("name") if isinstance(data, dict) else None

  def guarded(handler, name_of):
    def run(request, response, storage, *args, **kwargs):
      with lock:
        if not holds(request, storage, name_of(request)):
          response.status = HTTPStatus.PRECONDITION_FAILED
          response.json({"error": {"code": 412, "message": "conditionNotMet"}})
          return None
        return handler(request, response, storage, *args, **kwargs)

    return run

  def with_generation(handler):
    def run(request, response, storage, *args, **kwargs):
      out = handler(request, response, storage, *args, **kwargs)
      gen = generation(storage, request.params["bucket_name"], request.params["object_id"])
      if gen is not None and response.status == HTTPStatus.OK:
        response["x-goog-generation"] = gen
        response["x-goog-metageneration"] = "1"
      return out

    return run

  wrap = {
    objects.insert: guarded(objects.insert, upload_name),
    objects.delete: guarded(objects.delete, lambda r: r.params["object_id"]),
    objects.download: with_generation(objects.download),
    objects.get: with_generation(objects.get),  # ?alt=media downloads come here too
  }
  for _, handlers in server.HANDLERS:
    for method, h in list(handlers.items()):
      if h in wrap:
        handlers[method] = wrap[h]

  handle = server.Router.handle

  def handle_serially(self, method):
    with lock:
      return handle(self, method)

  server.Router.handle = handle_serially

  class Threaded(http.server.ThreadingHTTPServer):
    request_queue_size = 128

    def handle_error(self, request, client_address):
      pass  # a client that hung up early (tensorstore cancels reads it no longer needs)

  def run(self):
    self._httpd = Threaded((self._host, self._port), functools.partial(server.RequestHandler, self._storage))
    self.is_running.set()
    self._httpd.serve_forever()

  server.APIThread.run = run


if __name__ == "__main__":
  emu = Emulator(sys.argv[1]).start()
  print(" ".join(f"{k}={v}" for k, v in emu.env.items()), flush=True)
  try:
    while True:
      time.sleep(3600)
  except KeyboardInterrupt:
    emu.stop()
    os._exit(0)
