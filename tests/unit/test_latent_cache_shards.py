"""The latent cache of stage 2 as tar shards (plugins/stages/latent_cache.py, "shards").

(a) the shard cache gives the file cache's items bit for bit (image and clip latents, with and
    without context), in the same loader order, and resumes at the same batch;
(b) its members are plain tar members (`KEY.latent`, `KEY.cls`) at the recorded offsets;
(c) a torn cache (shard missing or truncated, no `latents.json`, an unfinished temporary folder)
    is never read, and writing again replaces it; a full disk leaves nothing behind;
(d) the setting: its values and the cache key;
(e) a tiny two-stage run trains stage 2 on the shard cache to the file cache's losses exactly.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_STAGE2, gin_args
from torch import Tensor, nn

from ulframe import cli, rundir
from ulframe.data.pipeline import build_loader
from ulframe.errors import ConfigError, DataError
from ulframe.train.settings import TrainSettings
from ulframe_plugins.stages import latent_cache
from ulframe_plugins.stages.ul_base import ULBase

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "gin" / "quickstart.gin"
ITEMS = 11
UNREADABLE = 4  # an item whose decode gives None: left out of both caches
NUM_CLASSES = 3


class ToySource:
    """`ITEMS` images (3, 8, 8), or clips (3, 4, 8, 8), one unreadable; label = item % 3."""

    def __init__(self, clip: bool) -> None:
        self.shape = (3, 4, 8, 8) if clip else (3, 8, 8)
        self.items = list(range(ITEMS))

    def decode(self, item: int) -> dict[str, Any] | None:
        if item == UNREADABLE:
            return None
        g = torch.Generator().manual_seed(item)
        return {"x": torch.rand(self.shape, generator=g) * 2 - 1, "label": item % NUM_CLASSES}


def _encoders(clip: bool, context: bool) -> tuple[nn.Module, nn.Module | None]:
    """A frozen strided conv as the encoder (latents (4, 4, 4) or (4, 2, 4, 4)), and another
    as the context's encoder when `context`."""
    torch.manual_seed(0)
    conv = nn.Conv3d if clip else nn.Conv2d
    return conv(3, 4, 2, stride=2), (conv(3, 4, 2, stride=2) if context else None)


def _both(
    tmp_path: Path, clip: bool, context: bool, max_bytes: int = 12 * 1024
) -> tuple[latent_cache.LatentSource, latent_cache.ShardLatentSource]:
    """The file cache (written, read back) and the shard cache of the same encoding."""
    encoder, ctx = _encoders(clip, context)
    source, cpu = ToySource(clip), torch.device("cpu")
    latents = latent_cache.encode_source(encoder, source, cpu, batch_size=3, context=ctx)
    latent_cache.write_cache(tmp_path / "file", "k", latents)
    cached = latent_cache.read_cache(tmp_path / "file", "k")
    assert cached is not None
    file = latent_cache.LatentSource(cached["z"], cached["label"], cached.get("context"))
    batches = latent_cache.encode_batches(encoder, source, cpu, batch_size=3, context=ctx)
    shards = latent_cache.write_shard_cache(tmp_path / "shards", "k", batches, max_bytes)
    return file, shards


def _bits(t: Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _assert_same_example(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert list(a) == list(b)
    for name, value in a.items():
        if isinstance(value, Tensor):
            assert value.dtype == b[name].dtype and value.shape == b[name].shape, name
            assert _bits(value) == _bits(b[name]), name
        else:
            assert type(value) is type(b[name]) and value == b[name], name


@pytest.mark.parametrize("context", [False, True], ids=["no-context", "context"])
@pytest.mark.parametrize("clip", [False, True], ids=["image", "clip"])
def test_the_shard_cache_gives_the_file_caches_items_bit_for_bit(
    tmp_path: Path, clip: bool, context: bool
) -> None:
    file, shards = _both(tmp_path, clip, context)
    assert list(shards.items) == file.items == list(range(ITEMS - 1))
    assert 1 < len(shards.paths) < len(file.items)  # 12 KiB shards: several, of several examples
    reopened = latent_cache.read_shard_cache(tmp_path / "shards", "k")
    assert reopened is not None
    for item in file.items:
        expected = file.decode(item)
        assert set(expected) == {"z", "label"} | ({"context"} if context else set())
        _assert_same_example(shards.decode(item), expected)
        _assert_same_example(reopened.decode(item), expected)
    # the unreadable item is left out, and the labels follow the readable ones
    assert [file.decode(i)["label"] for i in file.items] == [
        i % NUM_CLASSES for i in range(ITEMS) if i != UNREADABLE
    ]


def test_a_loader_reads_both_caches_in_the_same_order_and_resumes_at_the_same_batch(
    tmp_path: Path,
) -> None:
    file, shards = _both(tmp_path, clip=True, context=True)

    def loader(source: Any) -> Any:
        return build_loader(source, batch_size=3, seed=5, prefetch=0)

    expected = [b for b, _ in zip(loader(file), range(8), strict=False)]  # into the 3rd epoch
    stream = loader(shards)
    it = iter(stream)
    first = [next(it) for _ in range(5)]
    state = stream.state_dict()
    resumed = loader(shards)
    resumed.load_state_dict(state)
    rest = [b for b, _ in zip(resumed, range(3), strict=False)]
    for got, want in zip(first + rest, expected, strict=True):
        assert got.keys() == want.keys()
        for name in want:
            assert _bits(got[name]) == _bits(want[name]), name


def test_the_shards_are_plain_tar_files_at_the_recorded_offsets(tmp_path: Path) -> None:
    file, shards = _both(tmp_path, clip=False, context=True)
    layout = json.loads((shards.folder / latent_cache.SHARD_LAYOUT).read_text())
    assert layout["count"] == len(file.items) and layout["num_labels"] == NUM_CLASSES
    assert [f["name"] for f in layout["fields"]] == ["z", "context"]
    members: list[tuple[str, bytes]] = []
    for path in shards.paths:
        with tarfile.open(path) as tar:
            members += [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    assert [name for name, _ in members[:4]] == [
        "000000000.latent", "000000000.cls", "000000001.latent", "000000001.cls",
    ]  # fmt: skip
    for item in file.items:
        example = file.decode(item)
        name, data = members[2 * item]
        assert name == f"{item:09d}.latent"
        assert data == _bits(example["z"]) + _bits(example["context"])
        assert members[2 * item + 1][1] == str(example["label"]).encode()


def _shard_cache(tmp_path: Path) -> tuple[Path, latent_cache.ShardLatentSource]:
    directory = tmp_path / "cache"
    batches = [{"z": torch.randn(6, 2, 3), "label": torch.arange(6) % 2}]
    return directory, latent_cache.write_shard_cache(directory, "k", batches, max_bytes=1)


@pytest.mark.parametrize("tear", ["missing shard", "truncated shard", "no latents.json"])
def test_a_torn_shard_cache_is_not_read_and_is_replaced_when_written_again(
    tmp_path: Path, tear: str
) -> None:
    directory, shards = _shard_cache(tmp_path)
    assert len(shards.paths) == 6  # max_bytes=1: an example per shard
    expected = [shards.decode(i) for i in shards.items]
    victim = Path(shards.paths[3])
    if tear == "missing shard":
        victim.unlink()
    elif tear == "truncated shard":
        victim.write_bytes(victim.read_bytes()[:700])
    else:
        (shards.folder / latent_cache.SHARD_LAYOUT).unlink()
    assert latent_cache.read_shard_cache(directory, "k") is None

    again = latent_cache.write_shard_cache(
        directory, "k", [{"z": torch.stack([e["z"] for e in expected]),
                          "label": torch.tensor([e["label"] for e in expected])}], max_bytes=1,
    )  # fmt: skip
    assert [p.name for p in directory.iterdir()] == [shards.folder.name]  # nothing else left
    for item, example in zip(again.items, expected, strict=True):
        _assert_same_example(again.decode(item), example)


def test_a_shard_truncated_while_training_is_a_one_line_data_error(tmp_path: Path) -> None:
    _, shards = _shard_cache(tmp_path)
    Path(shards.paths[2]).write_bytes(b"")
    with pytest.raises(DataError, match=r"^latent cache shard .*-000002\.tar cannot be read at "):
        shards.decode(2)


def test_an_unfinished_cache_is_never_read_and_is_removed_once_stale(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    # killed before the rename: a temporary folder with complete-looking contents
    _, shards = _shard_cache(tmp_path / "elsewhere")
    tmp = directory / f"latents-k.shards.{os.getpid() + 1}.tmp"
    directory.mkdir()
    os.rename(shards.folder, tmp)
    assert latent_cache.read_shard_cache(directory, "k") is None
    fresh = directory / "latents-k.shards.999999999.tmp"  # another writer's, still going
    fresh.mkdir()
    for path in (tmp, *tmp.iterdir()):
        os.utime(path, (0, 0))
    other_key = directory / "latents-old.pt"
    other_key.write_bytes(b"x")
    _, written = _shard_cache(tmp_path)  # into tmp_path/cache: removes what is stale
    assert sorted(p.name for p in directory.iterdir()) == sorted([written.folder.name, fresh.name])
    # a second writer of the same key keeps the cache already in place
    batches = [{"z": torch.zeros(1, 2, 3), "label": torch.zeros(1, dtype=torch.long)}]
    kept = latent_cache.write_shard_cache(directory, "k", batches)
    assert kept.paths == written.paths and len(kept.items) == 6
    # a file cache of another key removes the shard cache (its key has another layout)
    latent_cache.write_cache(directory, "f", {"z": torch.zeros(1, 2), "label": torch.zeros(1)})
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        ["latents-f.json", "latents-f.pt", fresh.name]
    )


def test_a_full_disk_leaves_no_temporary_folder(tmp_path: Path, monkeypatch) -> None:
    def full(src: Any, dst: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(rundir.DiskFullError, match=r"latents-k\.shards$"):
        _shard_cache(tmp_path)
    assert list((tmp_path / "cache").iterdir()) == []


def test_the_setting_and_the_key(tmp_path: Path) -> None:
    def stage(**kw: Any) -> ULBase:
        settings = TrainSettings(batch_size=4, train_samples=4)
        return ULBase(stage1=None, base=None, train=settings, **kw)  # type: ignore[arg-type]

    assert stage().latent_cache_format == "file"  # the default: no change for existing runs
    with pytest.raises(ConfigError, match=r"^ul_base\.latent_cache_format must be one of "):
        stage(latent_cache_format="tar")
    with pytest.raises(ConfigError, match=r"^ul_base\.latent_cache_shard_size 'big' is not a"):
        stage(latent_cache_format="shards", latent_cache_shard_size="big")
    assert latent_cache.shard_bytes("64MiB") == latent_cache.shard_bytes(2**26) == 2**26
    assert latent_cache.shard_bytes(1e9) == latent_cache.SHARD_BYTES == 10**9

    encoder, _ = _encoders(clip=False, context=False)
    source = ToySource(clip=False)
    file_key = latent_cache.cache_key(encoder, source)
    assert latent_cache.cache_key(encoder, source, 0, "file") == file_key
    assert latent_cache.cache_key(encoder, source, 0, "shards") != file_key
    with pytest.raises(DataError, match="no readable example"):
        latent_cache.write_shard_cache(tmp_path, "k", [])
    assert list(tmp_path.iterdir()) == []


def _stage2_losses(workdir: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [
        (r["samples_seen"], r["loss_nats"], r["base_nats"])
        for r in rows
        if r.get("stage") == "stage2" and r.get("kind") == "train"
    ]


def test_stage2_trains_on_the_shard_cache_to_the_file_caches_losses(
    tmp_path: Path, tiny_run: list[str], tiny_threads: None, restore_logging: None
) -> None:
    workdir = tmp_path / "run"
    args = ["run", str(QUICKSTART), "--workdir", str(workdir), *tiny_run, *gin_args(TINY_STAGE2)]
    args += ["--gin_param", "Experiment.hooks = []"]
    assert cli.main(args) == 0
    stage2 = workdir / "stages" / "stage2"
    on_file = _stage2_losses(workdir)
    assert [s for s, _, _ in on_file] == [4, 8]
    assert [p.suffix for p in sorted((stage2 / "latent_cache").iterdir())] == [".json", ".pt"]
    done_file = json.loads((stage2 / "DONE.json").read_text())["scalars"]

    shutil.rmtree(stage2)  # stage 2 again, on stage 1 as it was
    shards = ["--gin_param", "stage2/stages.ul_base.latent_cache_format = 'shards'"]
    assert cli.main([*args, *shards, "--allow-config-change"]) == 0
    cache = list((stage2 / "latent_cache").iterdir())
    assert len(cache) == 1 and cache[0].name.endswith(".shards")
    written = sorted(p.name for p in cache[0].iterdir())  # shard names are drawn at each write
    assert _stage2_losses(workdir) == on_file
    assert json.loads((stage2 / "DONE.json").read_text())["scalars"] == done_file

    (stage2 / "DONE.json").unlink()  # stage 2 from its start again: the cache is reused
    shutil.rmtree(stage2 / "checkpoints")
    assert cli.main([*args, *shards]) == 0
    assert sorted(p.name for p in cache[0].iterdir()) == written
    assert _stage2_losses(workdir)[-2:] == on_file
