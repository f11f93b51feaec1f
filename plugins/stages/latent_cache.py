"""The latent cache of stage 2: the train split encoded once by the frozen stage-1 model.

`stage_dir/latent_cache/latents-<key>.pt` holds `{"z": (N, Cz, *s), "label": (N,)}` (and
`"context"`, the latents of the clips' first frames, when the stage conditions on them);
key = SHA-256 of what the encoding depends on (`LatentModel.latent_state()`: the encoder's
weights, and for a KL autoencoder its latent scale), of the context length and of the pickled
train Source (its items and settings), so a cache of another encoder or dataset is never used.

Both files are written through the engine's atomic writer (`rundir.write_bytes`: a temporary
file named after the process, fsynced and renamed; on a full disk the temporary file is removed
and `DiskFullError` names the file). The marker `latents-<key>.json` (key, SHA-256 of the data,
count) is written last; data without a valid marker, or whose checksum does not match (a run
killed mid-write), is rebuilt. Other keys' files are removed when a cache is written, and so are
temporary files older than `STALE_TMP_S` (left by a killed run). Random augmentation inside the
dataset's decode is frozen by the cache (one draw per item). The key covers the Source's
configuration (paths, crop boxes, resolution), not the bytes of files it reads: replacing an
image file in place is not noticed. With several processes every rank encodes and renames the
same file into place (safe, but the work is repeated).
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ulframe import rundir
from ulframe.progress import progress

CACHE_DIR = "latent_cache"
CACHE_FORMAT = 2  # bump when the cache layout changes: old caches get another key
STALE_TMP_S = 600.0  # a temporary cache file this old was left by a killed run


class LatentSource:
    """In-memory Source of cached latents: items are indices, decode gives {"z", "label"}
    (and "context", the latent of the clip's first frames, when the stage conditions on them)."""

    def __init__(self, z: Tensor, labels: Tensor, context: Tensor | None = None) -> None:
        self.z = z
        self.labels = labels
        self.context = context
        self.items = list(range(z.shape[0]))

    def decode(self, item: int) -> dict[str, Any]:
        example = {"z": self.z[item], "label": int(self.labels[item])}
        if self.context is not None:
            example["context"] = self.context[item]
        return example


def cache_key(
    encoder: nn.Module | Mapping[str, Tensor], source: Any, context_frames: int = 0
) -> str:
    """SHA-256 of the encoder's weights (a module or the `latent_state()` of a stage-1 model),
    the context length and the Source (pickled; repr if unpicklable)."""
    h = hashlib.sha256(f"ulframe-latent-cache-{CACHE_FORMAT}-{context_frames}".encode())
    state = encoder.state_dict() if isinstance(encoder, nn.Module) else encoder
    for name, value in sorted(state.items()):
        h.update(name.encode())
        h.update(str(value.dtype).encode() + str(tuple(value.shape)).encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    try:
        h.update(pickle.dumps(source, protocol=4))
    except Exception:  # an unpicklable Source: its type and repr
        h.update(f"{type(source).__qualname__}:{source!r}".encode())
    return h.hexdigest()


def read_cache(directory: Path, key: str) -> dict[str, Tensor] | None:
    """The cached {"z", "label"[, "context"]} for `key`, or None when absent, unfinished or
    corrupt."""
    data_path, marker = directory / f"latents-{key}.pt", directory / f"latents-{key}.json"
    if not (data_path.is_file() and marker.is_file()):
        return None
    try:
        meta = json.loads(marker.read_text())
        data = data_path.read_bytes()
        if meta.get("key") != key or hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            return None
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        if not {"z", "label"} <= state.keys():
            return None
        return dict(state)
    except (OSError, ValueError, KeyError, RuntimeError, AttributeError, pickle.UnpicklingError):
        return None


def write_cache(directory: Path, key: str, latents: dict[str, Tensor]) -> Path:
    """Write the cache atomically: the data, then the completion marker with its checksum."""
    directory.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for old in directory.glob("latents-*"):
        if old.name.endswith(".tmp"):  # another writer's, or left by a killed run
            if now - old.stat().st_mtime > STALE_TMP_S:
                old.unlink(missing_ok=True)
        elif not old.name.startswith(f"latents-{key}."):  # another key: stale
            old.unlink(missing_ok=True)
    buf = io.BytesIO()
    torch.save(latents, buf)
    data = buf.getvalue()
    path = directory / f"latents-{key}.pt"
    rundir.write_bytes(path, data, durable=True, unique=True)
    count = int(latents["z"].shape[0])
    meta = {"key": key, "sha256": hashlib.sha256(data).hexdigest(), "count": count}
    marker = directory / f"latents-{key}.json"
    rundir.write_bytes(marker, json.dumps(meta).encode(), durable=True, unique=True)
    return path


@torch.no_grad()
def encode_source(
    encoder: Callable[[Tensor], Tensor],
    source: Any,
    device: torch.device,
    batch_size: int = 64,
    context: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    """{"z": encoder(x) (N, Cz, *s) float32, "label": (N,)} of every readable item of `source`,
    on CPU (`encoder`: a module or a stage-1 model's `encode_clean`); with `context` (x -> the
    latent the stage conditions on, e.g. of the clips' first frames) also "context"."""
    zs: list[Tensor] = []
    contexts: list[Tensor] = []
    labels: list[int] = []
    pending: list[Tensor] = []

    def flush() -> None:
        if pending:
            x = torch.stack(pending).to(device)
            zs.append(encoder(x).float().cpu())
            if context is not None:
                contexts.append(context(x).float().cpu())
            pending.clear()

    for item in progress(source.items, phase="latent caching", unit="examples"):
        example = source.decode(item)
        if example is None:
            continue
        pending.append(example["x"])
        labels.append(int(example.get("label", 0)))
        if len(pending) == batch_size:
            flush()
    flush()
    out = {"z": torch.cat(zs), "label": torch.tensor(labels, dtype=torch.long)}
    if context is not None:
        out["context"] = torch.cat(contexts)
    return out
