"""Tiny constructor arguments, derived from a factory's signature (no per-plugin table).

A plugin's defaults are its real sizes (ImageNet-scale networks, thousands of examples); the
kit builds every plugin at toy size instead, by the *names* of its parameters:

- sizes of networks: ``width``/``dim``/``hidden``… → 32, ``heads`` → 2, ``depth`` → 1,
  ``latent_channels`` → 4; tuples of stage sizes (``channels``, ``widths``) are cut to at most
  two stages (then one) of 16/32 channels, with ``blocks_per_stage``/``depths`` cut alike to 1 block each;
  any other int parameter whose name says it is a size and whose default is over 64 → 32;
- data: ``resolution``/``image_size`` → 16, ``num_frames`` → 4, ``*_per_epoch`` → 4,
  ``eval_*`` counts → 2; a required ``root``/``data_root``/``path`` gets a temporary folder
  ``train/<class>/<file>`` and ``val/<class>/<file>`` of random PNGs (MP4 clips when the factory takes ``num_frames``);
- everything else keeps its default.

When the tiny arguments do not build (a plugin whose sizes depend on each other in a way the
names do not tell), the kit tries the defaults next. A factory that needs what no name can tell
(a weights file) defines ``ulframe_check_kwargs(folder: pathlib.Path) -> dict``: the kit calls
it with a temporary folder and uses what it returns (docs/plugins.md, "Checking a plugin").
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

NAMED: dict[str, Any] = {
    "latent_channels": 4,
    "width": 32,
    "dim": 32,
    "embed_dim": 32,
    "hidden": 32,
    "hidden_dim": 32,
    "hidden_size": 32,
    "model_channels": 16,
    "base_channels": 16,
    "heads": 2,
    "num_heads": 2,
    "depth": 1,
    "num_layers": 1,
    "resolution": 16,
    "image_size": 16,
    "num_frames": 4,
}
STAGE_SIZES = {"channels": (16, 32), "widths": (32, 48), "hidden_channels": (16, 32)}
STAGE_COUNTS = ("blocks_per_stage", "depths", "num_blocks", "layers_per_stage")
SIZE_WORDS = ("width", "dim", "channels", "hidden", "features", "size")
ROOT_NAMES = ("root", "data_root", "path", "data_dir")
MAX_STAGES = 2
STAGE_TRIES = (2, 1)  # stage counts tried, in order
TINY_INT = 32
BIG_INT = 64
TREE_FILES = (("train", "cats", 20), ("train", "dogs", 24), ("val", "cats", 28))
TREE_WIDTH = 24
VIDEO_FRAMES = 8

CHECK_KWARGS_ATTR = "ulframe_check_kwargs"


def signature_defaults(factory: Callable[..., Any]) -> dict[str, Any]:
    """Keyword parameters of `factory` and their defaults (`inspect.Parameter.empty` if none)."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return {}
    return {
        p.name: p.default
        for p in sig.parameters.values()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name != "self"
    }


def _shrunk(name: str, default: Any, stages: int) -> Any:
    """The tiny value of one parameter, or `default` when its name tells nothing."""
    if name in NAMED and (default is inspect.Parameter.empty or isinstance(default, int)):
        return NAMED[name]
    if name in STAGE_SIZES and isinstance(default, tuple) and default:
        return STAGE_SIZES[name][: min(len(default), stages)]
    if name in STAGE_COUNTS:
        if isinstance(default, tuple) and default:
            return (1,) * min(len(default), stages)
        if isinstance(default, int):
            return 1
    if name.endswith("_per_epoch") and isinstance(default, int):
        return 4
    if name.startswith("eval_") and isinstance(default, int) and not isinstance(default, bool):
        return 2
    sized = any(word in name for word in SIZE_WORDS)
    if sized and isinstance(default, int) and not isinstance(default, bool) and default > BIG_INT:
        return TINY_INT
    return default


def derive(
    factory: Callable[..., Any],
    supplied: Mapping[str, Any],
    folder: Callable[[bool], Path],
    max_stages: int = MAX_STAGES,
) -> dict[str, Any] | None:
    """Tiny keyword arguments for `factory` (beyond `supplied`), or None when a required
    parameter cannot be derived. `folder(video)` makes the temporary data tree of a `root`."""
    defaults = signature_defaults(factory)
    stage_tuple = next(
        (d for n, d in defaults.items() if n in STAGE_SIZES and isinstance(d, tuple) and d), None
    )
    stages = min(len(stage_tuple), max_stages) if stage_tuple else None
    out: dict[str, Any] = {}
    for name, default in defaults.items():
        if name in supplied:
            continue
        if default is inspect.Parameter.empty and name in ROOT_NAMES:
            out[name] = str(folder("num_frames" in defaults))
            continue
        value = _shrunk(name, default, stages or max_stages)
        if value is inspect.Parameter.empty:
            return None
        if value is not default:
            out[name] = value
    return out


def missing_required(factory: Callable[..., Any], supplied: Mapping[str, Any]) -> list[str]:
    """Required parameters of `factory` that neither `supplied` nor the kit can fill."""
    return [
        n
        for n, d in signature_defaults(factory).items()
        if d is inspect.Parameter.empty and n not in supplied and n not in NAMED
        and n not in ROOT_NAMES
    ]  # fmt: skip


def make_tree(root: Path, video: bool) -> Path:
    """<root>/{train,val}/<class>/<file>: random PNGs (or MPEG-4 clips of 8 frames), 2 train
    files in 2 classes and 1 val file."""
    rng = np.random.default_rng(0)
    for i, (split, cls, height) in enumerate(TREE_FILES):
        folder = root / split / cls
        folder.mkdir(parents=True, exist_ok=True)
        if not video:
            from PIL import Image

            pixels = rng.integers(0, 256, size=(height, TREE_WIDTH, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
            continue
        import av

        with av.open(str(folder / f"{i}.mp4"), mode="w") as container:
            stream = container.add_stream("mpeg4", rate=25)
            stream.width, stream.height, stream.pix_fmt = TREE_WIDTH, height, "yuv420p"
            for _ in range(VIDEO_FRAMES):
                pixels = rng.integers(0, 256, size=(height, TREE_WIDTH, 3), dtype=np.uint8)
                frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
                container.mux(stream.encode(frame))
            container.mux(stream.encode())
    return root
