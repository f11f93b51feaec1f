"""datasets.shards and ulframe.data.shards: the tar format, exact resume, splitting, bad input."""

from __future__ import annotations

import collections
import hashlib
import io
import json
import logging
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ulframe import cli
from ulframe.data import build_loader
from ulframe.data import shards as data_shards
from ulframe.data.shards import MANIFEST, ShardSet, ShardSetError, parse_size
from ulframe.errors import UserError
from ulframe.testing.tiny import make_tree
from ulframe_plugins.datasets.image_folder import ImageFolder
from ulframe_plugins.datasets.kinetics import Kinetics
from ulframe_plugins.datasets.shards import Shards

CLASSES = ("ant", "bee", "cat")
PER_CLASS = 4  # train images per class; val: one per class


def write_images(root: Path) -> Path:
    """root/{train,val}/<class>/<i>.png: random pixels (every image distinct), 16x12 to 19x12: 0.5 to 1 KiB."""
    rng = np.random.default_rng(0)
    for split, count in (("train", PER_CLASS), ("val", 1)):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, size=(16 + i, 12, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory) -> Path:
    """The images of `write_images` as a shard set of one tar record (10 KiB, 3 images) each."""
    base = tmp_path_factory.mktemp("shards")
    Shards.write_folder(write_images(base / "images"), base / "out", max_bytes=10240, workers=2)
    return base / "out"


def key(x: torch.Tensor) -> str:
    return hashlib.sha1(x.numpy().tobytes()).hexdigest()


def examples_of(loader, batches=None) -> list[tuple[str, int]]:
    out = []
    for n, batch in enumerate(loader):
        if batches is not None and n == batches:
            break
        out += [(key(x), int(label)) for x, label in zip(batch["x"], batch["label"])]
    return out


def test_parse_size():
    assert parse_size("1GB") == 10**9
    assert parse_size("500mb") == 500 * 10**6
    assert parse_size("64MiB") == 64 * 2**20
    assert parse_size("1.5KB") == 1500
    assert parse_size("1e9") == 10**9
    for bad in ("", "GB", "-1GB", "1XB", "0"):
        with pytest.raises(UserError, match="is not a size"):
            parse_size(bad)


def test_shards_are_tar_files_indexed_by_the_manifest(shard_root, tmp_path):
    shard_set = ShardSet.load(shard_root)
    assert shard_set.kind == "image" and shard_set.classes == CLASSES
    assert shard_set.count("train") == 12 and shard_set.count("eval") == 3
    assert shard_set.skipped == {"train": 0, "eval": 0}
    # 3 images per record: each header + data (1 KiB) + label header + data = 2.5 KiB; end blocks
    assert [s.count for s in shard_set.splits["train"]] == [3, 3, 3, 3]
    originals = {
        (path.read_bytes(), CLASSES.index(path.parent.name))
        for path in (shard_root.parent / "images" / "train").glob("*/*.png")
    }
    stored = set()
    keys = []
    for shard in shard_set.splits["train"]:
        path = shard_root / shard.name
        assert path.stat().st_size == shard.nbytes == 10240
        with tarfile.open(path) as tar:
            members = tar.getmembers()
            names = [m.name for m in members]
            assert names[1::2] == [n.replace(".png", ".cls") for n in names[::2]]
            assert [m.offset_data for m in members[::2]] == shard.offsets.tolist()
            assert [m.size for m in members[::2]] == shard.sizes.tolist()
            labels = [int(tar.extractfile(m).read()) for m in members[1::2]]
            assert labels == shard.labels.tolist()
            stored |= {(tar.extractfile(m).read(), lab) for m, lab in zip(members[::2], labels)}
            keys += [n.removesuffix(".png") for n in names[::2]]
    assert stored == originals  # the files' own bytes, each once, with its folder's label
    assert keys == [f"{i:09d}" for i in range(12)]
    # the order is seeded: not the folder's class order
    labels = np.concatenate([s.labels for s in shard_set.splits["train"]]).tolist()
    assert labels != sorted(labels)


def test_images_decode_as_the_image_folder_decodes_them(shard_root):
    folder = ImageFolder(root=str(shard_root.parent / "images"), resolution=8)
    shards = Shards(root=str(shard_root), resolution=8, hflip=False)
    folder_train = ImageFolder(str(shard_root.parent / "images"), resolution=8, hflip=False)
    assert shards.num_classes == 3 and shards.classes == list(CLASSES)
    for split, reference in (("train", folder_train), ("eval", folder)):
        source, expected = shards.source(split), reference.source(split)
        ours = sorted((key(e["x"]), e["label"]) for e in map(source.decode, source.items))
        theirs = sorted((key(e["x"]), e["label"]) for e in map(expected.decode, expected.items))
        assert ours == theirs and len(ours) == (12 if split == "train" else 3)


def test_resume_continues_at_the_same_example(shard_root):
    # random crops and flips: the augmentation must survive the resume too
    source = Shards(root=str(shard_root), resolution=8, random_crop=True).source("train")

    def make():
        return build_loader(source, batch_size=5, seed=7, num_workers=2, prefetch=2)

    uninterrupted = examples_of(make(), 7)  # 35 examples: into the third epoch
    loader = make()
    it = iter(loader)
    first = [(key(x), int(y)) for _ in range(3) for x, y in zip(*next(it).values())]
    buffer = io.BytesIO()
    torch.save(loader.state_dict(), buffer)
    buffer.seek(0)
    resumed = make()
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert first + examples_of(resumed, 4) == uninterrupted
    for epoch in range(2):  # whole epochs (the crops and flips differ from epoch to epoch)
        labels = sorted(label for _, label in uninterrupted[12 * epoch : 12 * epoch + 12])
        assert labels == sorted(list(range(3)) * PER_CLASS)


def test_two_ranks_of_two_workers_see_every_example_once_per_epoch(shard_root):
    source = Shards(root=str(shard_root), resolution=8, hflip=False).source("train")
    seen: list[tuple[str, int]] = []
    for rank in range(2):
        loader = build_loader(
            source, batch_size=2, rank=rank, world_size=2, seed=1, num_workers=2,
            repeat=False, drop_last=False,
        )  # fmt: skip
        ours = examples_of(loader)
        assert len(ours) == 6
        seen += ours
    everything = {(key(e["x"]), e["label"]) for e in map(source.decode, source.items)}
    assert collections.Counter(seen) == collections.Counter(everything)


def test_unreadable_files_and_members_are_skipped_and_counted(tmp_path, caplog):
    images = write_images(tmp_path / "images")
    (images / "train" / "bee" / "corrupt.png").write_bytes(b"\x89PNG not really")
    with caplog.at_level(logging.WARNING):
        written = Shards.write_folder(images, tmp_path / "out", max_bytes=2**20, workers=1)
    assert written.skipped == {"train": 1, "eval": 0} and written.count("train") == 12
    assert "corrupt.png" in caplog.text
    # corrupt one stored image in place (same size): the loader skips and counts it
    shard = written.splits["train"][0]
    offset, size = int(shard.offsets[3]), int(shard.sizes[3])
    with open(tmp_path / "out" / shard.name, "r+b") as file:
        file.seek(offset)
        file.write(bytes(size))
    source = Shards(root=str(tmp_path / "out"), resolution=8).source("train")
    loader = build_loader(source, batch_size=4, repeat=False, drop_last=False, num_workers=2)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert len(examples_of(loader)) == 11
    assert loader.skipped == 1 and loader.unreadable == 1
    assert f"{shard.name}@{offset}" in caplog.text


def one_line_error(dataset: Shards, split: str = "train") -> str:
    with pytest.raises(ShardSetError) as info:
        dataset.source(split)
    message = str(info.value)
    assert "\n" not in message and message.startswith("datasets.shards.root: ")
    return message


def test_missing_or_changed_shards_and_manifests_are_named(tmp_path):
    images = write_images(tmp_path / "images")
    out = tmp_path / "out"
    written = Shards.write_folder(images, out, max_bytes=10240, workers=1)
    manifest = json.loads((out / MANIFEST).read_text())
    names = [shard.name for shard in written.splits["train"]]

    (out / names[2]).rename(tmp_path / "moved.tar")
    assert f"shard {names[2]} of {out / MANIFEST} is missing" in one_line_error(Shards(str(out)))
    assert Shards(str(out)).source("eval") is not None  # the eval split is whole
    (tmp_path / "moved.tar").rename(out / names[2])

    data = (out / names[1]).read_bytes()
    (out / names[1]).write_bytes(data[:-512])
    message = one_line_error(Shards(str(out)))
    assert f"{names[1]} has {len(data) - 512} bytes, {MANIFEST} says {len(data)}" in message
    flipped = bytearray(data)
    flipped[int(written.splits["train"][1].offsets[0]) + 40] ^= 0xFF
    (out / names[1]).write_bytes(bytes(flipped))
    Shards(str(out)).source("train")  # sizes match: without verify, nothing is read
    assert "does not match the SHA-256" in one_line_error(Shards(str(out), verify=True))
    (out / names[1]).write_bytes(data)

    for change, expected in (
        (lambda m: m["splits"]["train"][0].update(count=5), "has count 5 but 3 offsets"),
        (lambda m: m["splits"]["train"][0]["label"].__setitem__(0, 7), "label outside 0 .. 2"),
        (lambda m: m["splits"]["train"][0].pop("sha256"), "bad entry: no 'sha256'"),
        (lambda m: m["splits"]["train"][0].update(name="../x.tar"), "is not a .tar file name"),
        (lambda m: m.update(version=9), "has version 9; this ulframe reads version 1"),
    ):
        changed = json.loads(json.dumps(manifest))
        change(changed)
        (out / MANIFEST).write_text(json.dumps(changed))
        assert expected in one_line_error(Shards(str(out)))
    (out / MANIFEST).unlink()
    assert f"no {MANIFEST} in {out}; write a shard set with `ulframe shard" in one_line_error(
        Shards(str(out))
    )


def test_resampled_mode_streams_whole_shards(shard_root):
    dataset = Shards(root=str(shard_root), resolution=8, hflip=False, resampled=True)
    source = dataset.source("train")
    assert source.resampled and not dataset.source("eval").resampled
    row_of = {
        key(e["x"]): row
        for row, e in enumerate(map(Shards(str(shard_root), resolution=8, hflip=False)
                                    .source("train").decode, source.items))
    }  # fmt: skip
    loader = build_loader(source, batch_size=3, seed=2, num_workers=0, prefetch=0)
    rows = [row_of[k] for k, _ in examples_of(loader, 8)]  # 24 examples: 8 whole shards of 3
    starts = source.items.starts.tolist()
    for i in range(0, 24, 3):  # each stream: one shard, front to back
        assert rows[i] in starts and rows[i + 1 : i + 3] == [rows[i] + 1, rows[i] + 2]
    assert len(set(rows[::3])) > 1  # shards drawn at random, with replacement


def test_clip_shards_decode_as_kinetics_decodes_them(tmp_path):
    videos = make_tree(tmp_path / "videos", video=True)
    written = Shards.write_folder(videos, tmp_path / "out", max_bytes=2**20, workers=1)
    assert written.kind == "clip" and written.count("train") == 2
    settings = {"num_frames": 4, "resolution": 16, "random_clip": False, "random_crop": False}
    shards = Shards(root=str(tmp_path / "out"), hflip=False, **settings)
    kinetics = Kinetics(root=str(videos), hflip=False, **settings)
    for split in ("train", "eval"):
        source, expected = shards.source(split), kinetics.source(split)
        ours = sorted((key(e["x"]), e["label"]) for e in map(source.decode, source.items))
        theirs = sorted((key(e["x"]), e["label"]) for e in map(expected.decode, expected.items))
        assert ours == theirs
    assert shards.source("train").decode(shards.source("train").items[0])["x"].shape == (
        3, 4, 16, 16,
    )  # fmt: skip


def test_cli_writes_a_shard_set_and_refuses_bad_input(tmp_path, capsys):
    images = write_images(tmp_path / "images")
    assert cli.main(["shard", str(images), str(tmp_path / "out"), "--size", "10KiB"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == {
        "out": str(tmp_path / "out"), "kind": "image", "classes": 3, "train_examples": 12,
        "eval_examples": 3, "train_shards": 4, "eval_shards": 1, "train_skipped": 0,
        "eval_skipped": 0,
    }  # fmt: skip
    for argv, expected in (
        ([str(images), str(tmp_path / "out")], "exists and is not an empty folder"),
        ([str(images), str(tmp_path / "o2"), "--size", "big"], "--size 'big' is not a size"),
        ([str(tmp_path), str(tmp_path / "o3")], "has no train/ folder"),
    ):
        assert cli.main(["shard", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert expected in err[-1] and err[-1].startswith("ulframe: error: ")


def test_sources_of_one_shard_set_pickle_alike(shard_root):
    # what stage 2's latent cache keys on (latent_cache.cache_key pickles the Source)
    first, second = (Shards(str(shard_root), resolution=8).source("train") for _ in range(2))
    assert pickle.dumps(first) == pickle.dumps(second)
    assert pickle.loads(pickle.dumps(first)).items[5] == first.items[5]


@pytest.mark.parametrize("max_open", [0, 256])
def test_read_member_reads_the_tar_members_bytes(tmp_path, monkeypatch, max_open):
    # max_open = 0: past the open-shards limit, every read opens and closes its shard
    monkeypatch.setattr(data_shards, "MAX_OPEN_SHARDS", max_open)
    written = Shards.write_folder(write_images(tmp_path / "i"), tmp_path / "o", max_bytes=10240)
    source = Shards(str(tmp_path / "o")).source("train")
    for shard in written.splits["train"]:
        with tarfile.open(tmp_path / "o" / shard.name) as tar:
            expected = [tar.extractfile(m).read() for m in tar.getmembers()[::2]]
        path = str(tmp_path / "o" / shard.name)
        got = [
            data_shards.read_member(path, int(o), int(n))
            for o, n in zip(shard.offsets, shard.sizes)
        ]
        assert got == expected
    assert (path in data_shards._descriptors) == (max_open > 0)
    assert len(source.items) == 12
    with pytest.raises(OSError, match=r"ends before byte 10241 \(truncated\?\)"):
        data_shards.read_member(path, 10240, 1)
