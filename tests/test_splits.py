"""The split on its own (no images, no TensorFlow): exact per class, stable, duplicates together."""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from pathlib import Path

import pytest

from components.preprocess import PreprocessConfig, Processed, assign_splits

CONFIG = PreprocessConfig(source="unused", output=Path("unused"))


def image(label: int, name: str, content: str | None = None) -> Processed:
    digest = hashlib.sha256((content or name).encode()).hexdigest()
    return Processed(key=f"{label}/{name}", label=label, digest=digest)


def counts(images: list[Processed], splits: dict[str, str]) -> dict[tuple[int, str], int]:
    return Counter((item.label, splits[item.key]) for item in images)


@pytest.mark.parametrize("sizes", [[40, 40, 40], [3, 5, 7], [70, 70], [13, 200, 9, 31], [1000, 4]])
def test_every_class_gets_its_share_within_one_image(sizes):
    images = [image(label, f"{label}-img-{i}") for label, n in enumerate(sizes) for i in range(n)]
    splits = assign_splits(images, CONFIG)
    got = counts(images, splits)
    for label, n in enumerate(sizes):
        for split, fraction in (("test", CONFIG.test_fraction), ("validation", CONFIG.validation_fraction)):
            share = got[(label, split)]
            assert share >= 1, (label, split)
            assert abs(share - n * fraction) <= 1, (label, split, share, n)
        assert got[(label, "train")] >= 1


def test_the_issue_case_120_images_in_three_classes():
    """Before: test 8 / validation 11 on 120 images, a class holding half the test set."""
    images = [image(label, f"{label}-img-{i}") for label in range(3) for i in range(40)]
    got = counts(images, assign_splits(images, CONFIG))
    assert [got[(label, "test")] for label in range(3)] == [4, 4, 4]
    assert [got[(label, "validation")] for label in range(3)] == [4, 4, 4]


def test_the_same_input_gives_the_same_split_in_any_order():
    images = [image(label, f"{label}-img-{i}") for label in range(3) for i in range(50)]
    shuffled = images[:]
    random.Random(1).shuffle(shuffled)
    assert assign_splits(images, CONFIG) == assign_splits(shuffled, CONFIG)


def test_adding_an_image_moves_at_most_one_other_into_each_split():
    """When both shares grow by one and the new image lands in training, two images must leave
    training; each of the other splits still receives at most one, and none moves between
    test and validation."""
    rng = random.Random(7)
    for trial in range(200):
        n = rng.randint(3, 120)
        images = [image(0, f"t{trial}-{i}") for i in range(n)]
        before = assign_splits(images, CONFIG)
        added = image(0, f"t{trial}-new")
        after = assign_splits([*images, added], CONFIG)
        moved = Counter((before[k], after[k]) for k in before if before[k] != after[k])
        into = Counter(new for _, new in moved.elements())
        assert all(count <= 1 for count in into.values()), (n, moved)
        assert not moved[("test", "validation")] and not moved[("validation", "test")], (n, moved)


def test_duplicates_share_a_split_and_count_as_many_images():
    images = [image(0, f"img-{i}") for i in range(30)]
    copies = [image(0, f"copy-{i}", content=f"img-{i % 5}") for i in range(10)]
    splits = assign_splits(images + copies, CONFIG)
    for copy in copies:
        original = f"0/img-{int(copy.key.split('-')[1]) % 5}"
        assert splits[copy.key] == splits[original]
    got = counts(images + copies, splits)
    assert got[(0, "train")] >= 1 and got[(0, "test")] >= 1 and got[(0, "validation")] >= 1


def test_the_same_pixels_in_two_classes_share_a_split():
    images = [image(0, f"a-{i}") for i in range(20)] + [image(1, f"b-{i}") for i in range(20)]
    conflicts = [image(1, f"dup-{i}", content=f"a-{i}") for i in range(20)]
    splits = assign_splits(images + conflicts, CONFIG)
    for i in range(20):
        assert splits[f"1/dup-{i}"] == splits[f"0/a-{i}"]


def test_with_no_test_fraction_there_is_no_test_split():
    config = PreprocessConfig(source="unused", output=Path("unused"), test_fraction=0.0)
    images = [image(0, f"img-{i}") for i in range(30)]
    got = counts(images, assign_splits(images, config))
    assert got[(0, "test")] == 0 and got[(0, "validation")] == 3
