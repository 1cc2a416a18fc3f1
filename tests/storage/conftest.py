"""Storage fixtures: a real S3-compatible server (moto) on loopback."""

from __future__ import annotations

import logging
import os
import threading

import pytest


class _OneRequestAtATime:
    """moto checks ``If-None-Match`` and then stores the object in two steps on a threaded
    server, so two racing conditional PUTs can both succeed there; S3 does both atomically.
    Handling one request at a time gives the test server S3's atomicity, so the race tests
    measure the writer's protocol and not moto's."""

    def __init__(self, app):
        self.app, self.lock = app, threading.Lock()

    def __call__(self, environ, start_response):
        with self.lock:
            return list(self.app(environ, start_response))


@pytest.fixture(scope="module")
def s3_server():
    """``s3://labels/run?...``: a URI into bucket ``labels`` of a moto server on loopback."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
    server = make_server(
        "127.0.0.1",
        0,
        _OneRequestAtATime(DomainDispatcherApplication(create_backend_app)),
        threaded=True,
        request_handler=MotoRequestHandler,
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    import boto3

    boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1").create_bucket(Bucket="labels")
    yield f"s3://labels/run?endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    server.shutdown()
    thread.join()
