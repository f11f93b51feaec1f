"""The data engine (ulframe.data) and the built-in dataset plugins (photos, image_folder)."""

from __future__ import annotations

import io
import itertools
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ulframe.data import (
    MAX_LEADING_FAILURES,
    Dataset,
    EmptyDatasetError,
    Source,
    build_loader,
    first_example,
    sample_rng,
    shard_indices,
)
from ulframe_plugins.datasets.image_folder import ImageFolder
from ulframe_plugins.datasets.photos import PHOTOGRAPHS, Photos, split_column


class CountingSource:
    """A fake source: item i decodes to a (1, 2, 2) image of value i/10⁴ (within [-1, 1], which
    the engine checks) plus seeded noise, label i; items listed in ``bad`` are unreadable."""

    def __init__(self, n: int, bad: frozenset[int] = frozenset()) -> None:
        self.items = list(range(n))
        self.bad = bad

    def decode(self, item: int):
        if item in self.bad:
            return None
        noise = float(sample_rng().normal())
        return {"x": torch.full((1, 2, 2), (float(item) + 1e-3 * noise) / 1e4), "label": item}


def take(loader, count: int):
    return list(itertools.islice(iter(loader), count))


def assert_same_batches(left, right):
    assert len(left) == len(right)
    for a, b in zip(left, right):
        assert torch.equal(a["label"], b["label"])
        assert torch.equal(a["x"], b["x"])


def labels_of(loader) -> list[int]:
    return [int(label) for batch in loader for label in batch["label"]]


# ---- engine ---------------------------------------------------------------------------------


def test_protocols_are_satisfied(tmp_path):
    write_tree(tmp_path, with_val=True)
    for dataset in (Photos(crops_per_epoch=8, eval_crops=8), ImageFolder(root=str(tmp_path))):
        assert isinstance(dataset, Dataset)
        assert isinstance(dataset.source("train"), Source)
    assert not isinstance(object(), Source)


def test_shards_are_disjoint_and_cover_each_epoch():
    for epoch in range(3):
        rank0 = shard_indices(11, epoch=epoch, seed=5, rank=0, world_size=2)
        rank1 = shard_indices(11, epoch=epoch, seed=5, rank=1, world_size=2)
        assert not set(rank0.tolist()) & set(rank1.tolist())
        assert sorted(rank0.tolist() + rank1.tolist()) == list(range(11))
    # Reshuffled each epoch, and the same on every call (ranks agree without talking).
    assert not np.array_equal(
        shard_indices(50, epoch=0, seed=5, rank=0, world_size=2),
        shard_indices(50, epoch=1, seed=5, rank=0, world_size=2),
    )
    assert np.array_equal(
        shard_indices(50, epoch=1, seed=5, rank=1, world_size=2),
        shard_indices(50, epoch=1, seed=5, rank=1, world_size=2),
    )


def test_loaders_of_two_ranks_split_one_pass():
    source = CountingSource(13)
    seen = [
        labels_of(
            build_loader(
                source, batch_size=2, rank=rank, world_size=2, repeat=False, drop_last=False
            )
        )
        for rank in (0, 1)
    ]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(13))
    assert seen[0] != sorted(seen[0])  # shuffled


def test_batches_have_engine_shapes_and_types():
    loader = build_loader(CountingSource(10), batch_size=4, repeat=False, drop_last=False)
    batches = list(loader)
    assert [b["x"].shape for b in batches] == [(4, 1, 2, 2), (4, 1, 2, 2), (2, 1, 2, 2)]
    assert all(b["x"].dtype == torch.float32 and b["label"].dtype == torch.int64 for b in batches)
    assert len(list(build_loader(CountingSource(10), batch_size=4, repeat=False))) == 2


def test_eval_pass_is_unshuffled_and_repeatable():
    loader = build_loader(
        CountingSource(7), batch_size=3, shuffle=False, repeat=False, drop_last=False
    )
    assert labels_of(loader) == list(range(7))
    assert labels_of(loader) == list(range(7))


def test_repeat_crosses_epochs_and_reshuffles():
    loader = build_loader(CountingSource(6), batch_size=3, seed=1)
    labels = [int(x) for batch in take(loader, 4) for x in batch["label"]]
    first, second = labels[:6], labels[6:]
    assert sorted(first) == sorted(second) == list(range(6))
    assert first != second


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_gives_the_same_next_batches(num_workers):
    source = CountingSource(10, bad=frozenset({3}))  # 9 readable: epochs end mid-batch

    def make():
        return build_loader(source, batch_size=4, seed=3, num_workers=num_workers, prefetch=2)

    loader = make()
    it = iter(loader)
    for _ in range(5):  # 20 examples: into the third epoch
        next(it)
    state = loader.state_dict()
    skipped = loader.skipped
    buffer = io.BytesIO()
    torch.save(state, buffer)  # checkpoints hold it and load it with weights_only=True
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    expected = [next(it) for _ in range(6)]  # crosses two more epoch boundaries

    resumed = make()
    resumed.load_state_dict(state)
    assert_same_batches(take(resumed, 6), expected)
    assert skipped >= 2 and resumed.skipped >= skipped


def test_worker_count_does_not_change_the_stream():
    source = CountingSource(12)
    reference = take(build_loader(source, batch_size=5, seed=2, num_workers=0), 5)
    threaded = take(build_loader(source, batch_size=5, seed=2, num_workers=2), 5)
    assert_same_batches(threaded, reference)


def test_unreadable_items_are_dropped_and_counted(caplog):
    source = CountingSource(10, bad=frozenset({1, 4, 7}))
    loader = build_loader(source, batch_size=3, repeat=False, drop_last=False, prefetch=0)
    with caplog.at_level(logging.WARNING, logger="ulframe.data"):
        labels = labels_of(loader)
    assert sorted(labels) == [0, 2, 3, 5, 6, 8, 9]
    assert loader.skipped == 3
    assert "1 unreadable items skipped" in caplog.text


def test_all_unreadable_and_empty_sources_raise():
    hopeless = CountingSource(MAX_LEADING_FAILURES + 5, bad=frozenset(range(1000)))
    with pytest.raises(EmptyDatasetError, match="none of the first"):
        next(iter(build_loader(hopeless, batch_size=2)))
    with pytest.raises(EmptyDatasetError, match="none of the first"):
        first_example(hopeless)
    with pytest.raises(EmptyDatasetError, match="no items"):
        first_example(CountingSource(0))
    with pytest.raises(EmptyDatasetError):
        build_loader(CountingSource(0), batch_size=2)
    with pytest.raises(EmptyDatasetError, match="rank 2"):
        build_loader(CountingSource(2), batch_size=1, rank=2, world_size=3)


def test_first_example_skips_unreadable_items():
    example = first_example(CountingSource(5, bad=frozenset({0, 1})))
    assert example["label"] == 2 and example["x"].shape == (1, 2, 2)


def test_process_workers_decode_a_plugin_source():
    # method="process" pickles the Source into a spawned interpreter that reloads the photos.
    # One worker: each spawned worker costs ~3 s of imports here (two would cost ~6 s).
    source = Photos(resolution=8, crops_per_epoch=12, seed=4).source("train")
    kwargs = {"batch_size": 4, "seed": 1, "repeat": False}
    reference = list(build_loader(source, **kwargs))
    spawned = list(build_loader(source, num_workers=1, method="process", **kwargs))
    assert_same_batches(spawned, reference)


# ---- datasets.photos --------------------------------------------------------------------------


def test_photos_decode_real_pixels():
    dataset = Photos(resolution=16, crops_per_epoch=32, eval_crops=8)
    assert dataset.num_classes == len(PHOTOGRAPHS) == 8
    source = dataset.source("train")
    labels = set()
    for item in source.items[:16]:
        example = source.decode(item)
        x = example["x"]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32
        assert x.min() >= -1.0 and x.max() <= 1.0
        labels.add(example["label"])
    assert labels == set(range(8))
    assert any(source.decode(item)["x"].std() > 0.05 for item in source.items[:8])


def test_photos_are_deterministic_per_seed():
    first = Photos(crops_per_epoch=16, seed=7).source("train")
    again = Photos(crops_per_epoch=16, seed=7).source("train")
    other = Photos(crops_per_epoch=16, seed=8).source("train")
    assert first.items == again.items
    assert first.items != other.items
    assert torch.equal(first.decode(first.items[3])["x"], again.decode(again.items[3])["x"])


def test_photos_train_and_eval_crops_come_from_disjoint_columns():
    from ulframe_plugins.datasets.photos import load_photographs

    dataset = Photos(crops_per_epoch=400, eval_crops=200)
    widths = [photo.size[0] for photo in load_photographs()]
    for crop in dataset.source("train").items:
        assert crop.box[2] <= split_column(widths[crop.photo])
    for crop in dataset.source("eval").items:
        assert crop.box[0] >= split_column(widths[crop.photo])
        assert crop.box[2] <= widths[crop.photo]


def test_photos_reject_empty_splits():
    with pytest.raises(EmptyDatasetError, match=r"datasets\.photos\.eval_crops"):
        Photos(eval_crops=0).source("eval")


# ---- datasets.image_folder --------------------------------------------------------------------

COLORS = {"ant": (255, 0, 0), "bee": (0, 255, 0), "cat": (0, 0, 255)}  # sorted: labels 0, 1, 2


def write_tree(root, *, with_val: bool, per_class: int = 3):
    """root/train/<class>/*.png in the class colour, plus an empty hidden folder."""
    for name, color in COLORS.items():
        folder = root / "train" / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            size = (20 + 3 * i, 14)  # not square: exercises resize + crop
            Image.new("RGB", size, color).save(folder / f"{i}.png")
        if with_val:
            (root / "val" / name).mkdir(parents=True)
            Image.new("RGB", (12, 18), color).save(root / "val" / name / "v.png")
    (root / "train" / ".cache").mkdir()
    (root / "train" / "ant" / "notes.txt").write_text("not an image")


def add_broken_files(root):
    rng = np.random.default_rng(0)
    (root / "train" / "bee" / "corrupt.jpg").write_bytes(rng.bytes(300))
    good = root / "train" / "cat" / "0.png"
    data = good.read_bytes()
    (root / "train" / "cat" / "truncated.png").write_bytes(data[: len(data) // 2])


def test_image_folder_labels_batches_and_skips(tmp_path, caplog):
    write_tree(tmp_path, with_val=True)
    add_broken_files(tmp_path)
    dataset = ImageFolder(root=str(tmp_path), resolution=8)
    assert dataset.num_classes == 3
    source = dataset.source("train")
    assert len(source.items) == 11  # 9 good + 2 broken; notes.txt is not an image
    for path, label in source.items:
        assert label == sorted(COLORS).index(os.path.basename(os.path.dirname(path)))

    loader = build_loader(source, batch_size=4, num_workers=2, repeat=False, drop_last=False)
    with caplog.at_level(logging.WARNING):
        batches = list(loader)
    assert [b["x"].shape for b in batches] == [(4, 3, 8, 8), (4, 3, 8, 8), (1, 3, 8, 8)]
    assert loader.skipped == 2
    assert "corrupt.jpg" in caplog.text and "truncated.png" in caplog.text
    for batch in batches:  # each image's dominant channel is its class colour
        channel = batch["x"].mean(dim=(2, 3)).argmax(dim=1)
        assert torch.equal(channel, batch["label"])
        assert batch["x"].max() == 1.0 and batch["x"].min() == -1.0

    eval_source = dataset.source("eval")
    assert sorted(label for _, label in eval_source.items) == [0, 1, 2]
    assert first_example(eval_source)["x"].shape == (3, 8, 8)


def test_image_folder_holds_out_train_images_without_val(tmp_path, caplog):
    write_tree(tmp_path, with_val=False, per_class=40)
    with caplog.at_level(logging.WARNING):
        dataset = ImageFolder(root=str(tmp_path), resolution=8)
        train, held = dataset.source("train").items, dataset.source("eval").items
    assert "holding out 1 of 120" in caplog.text
    assert len(held) == 1 and not set(held) & set(train)
    assert len(train) + len(held) == 120
    assert ImageFolder(root=str(tmp_path)).source("eval").items == held


def test_image_folder_missing_or_empty_root_names_the_parameter(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(EmptyDatasetError) as error:
        ImageFolder(root=str(missing)).source("train")
    assert "datasets.image_folder.root" in str(error.value) and str(missing) in str(error.value)

    (tmp_path / "train" / "ant").mkdir(parents=True)
    with pytest.raises(EmptyDatasetError) as error:
        ImageFolder(root=str(tmp_path)).source("train")
    message = str(error.value)
    assert "datasets.image_folder.root" in message and str(tmp_path / "train") in message


def test_image_folder_all_unreadable_raises_with_hint(tmp_path):
    folder = tmp_path / "train" / "ant"
    folder.mkdir(parents=True)
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(b"not a jpeg")
    source = ImageFolder(root=str(tmp_path)).source("train")
    with pytest.raises(EmptyDatasetError, match=r"datasets\.image_folder\.root"):
        next(iter(build_loader(source, batch_size=2)))


def test_image_folder_flips_are_seeded(tmp_path):
    folder = tmp_path / "train" / "ant"
    folder.mkdir(parents=True)
    gradient = np.tile(np.arange(16, dtype=np.uint8)[None, :, None] * 16, (16, 1, 3))
    for i in range(8):
        Image.fromarray(gradient).save(folder / f"{i}.png")
    source = ImageFolder(root=str(tmp_path), resolution=16, hflip=True).source("train")

    def run(num_workers):
        return torch.cat(
            [b["x"] for b in take(build_loader(source, batch_size=7, num_workers=num_workers), 8)]
        )

    x = run(0)
    assert torch.equal(x, run(2))
    left_is_dark = x[:, 0, 0, 0] < x[:, 0, 0, -1]
    assert 0 < int(left_is_dark.sum()) < len(x)  # some mirrored, some not
