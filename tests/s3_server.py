"""A real HTTP S3 endpoint for tests: moto's server in its own process, standing in for MinIO.

Credentials are enforced: the server answers the first three requests without checking them
(to create an IAM user, its access key and its S3 policy), and checks every request after that.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import urllib3


@dataclass(frozen=True)
class S3Server:
    url: str
    access_key: str
    secret_key: str
    process: subprocess.Popen

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
        }

    def client(self):
        from components.storage import endpoint_from_env, make_client

        return make_client(endpoint_from_env(self.env()))

    def upload_folder(self, folder: Path, bucket: str, prefix: str) -> None:
        client = self.client()
        if not client.bucket_exists(bucket):
            client.make_bucket(bucket)
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                client.fput_object(bucket, f"{prefix}/{path.relative_to(folder).as_posix()}", str(path))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# moto.server's own main, but serving one request at a time. MinIO and S3 apply a conditional
# write (If-None-Match, If-Match) as one atomic step; moto checks the condition and then
# writes, and with a thread per request two racing writers can both pass the check. Serialised,
# moto keeps the guarantee the registry relies on, and the concurrency tests test our code.
ONE_AT_A_TIME = """
import os, sys
from werkzeug.serving import run_simple
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from moto.moto_server.threaded_moto_server import MotoRequestHandler
os.environ.setdefault("MOTO_PORT", sys.argv[1])
run_simple("127.0.0.1", int(sys.argv[1]), DomainDispatcherApplication(create_backend_app),
           threaded=False, request_handler=MotoRequestHandler)
"""


def start(one_request_at_a_time: bool = False) -> S3Server:
    import boto3

    port = _free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    command = (
        [sys.executable, "-c", ONE_AT_A_TIME, str(port)]
        if one_request_at_a_time
        else [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    )
    process = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    http = urllib3.PoolManager()
    for _ in range(100):
        try:
            http.request("GET", url + "/moto-api/", timeout=1, retries=False)
            break
        except urllib3.exceptions.HTTPError:
            time.sleep(0.1)
    else:
        process.kill()
        raise RuntimeError("moto server did not start")
    iam = boto3.client(
        "iam",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="bootstrap",
        aws_secret_access_key="bootstrap",
    )
    iam.create_user(UserName="pipeline")
    key = iam.create_access_key(UserName="pipeline")["AccessKey"]
    iam.put_user_policy(
        UserName="pipeline",
        PolicyName="s3",
        PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        ),
    )
    return S3Server(
        url=url, access_key=key["AccessKeyId"], secret_key=key["SecretAccessKey"], process=process
    )
