"""The `ul` model format (`ulframe_plugins.formats.ul_model`): the exported folder, `load`, and
its one-line errors; `ulframe.load` finds it through `ulframe.formats`.

The folders here are written from freshly built tiny networks (no run): what a loaded model
computes equals the run's own outputs in tests/integration/test_export_load.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import ulframe
from ulframe import formats
from ulframe.diffusion import alpha_sigma
from ulframe.errors import UserError
from ulframe.registry import Registry
from ulframe_plugins.formats import ul_model as pretrained

SHAPE = (1, 16, 16)
LATENT = (2, 4, 4)
ENCODER = {"shape": list(SHAPE), "latent_channels": 2, "channels": [8, 16],
           "blocks_per_stage": [1, 1], "patch_size": 2}  # fmt: skip
PRIOR = {"shape": list(LATENT), "widths": [16], "depths": [1], "heads": 2, "patch_size": 1}
DECODER = {"shape": list(SHAPE), "latent_shape": list(LATENT), "channels": [8],
           "blocks_per_stage": 1, "width": 16, "depth": 1, "heads": 2, "patch_size": 2,
           "dropout": 0.0}  # fmt: skip
BASE = {"shape": list(LATENT), "widths": [16], "depths": [1], "heads": 2, "patch_size": 1,
        "num_classes": 3}  # fmt: skip


def _schedule(name: str, low: float, high: float, resolution: int | None = None) -> dict[str, Any]:
    return {"plugin": name,
            "arguments": {"logsnr_min": low, "logsnr_max": high, "resolution": resolution}}  # fmt: skip


def make_folder(folder: Path, base: bool = True) -> dict[str, Any]:
    """An exported folder of tiny networks with fresh weights (seed 0), as `export` writes it."""
    config: dict[str, Any] = {
        "format": pretrained.FORMAT,
        "format_version": pretrained.FORMAT_VERSION,
        "data": {"shape": list(SHAPE), "range": [-1.0, 1.0], "dtype": "float32",
                 "dataset": "digits", "num_classes": 3, "class_names": ["a", "b", "c"]},
        "latent": {"shape": list(LATENT), "logsnr_max": 5.0, "mean": [0.1, -0.2],
                   "std": [1.5, 0.5], "stats_examples": 10},
        "stage1": {
            "networks": {
                "encoder": {"plugin": "resnet", "arguments": ENCODER},
                "prior": {"plugin": "vit", "arguments": PRIOR},
                "decoder": {"plugin": "uvit", "arguments": DECODER},
            },
            "prior_schedule": _schedule("cosine", -15.0, 5.0),
            "decoder_schedule": _schedule("shifted_cosine", -15.0, 15.0, 16),
            "loss_factor": 1.5, "sampler": "ddim", "steps": 3, "bits_per_pixel_t": 2,
        },
        "stage2": None,
        "run": {"seed": 0, "samples_seen": {"stage1": 64}, "eval": {"psnr": 21.5}},
    }  # fmt: skip
    if base:
        config["stage2"] = {
            "networks": {"base": {"plugin": "vit", "arguments": BASE}},
            "schedule": _schedule("cosine", -15.0, 5.0),
            "num_classes": 3, "sampler": "ddim", "steps": 2, "decoder_steps": None,
            "guidance": 1.5, "guidance_interval": None, "context_frames": 0,
            "context_latent_steps": 0,
        }  # fmt: skip
    registry = Registry()
    torch.manual_seed(0)
    specs = config["stage1"]["networks"] | (config["stage2"] or {}).get("networks", {})
    networks = {
        role: pretrained._build(registry, pretrained.NETWORKS[role], spec, role)
        for role, spec in specs.items()
    }
    pretrained.write_folder(folder, config, networks, "tiny")
    return config


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    make_folder(tmp_path / "model")
    return tmp_path / "model"


def _images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.rand((n, *SHAPE), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _error(call: Any) -> str:
    with pytest.raises(UserError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


# ---- what a loaded model computes --------------------------------------------------------------
def test_load_gives_the_shapes_and_statistics_of_the_folder(folder: Path) -> None:
    model = ulframe.load(folder)
    assert (model.data_shape, model.latent_shape, model.latent_logsnr_max) == (SHAPE, LATENT, 5.0)
    assert model.class_names == ["a", "b", "c"] and model.num_classes == 3
    assert torch.equal(model.latent_mean, torch.tensor([0.1, -0.2]))
    assert torch.equal(model.latent_std, torch.tensor([1.5, 0.5]))
    x = _images(3)
    z = model.encode(x)
    assert z.shape == (3, *LATENT) and z.dtype == torch.float32
    assert torch.equal(z, model.autoencoder.encoder(x).float())  # the encoder, deterministic
    decoded = model.decode(z, steps=2)
    assert decoded.shape == x.shape and float(decoded.abs().max()) <= 1.0
    assert model.sample(3, labels=1, steps=2).shape == x.shape
    assert model.bits_per_pixel(x).shape == (3,)


def test_decode_adds_the_encoding_noise_at_latent_logsnr_max(folder: Path) -> None:
    """decode(z) = decode(alpha(λ_z(0)) z + sigma(λ_z(0)) eps, noised=True), eps the seed's
    first draw: the noise UL's decoder was trained with (z_0)."""
    model = ulframe.load(folder)
    z = model.encode(_images())
    generator = torch.Generator().manual_seed(4)
    eps = torch.randn(z.shape, generator=generator)
    alpha, sigma = alpha_sigma(torch.tensor(5.0))
    by_hand = model.decode(alpha * z + sigma * eps, noised=True, generator=generator)
    assert torch.allclose(model.decode(z, seed=4), by_hand, atol=1e-6)
    assert not torch.allclose(model.decode(z, seed=4, noised=True), by_hand, atol=1e-3)


def test_the_same_seed_gives_the_same_outputs_and_labels_pick_the_class(folder: Path) -> None:
    model = ulframe.load(folder)
    assert torch.equal(model.sample(3, steps=2, seed=2), model.sample(3, steps=2, seed=2))
    assert not torch.equal(model.sample(3, steps=2, seed=2), model.sample(3, steps=2, seed=3))
    # default labels: the classes in class order, as `ulframe sample`
    assert torch.equal(model.sample(3, steps=2), model.sample(3, labels=[0, 1, 2], steps=2))
    x = _images()
    assert torch.equal(model.bits_per_pixel(x, seed=1), model.bits_per_pixel(x, seed=1))


def test_the_default_seed_is_the_runs(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["run"]["seed"] = 5
    (folder / "config.json").write_text(json.dumps(config))
    model = ulframe.load(folder)
    assert model.seed == 5
    assert torch.equal(model.sample(2, steps=1), model.sample(2, steps=1, seed=5))
    assert not torch.equal(model.sample(2, steps=1), model.sample(2, steps=1, seed=0))


def test_bfloat16_weights_encode_and_decode(folder: Path) -> None:
    model = ulframe.load(folder, dtype=torch.bfloat16)
    assert next(model.autoencoder.parameters()).dtype == torch.bfloat16
    reference = ulframe.load(folder).encode(_images())
    z = model.encode(_images())
    assert z.dtype == torch.float32 and float((z - reference).abs().max()) < 0.1
    assert model.decode(z, steps=2).shape == (2, *SHAPE)


def test_a_folder_without_base_model_encodes_and_decodes_but_does_not_sample(
    tmp_path: Path,
) -> None:
    make_folder(tmp_path, base=False)
    model = ulframe.load(tmp_path)
    assert model.base_model is None and model.num_classes == 0
    assert model.decode(model.encode(_images()), steps=1).shape == (2, *SHAPE)
    assert _error(lambda: model.sample(2)) == (
        f"{tmp_path} holds no base model (stage 2 was not exported): sample needs one; "
        "decode latents from another model with decode(z)"
    )


# ---- bad folders: one line naming the file -----------------------------------------------------
def test_a_missing_weights_file_is_named(folder: Path) -> None:
    (folder / "decoder.safetensors").unlink()
    assert _error(lambda: ulframe.load(folder)) == (
        f"{folder / 'decoder.safetensors'}: missing (the decoder's weights, named by config.json)"
    )


def test_a_newer_format_version_is_refused(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["format_version"] = pretrained.FORMAT_VERSION + 1
    (folder / "config.json").write_text(json.dumps(config))
    assert _error(lambda: ulframe.load(folder)) == (
        f"{folder / 'config.json'}: format version {pretrained.FORMAT_VERSION + 1} is newer "
        f"than this ulframe reads ({pretrained.FORMAT_VERSION}); upgrade ulframe"
    )


def test_weights_of_the_wrong_shape_are_named_with_both_shapes(folder: Path) -> None:
    path = folder / "prior.safetensors"
    tensors = load_file(str(path))
    key = sorted(k for k, v in tensors.items() if v.dim() == 2)[0]
    expected = tuple(tensors[key].shape)
    tensors[key] = torch.zeros(expected[0] + 1, expected[1])
    save_file(tensors, str(path))
    assert _error(lambda: ulframe.load(folder)) == (
        f"{path}: tensor '{key}' has shape {(expected[0] + 1, expected[1])}, the prior built "
        f"from config.json has {expected}"
    )


def test_missing_tensors_a_missing_config_and_a_corrupt_file_are_one_line(folder: Path) -> None:
    path = folder / "encoder.safetensors"
    tensors = load_file(str(path))
    dropped = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(path))
    assert _error(lambda: ulframe.load(folder)).startswith(
        f"{path}: lacks 1 tensors of the encoder (e.g. '{dropped}')"
    )
    path.write_bytes(b"not safetensors")
    assert _error(lambda: ulframe.load(folder)).startswith(
        f"{path}: not a readable safetensors file"
    )
    (folder / "config.json").unlink()
    assert _error(lambda: ulframe.load(folder)) == (
        f"{folder / 'config.json'}: missing; {folder} is not a folder written by `ulframe export`"
    )


# ---- bad input: one line stating what is expected ----------------------------------------------
EXPECTED = (
    "expected x of shape (B, C, H, W) = (B, 1, 16, 16), a floating dtype (weights: "
    "torch.float32), values in [-1, 1]"
)


@pytest.mark.parametrize(
    ("x", "got"),
    [
        (torch.zeros(SHAPE), "got shape (1, 16, 16)"),
        (torch.zeros(2, 3, 16, 16), "got shape (2, 3, 16, 16)"),
        (torch.zeros(2, *SHAPE, dtype=torch.uint8), "got dtype torch.uint8"),
        (torch.full((2, *SHAPE), 255.0), "got values in [255, 255]"),
        ([[0.0]], "got a list"),
    ],
)
def test_encode_of_the_wrong_input_states_shape_dtype_and_range(
    folder: Path, x: Any, got: str
) -> None:
    model = ulframe.load(folder)
    assert _error(lambda: model.encode(x)) == f"{EXPECTED}; {got}"
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        assert _error(lambda: model.bits_per_pixel(x)) == f"{EXPECTED}; {got}"


def test_decode_and_sample_refuse_wrong_latents_labels_and_context(folder: Path) -> None:
    model = ulframe.load(folder)
    assert _error(lambda: model.decode(torch.zeros(2, 3, 4, 4))) == (
        "expected z of shape (B, 2, 4, 4) and a floating dtype; got shape (2, 3, 4, 4)"
    )
    assert _error(lambda: model.sample(2, labels=3)) == (
        "labels must be one class or 2 classes in [0, 3), got 3"
    )
    assert _error(lambda: model.sample(2, context=_images())) == (
        "context is for a model that continues clips; this one does not"
    )


# ---- the card, the lazy import, the Hub conventions --------------------------------------------
def test_the_model_card_names_data_samples_seen_eval_and_how_to_load(folder: Path) -> None:
    card = (folder / "README.md").read_text()
    assert "| data | `digits`: images (C, H, W) 1×16×16, values in [-1, 1] |" in card
    assert "| samples seen, stage1 | 64 |" in card and "| eval: psnr | 21.5 |" in card
    assert "ulframe.load(" in card and "model.sample(8, labels=3)" in card


def test_import_ulframe_stays_cheap_and_load_is_the_loader(folder: Path) -> None:
    code = "import sys, ulframe; print('torch' in sys.modules, 'ulframe.formats' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=60)  # fmt: skip
    assert done.stdout.split() == ["False", "False"]
    assert ulframe.load is formats.load
    assert isinstance(ulframe.load(folder), pretrained.Pretrained)  # by config.json's "format"
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        _ = ulframe.nope  # type: ignore[attr-defined]


def test_from_pretrained_and_save_pretrained_on_a_local_folder(
    folder: Path, tmp_path: Path
) -> None:
    model = pretrained.Pretrained.from_pretrained(folder)
    copy = model.save_pretrained(tmp_path / "copy")
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in folder.iterdir())
    again = pretrained.Pretrained.from_pretrained(copy)
    assert torch.equal(again.sample(2, steps=2), model.sample(2, steps=2))
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:  # without the `hub` extra a repository id is one line
        assert _error(lambda: pretrained.Pretrained.from_pretrained("someone/model")) == (
            "someone/model: no such folder; a Hub repository needs huggingface_hub "
            "(pip install 'ulframe[hub]')"
        )


def test_recording_restores_the_classes_and_keeps_the_outermost_arguments() -> None:
    class Base:
        def __init__(self, a: int, b: int = 2) -> None:
            self.a = a

    class Child(Base):
        def __init__(self, c: int = 7) -> None:
            super().__init__(a=c * 10)

    before, child_before = Base.__init__, Child.__init__
    with pretrained._recording([Base, Child]) as made:
        child, base = Child(), Base(1)
    assert made[id(child)] == {"c": 7} and made[id(base)] == {"a": 1, "b": 2}
    assert Base.__init__ is before and Child.__init__ is child_before and len(made) == 2


def test_load_finds_the_format_by_name_and_refuses_an_unknown_one(tmp_path: Path) -> None:
    assert "ul" in formats.names()
    (tmp_path / "config.json").write_text(json.dumps({"format": "nope", "format_version": 1}))
    assert _error(lambda: formats.load(tmp_path)) == (
        f"no model format 'nope' is installed (formats: {', '.join(formats.names())})"
    )
    (tmp_path / "config.json").write_text("[1, 2]")
    assert _error(lambda: formats.load(tmp_path)).startswith(f"{tmp_path / 'config.json'}: ")
    assert _error(lambda: formats.load(tmp_path / "missing")) == (
        f"{tmp_path / 'missing'}: no such folder (an export of `ulframe export RUN --out DIR`)"
    )
