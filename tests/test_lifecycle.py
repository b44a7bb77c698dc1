"""Expiry of the pipeline root's artifacts: lifecycle rules set on a real HTTP S3 endpoint
(moto's server, standing in for MinIO) and read back. moto stores the rules and does not run
them: that objects then expire is the store's part, not tested here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from minio.commonconfig import ENABLED, Filter
from minio.lifecycleconfig import Expiration, LifecycleConfig, Rule

from components import lifecycle

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bucket(s3_env, request):
    name = "life-" + request.node.name.split("[")[0][-20:].replace("_", "-").strip("-")
    s3_env.client().make_bucket(name)
    return name


def rules_of(bucket: str) -> dict[str, tuple[str, int]]:
    return {
        rule.rule_id: (rule.rule_filter.prefix, rule.expiration.days)
        for rule in lifecycle.show(f"s3://{bucket}")
    }


def test_the_rule_is_set_replaced_on_a_second_apply_and_others_are_kept(bucket, s3_env):
    s3_env.client().set_bucket_lifecycle(
        bucket,
        LifecycleConfig(
            [
                Rule(
                    ENABLED,
                    rule_filter=Filter(prefix="logs/"),
                    rule_id="theirs",
                    expiration=Expiration(days=7),
                )
            ]
        ),
    )
    lifecycle.apply(lifecycle.ExpiryConfig(root=f"s3://{bucket}/v2/artifacts", days=30))
    ours = lifecycle.rule_id("v2/artifacts/")
    assert rules_of(bucket) == {"theirs": ("logs/", 7), ours: ("v2/artifacts/", 30)}
    lifecycle.apply(lifecycle.ExpiryConfig(root=f"s3://{bucket}/v2/artifacts", days=14))
    assert rules_of(bucket) == {"theirs": ("logs/", 7), ours: ("v2/artifacts/", 14)}


@pytest.mark.parametrize(
    ("root", "registry"),
    [
        ("s3://{b}", "s3://{b}/registry"),
        ("s3://{b}/v2", "s3://{b}/v2/registry"),
        ("s3://{b}/v2", "s3://{b}/v2"),
    ],
)
def test_a_root_covering_the_registry_is_refused_and_nothing_is_set(bucket, root, registry):
    with pytest.raises(lifecycle.LifecycleError, match="would expire too"):
        lifecycle.apply(
            lifecycle.ExpiryConfig(root=root.format(b=bucket), days=30, protect=(registry.format(b=bucket),))
        )
    assert lifecycle.show(f"s3://{bucket}") == []


def test_a_registry_beside_the_root_is_fine(bucket):
    config = lifecycle.ExpiryConfig(root=f"s3://{bucket}/v2", days=30, protect=(f"s3://{bucket}/v2registry",))
    assert [rule.rule_filter.prefix for rule in lifecycle.apply(config)] == ["v2/"]


def test_the_cli_applies_shows_and_refuses_nonsense(bucket, s3_env):
    import os

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "components.lifecycle", *args], cwd=ROOT, capture_output=True, text=True,
            env={**os.environ, **s3_env.env()},
        )  # fmt: skip

    applied = cli("--root", f"s3://{bucket}/v2/artifacts", "--days", "30")
    assert applied.returncode == 0, applied.stderr
    assert "prefix 'v2/artifacts/', Enabled, expire after 30 days" in applied.stdout
    assert "expire after 30 days" in cli("--root", f"s3://{bucket}", "--show").stdout
    assert cli("--root", f"s3://{bucket}/x", "--days", "0").stderr.count("--days must be 1 or more") == 1
    local = cli("--root", "/tmp/artifacts", "--days", "3")
    assert local.returncode == 2 and "is not an s3:// or minio:// prefix" in local.stderr
    missing = cli("--root", "s3://no-such-bucket-here/v2", "--days", "3")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
