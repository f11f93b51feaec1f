"""`ulframe export RUN --out DIR` and `ulframe.load(DIR)` end to end, images and video.

Two tiny two-stage runs (gin/quickstart.gin and gin/quickstart_video.gin shrunk to seconds,
trained in this process: conftest.in_process_cli) are exported; a fresh process that imports nothing but `ulframe` loads each
folder and computes encode, decode (clean and noised latents), bits/pixel and end-to-end samples
(continuations for the video model); each must equal what the run's own stage code gives
(`ulframe.trained.open_run`, the code `ulframe sample` and `ulframe eval` run) for the same seed
to 1e-6, and the image samples must be the very pixels `ulframe sample` writes. The folder's
latent statistics are checked against the train split encoded here. docs/using_latents.md's
example runs on the exported image model at tiny size.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import NO_MFU, REPO, TINY_RUN, TINY_STAGE2, cli_env, gin_args, in_process_cli

from ulframe import cli, trained
from ulframe.diffusion import sample_ancestral
from ulframe_plugins.formats import ul_model as pretrained

# One worker runs the module (`make test`: --dist loadgroup): the runs are trained once.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("export_load")]
TOL = 1e-6

# gin/quickstart.gin at seconds' size (conftest's TINY_RUN + TINY_STAGE2), evaluated once.
IMAGE = (
    *TINY_RUN, *TINY_STAGE2,
    "Experiment.hooks = []",
    "datasets.digits.resolution = 16",
    "TRAIN_SAMPLES = 4",
    "BASE_TRAIN_SAMPLES = 4",
    "stage1/TrainSettings.eval_every_samples = 0",
    "stage2/TrainSettings.eval_every_samples = 0",
    "stage2/TrainSettings.checkpoint_every_samples = 4",
    "stage2/stages.ul_base.guidance_interval = (-10.0, 4.0)",
    "stage2/stages.ul_base.decoder_sample_steps = 3",
)  # fmt: skip
# gin/quickstart_video.gin at seconds' size: 4 frames of 16x16, 2 of them the context, windows
# of 3 latent steps.
VIDEO = (
    NO_MFU,
    "datasets.moving_digits.resolution = 16",
    "datasets.moving_digits.num_frames = 4",
    "stage2/stages.ul_base.window_steps = 3",
    "datasets.moving_digits.clips_per_epoch = 8",
    "datasets.moving_digits.eval_clips = 4",
    "CONTEXT_FRAMES = 2",
    "TRAIN_SAMPLES = 4",
    "BASE_TRAIN_SAMPLES = 4",
    "Experiment.num_workers = 0",
    "Experiment.hooks = []",
    "encoders.resnet.channels = (8, 16)",
    "decoders.uvit.channels = (8,)",
    "decoders.uvit.width = 16",
    "decoders.uvit.depth = 1",
    "decoders.uvit.heads = 2",
    "prior/priors.vit.widths = (16,)",
    "prior/priors.vit.depths = (1,)",
    "prior/priors.vit.heads = 2",
    "base/priors.vit.widths = (16,)",
    "base/priors.vit.depths = (1,)",
    "base/priors.vit.heads = 2",
    "stage1/TrainSettings.batch_size = 2",
    "stage1/TrainSettings.warmup_samples = 2",
    "stage1/TrainSettings.log_every_samples = 4",
    "stage1/TrainSettings.checkpoint_every_samples = 4",
    "stage1/stages.ul_joint.sample_steps = 2",
    "stage1/stages.ul_joint.eval_t_per_example = 1",
    "stage1/stages.ul_joint.eval_images = 1",
    "stage2/TrainSettings.batch_size = 2",
    "stage2/TrainSettings.warmup_samples = 2",
    "stage2/TrainSettings.log_every_samples = 4",
    "stage2/TrainSettings.checkpoint_every_samples = 4",
    "stage2/stages.ul_base.sample_steps = 2",
    "stage2/stages.ul_base.eval_t_per_example = 1",
    "stage2/stages.ul_base.eval_images = 1",
)
RUNS = {"image": ("gin/quickstart.gin", IMAGE), "video": ("gin/quickstart_video.gin", VIDEO)}
STATS_EXAMPLES = {"image": 64, "video": None}  # train examples of the latent statistics
N = 4  # examples encoded, decoded and sampled
SEED = 3

# What the fresh process computes: for each (folder, inputs, out) of its arguments, the outputs
# of the model loaded from the folder on the inputs saved beside it.
LOADER = f"""
import sys, torch, ulframe
args = sys.argv[1:]
for folder, inputs, out in zip(args[0::3], args[1::3], args[2::3]):
    m = ulframe.load(folder)
    x, z0 = torch.load(inputs)["x"], torch.load(inputs)["z0"]
    z = m.encode(x)
    context = x if m.base_model.context_frames else None
    torch.save({{
        "z": z,
        "decoded": m.decode(z, seed=5),
        "decoded_noised": m.decode(z0, noised=True, steps=2, seed=6),
        "bpp": m.bits_per_pixel(x, seed=7),
        "samples": m.sample(len(x), context=context, seed={SEED}),
        "guided": m.sample(len(x), context=context, guidance=2.0, steps=2, seed=8),
        "ancestral": m.sample(len(x), context=context, sampler="ancestral", steps=2,
                              decoder_steps=1, seed=10),
    }}, out)
"""


@dataclass(frozen=True)
class Exported:
    workdir: Path
    folder: Path
    run: trained.TrainedRun  # the run restored by its own config (`ulframe sample`'s way)
    loaded: dict[str, torch.Tensor]  # what the fresh process computed
    inputs: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Exported]]:
    root = tmp_path_factory.mktemp("export")
    env = cli_env()
    with in_process_cli() as run_here:
        for kind, (gin, bindings) in RUNS.items():
            done = run_here("run", gin, *gin_args(bindings), "--workdir", root / kind)
            assert done.returncode == 0, f"{kind} run failed:\n{done.stderr[-3000:]}"
    inputs, opened = {}, {}
    for kind in RUNS:
        workdir = root / kind
        stats = STATS_EXAMPLES[kind]
        cap = ["--stats-examples", str(stats)] if stats else []
        assert cli.main(["export", str(workdir), "--out", str(root / f"{kind}-ul"), *cap]) == 0
        run = opened[kind] = trained.open_run(workdir, trained.config_files(workdir))
        x = trained.split_examples(run.experiment, "eval", N)
        z0 = torch.randn((N, *run.stages[0].model.latent_shape), generator=_gen(9))
        inputs[kind] = {"x": x, "z0": z0}
        torch.save(inputs[kind], root / f"{kind}-inputs.pt")
    # One fresh process loads both folders: `ulframe.load` needs no gin, run or dataset.
    files = [str(root / f"{k}{end}") for k in RUNS for end in ("-ul", "-inputs.pt", "-out.pt")]
    done = subprocess.run(
        [sys.executable, "-c", LOADER, *files], cwd=root, env=env, capture_output=True,
        text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    yield {
        kind: Exported(
            root / kind,
            root / f"{kind}-ul",
            opened[kind],
            torch.load(root / f"{kind}-out.pt"),
            inputs[kind],
        )
        for kind in RUNS
    }


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.float() - b.float()).abs().max())


def _run_outputs(e: Exported) -> dict[str, Any]:
    """What the run's own stage code gives for the fresh process's calls (same seeds)."""
    run = e.run
    stage1, stage2 = run.stages[0], run.sampling()
    assert stage2 is not None
    joint, model, stage = stage1.model, stage2.model, stage2.stage
    x, z0 = e.inputs["x"], e.inputs["z0"]
    context = x if model.context_frames else None
    labels = stage.sample_labels(N, run.device, run.experiment.dataset.num_classes)
    with torch.no_grad():
        steps1 = stage1.stage.sample_steps
        return {
            "run": run,
            "z": joint.encode_clean(x),
            "decoded": joint.reconstruct(x, _gen(5), stage1.stage.sampler, steps1),
            "decoded_noised": joint.decode_latents(z0, _gen(6), stage1.stage.sampler, 2),
            "bpp": joint.bits_per_pixel(x, _gen(7), stage1.stage.eval_t_per_example),
            "samples": stage.sample(model, N, labels, None, _gen(SEED), context=context),
            "guided": stage.sample(model, N, labels, 2.0, _gen(8), steps=2, context=context),
            "ancestral": stage.sample(
                model,
                N,
                labels,
                None,
                _gen(10),
                steps=2,
                context=context,
                sampler=sample_ancestral,
                decoder_steps=1,
            ),
        }


@pytest.mark.parametrize("kind", list(RUNS))
def test_a_loaded_model_computes_what_the_run_computes(
    exported: dict[str, Exported], kind: str
) -> None:
    e = exported[kind]
    expected = _run_outputs(e)
    for name, value in e.loaded.items():
        assert _close(value, expected[name]) <= TOL, name
    x = e.inputs["x"]
    assert e.loaded["samples"].shape == x.shape and e.loaded["z"].dtype == torch.float32
    if kind == "video":  # the context frames come back as given; the rest is generated
        frames = json.loads((e.folder / "config.json").read_text())["stage2"]["context_frames"]
        assert torch.equal(e.loaded["samples"][:, :, :frames], x[:, :, :frames])
        assert not torch.equal(e.loaded["samples"][:, :, frames:], x[:, :, frames:])


def test_image_samples_are_the_pixels_ulframe_sample_writes(
    exported: dict[str, Exported],
) -> None:
    from ulframe.eval.images import to_uint8

    e = exported["image"]
    run = e.run
    trained.write_samples(run, N, seed=SEED)
    written = np.load(e.workdir / "samples" / "samples.npz")["images"]
    assert np.array_equal(written, to_uint8(e.loaded["samples"]))


@pytest.mark.parametrize("kind", list(RUNS))
def test_the_folder_describes_the_model(exported: dict[str, Exported], kind: str) -> None:
    e = exported[kind]
    config = json.loads((e.folder / "config.json").read_text())
    run = e.run
    joint = run.stages[0].model
    train = trained.split_examples(run.experiment, "train", STATS_EXAMPLES[kind] or 10**6)
    with torch.no_grad():
        z = joint.encode_clean(train).double()  # (N, Cz, *s)
    per_channel = z.transpose(0, 1).reshape(z.shape[1], -1)
    assert config["latent"]["stats_examples"] == len(train)
    assert np.allclose(config["latent"]["mean"], per_channel.mean(1).numpy(), atol=1e-6)
    assert np.allclose(config["latent"]["std"], per_channel.std(1, correction=0).numpy(), atol=1e-6)
    assert config["data"]["shape"] == list(train.shape[1:])
    assert config["latent"]["shape"] == list(joint.latent_shape)
    assert config["latent"]["logsnr_max"] == 5.0
    assert config["format_version"] == pretrained.FORMAT_VERSION
    roles = {"encoder", "prior", "decoder", "base"}
    assert {p.name for p in e.folder.iterdir()} == {
        "config.json", "README.md", *(f"{r}.safetensors" for r in roles)
    }  # fmt: skip
    card = (e.folder / "README.md").read_text()
    assert f"| samples seen, stage1 | {4:,} |" in card and "ulframe.load(" in card
    if kind == "image":
        assert config["stage2"]["guidance_interval"] == [-10.0, 4.0]
        assert config["stage2"]["decoder_steps"] == 3
        assert config["data"]["class_names"] == [str(c) for c in range(10)]
    else:
        assert config["stage2"]["num_classes"] == 0 and config["stage2"]["context_frames"] == 2


def test_export_refuses_a_folder_of_other_files_and_stage_without_format(
    exported: dict[str, Exported], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workdir = exported["image"].workdir
    (tmp_path / "other.txt").write_text("x")
    assert cli.main(["export", str(workdir), "--out", str(tmp_path)]) == cli.EXIT_USER_ERROR
    assert "holds other files" in capsys.readouterr().err
    code = cli.main(["export", str(workdir), "--stage", "stage1", "--out", str(tmp_path / "d")])
    assert code == cli.EXIT_USER_ERROR
    assert "--format safetensors" in capsys.readouterr().err


# ---- docs/using_latents.md ---------------------------------------------------------------------
def _python_blocks(text: str) -> list[str]:
    return [textwrap.dedent(b) for b in re.findall(r"```python\n(.*?)```", text, re.S)]


def test_using_latents_doc_runs_at_tiny_size(
    exported: dict[str, Exported], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The doc's Python blocks, in order, with its first block (the settings) replaced by tiny
    ones: encode a folder into a latent file, train a small model on it, decode its samples."""
    from PIL import Image

    blocks = _python_blocks((REPO / "docs" / "using_latents.md").read_text())
    settings, rest = blocks[0], blocks[1:]
    assert set(re.findall(r"^([A-Z_]+) =", settings, re.M)) == {
        "MODEL_DIR", "IMAGE_DIR", "LATENT_FILE", "TRAIN_STEPS", "BATCH", "SAMPLE_STEPS",
    }  # fmt: skip
    images = tmp_path / "images"
    images.mkdir()
    x = exported["image"].inputs["x"]  # (N, 1, 16, 16) in [-1, 1]
    for i, example in enumerate(x):
        pixels = ((example[0] + 1) * 127.5).round().clamp(0, 255).byte().numpy()
        Image.fromarray(pixels).save(images / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {
        "MODEL_DIR": str(exported["image"].folder),
        "IMAGE_DIR": str(images),
        "LATENT_FILE": str(tmp_path / "latents.pt"),
        "TRAIN_STEPS": 3,
        "BATCH": 2,
        "SAMPLE_STEPS": 2,
    }
    for block in rest:
        exec(compile(block, "docs/using_latents.md", "exec"), namespace)
    saved = torch.load(tmp_path / "latents.pt")
    assert saved["z"].shape == (N, *pretrained.load(namespace["MODEL_DIR"]).latent_shape)
    samples = namespace["samples"]
    assert samples.shape == (namespace["n"], *x.shape[1:])
    assert float(samples.min()) >= -1 and float(samples.max()) <= 1


def test_a_stage1_alone_exports_and_loads_without_a_base_model(
    exported: dict[str, Exported], tmp_path: Path
) -> None:
    """Stage 1 alone (the run's config with only its first stage), exported over an earlier
    full export: the base model's file goes, the autoencoder is the run's."""
    e = exported["image"]
    out = tmp_path / "stage1-ul"
    shutil.copytree(e.folder, out)
    only_stage1 = ["Experiment.stages = [@stage1/stages.ul_joint()]"]
    config = pretrained.export(e.workdir, out, stats_examples=8, bindings=only_stage1)
    assert config["stage2"] is None
    assert not (out / "base.safetensors").exists()
    model = pretrained.load(out)
    assert model.base_model is None
    assert _close(model.encode(e.inputs["x"]), e.loaded["z"]) <= TOL
    assert _close(model.decode(model.encode(e.inputs["x"]), seed=5), e.loaded["decoded"]) <= TOL
