"""lifecycle: the object store deletes the pipeline's intermediate artifacts after N days.

    python -m components.lifecycle --root s3://mlpipeline/v2/artifacts --days 30
    python -m components.lifecycle --root s3://mlpipeline/v2/artifacts --show

KFP writes every step's outputs (prepared datasets, models, reports) under the pipeline root
and never deletes them. A bucket lifecycle rule (S3 and MinIO both keep them) makes the store
itself expire every object under the root's prefix N days after it was written: nothing has to
run on a schedule. The registry must not lie under that prefix (its versions would expire);
`--protect` names what must survive and is checked. The rule is ours by its ID: applying again
replaces it (a new expiry), other rules on the bucket are kept. `manifests/retention/` runs
this as a Kubernetes Job.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from urllib.parse import urlparse

from minio.commonconfig import ENABLED, Filter
from minio.lifecycleconfig import Expiration, LifecycleConfig, Rule

from components import storage
from components.cli import configure_logging, exit_on_user_error

log = logging.getLogger(__name__)

RULE_PREFIX = "efficientnet-retrain-expire"


class LifecycleError(RuntimeError):
    """The rule cannot be applied: a bad root, a protected prefix under it, a store error."""


@dataclass(frozen=True)
class ExpiryConfig:
    root: str  # s3://bucket/prefix or minio://bucket/prefix: the pipeline root's artifacts
    days: int  # objects under it expire this many days after they were written
    protect: tuple[str, ...] = ()  # URIs that must not lie under root (the registry)

    def __post_init__(self) -> None:
        if self.days < 1:
            raise LifecycleError(f"--days must be 1 or more, got {self.days}")


def rule_id(prefix: str) -> str:
    return f"{RULE_PREFIX}:{prefix or '(whole bucket)'}"[:255]


def _folder(uri: str) -> storage.ObjectStoreFolder:
    if urlparse(uri).scheme not in storage.OBJECT_STORE_SCHEMES:
        raise LifecycleError(
            f"{uri} is not an s3:// or minio:// prefix: lifecycle rules live in an object store"
        )
    try:
        return storage.ObjectStoreFolder(uri)
    except storage.StorageError as error:
        raise LifecycleError(str(error)) from None


def check_protected(root: storage.ObjectStoreFolder, protect: tuple[str, ...]) -> None:
    """Refuse a root whose prefix covers a protected location (an empty prefix covers all)."""
    for uri in protect:
        other = _folder(uri)
        inside = other.bucket == root.bucket and (
            not root.prefix or other.prefix == root.prefix or other.prefix.startswith(root.list_prefix)
        )
        if inside:
            raise LifecycleError(
                f"{uri} lies under {root.uri}: its objects would expire too; give the pipeline root "
                "a prefix of its own (e.g. s3://mlpipeline/v2/artifacts) or keep the registry elsewhere"
            )


def apply(config: ExpiryConfig) -> list[Rule]:
    """Set our expiry rule for the root's prefix, keeping the bucket's other rules; the rules
    as the store holds them afterwards."""
    root = _folder(config.root)
    check_protected(root, config.protect)
    ours = Rule(
        ENABLED,
        rule_filter=Filter(prefix=root.list_prefix),
        rule_id=rule_id(root.list_prefix),
        expiration=Expiration(days=config.days),
    )
    current = root._call(root.client.get_bucket_lifecycle, root.bucket)
    others = [rule for rule in (current.rules if current else []) if rule.rule_id != ours.rule_id]
    root._call(root.client.set_bucket_lifecycle, root.bucket, LifecycleConfig([*others, ours]))
    log.info("objects under %s now expire %d days after they are written", config.root, config.days)
    return show(config.root)


def show(uri: str) -> list[Rule]:
    root = _folder(uri)
    current = root._call(root.client.get_bucket_lifecycle, root.bucket)
    return list(current.rules) if current else []


def describe(rule: Rule) -> str:
    prefix = rule.rule_filter.prefix if rule.rule_filter else None
    days = rule.expiration.days if rule.expiration else None
    return f"{rule.rule_id or '(no id)'}: prefix {prefix!r}, {rule.status}, expire after {days} days"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="the pipeline root's artifacts: s3://bucket/prefix")
    parser.add_argument("--days", type=int, default=None, help="expire objects this many days after writing")
    parser.add_argument(
        "--protect",
        action="append",
        default=[],
        help="a location that must not lie under --root (repeatable)",
    )
    parser.add_argument(
        "--show", action="store_true", help="print the bucket's lifecycle rules and change nothing"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging()
    if not args.show and args.days is None:
        parser.error("give --days N, or --show")
    with exit_on_user_error(LifecycleError, storage.StorageError):
        rules = (
            show(args.root)
            if args.show
            else apply(ExpiryConfig(root=args.root, days=args.days, protect=tuple(args.protect)))
        )
    for rule in rules:
        print(describe(rule))
    if not rules:
        print(f"no lifecycle rules on the bucket of {args.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
