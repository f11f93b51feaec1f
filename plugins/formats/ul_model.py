"""A trained Unified Latents model as a self-contained folder, and `ulframe.load` to use it.

`ulframe export WORKDIR --out DIR` (`export`) writes

    DIR/config.json            every network as its registered plugin name and constructor
                               arguments, the schedules, λ_z(0), data and latent shapes, the data
                               range, the clean latents' per-channel mean and std over the train
                               split, the samplers and steps, the classes, `format_version`
    DIR/encoder.safetensors    EMA weights, one file per network: encoder, prior, decoder, and
    DIR/prior.safetensors      base (the stage-2 base model) when the run has one
    DIR/decoder.safetensors
    DIR/base.safetensors
    DIR/README.md              the model card: data, samples seen, the run's evaluation, loading

and `load(DIR, device=..., dtype=...)` rebuilds the networks from the registry (no gin, no run
directory, no dataset) into the stages' own models, so that every output is computed by the code
that `ulframe sample` and `ulframe eval` run (`ULJointModel.encode_clean`, `decode_latents`,
`bits_per_pixel`; `ULBaseModel.sample`, UL paper Algorithm 2): equal to the run's own outputs for
the same seed (tests/integration/test_export_load.py).

This is the format plugin `ul` (entry-point group `ulframe.formats`, reached through
`ulframe/formats.py`): the folder *is* a UL model, and building the stages' own models rather
than restating their math is what keeps a loaded model's samples the run's own.

Shapes: data x is (B, C, H, W) images or (B, C, T, H, W) clips in [-1, 1]; the clean latent
z = E(x) is (B, *latent_shape); z_0 = alpha(λ_z(0)) z + sigma(λ_z(0)) eps is what the decoder is
conditioned on.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ulframe.errors import UserError

log = logging.getLogger(__name__)

FORMAT = "ul"
"""This format's name: its entry point in `ulframe.formats`, and config.json's "format"."""
FORMAT_VERSION = 1
"""The version `load` reads; a folder of a newer version is refused (one line)."""
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
DATA_RANGE = (-1.0, 1.0)
"""The range of every dataset's examples and of every decoded sample (the engine's contract)."""
NETWORKS = {"encoder": "encoders", "prior": "priors", "decoder": "decoders", "base": "priors"}
"""The exported networks (file `<role>.safetensors`) and their plugin kinds."""
RECORDED_KINDS = ("encoders", "priors", "decoders", "schedules")
"""Plugin kinds whose constructor arguments `export` records while the run is rebuilt."""


# ---- writing: ulframe export WORKDIR --out DIR -------------------------------------------------
@contextlib.contextmanager
def _recording(classes: Sequence[type]) -> Iterator[dict[int, dict[str, Any]]]:
    """Within the block, every construction of one of `classes` records its arguments (bound to
    the signature, defaults applied) under `id(instance)`; the outermost constructor wins when
    a recorded class derives from another. The classes are restored on exit."""
    made: dict[int, dict[str, Any]] = {}
    saved: list[tuple[type, Any]] = []

    def wrap(klass: type, init: Callable[..., None]) -> Callable[..., None]:
        signature = inspect.signature(init)

        def recording_init(self: Any, *args: Any, **kwargs: Any) -> None:
            if id(self) not in made:
                bound = signature.bind(self, *args, **kwargs)
                bound.apply_defaults()
                arguments = dict(bound.arguments)
                arguments.pop(next(iter(signature.parameters)))  # self
                made[id(self)] = arguments
            init(self, *args, **kwargs)

        return recording_init

    try:
        for klass in dict.fromkeys(classes):
            saved.append((klass, klass.__dict__.get("__init__")))
            klass.__init__ = wrap(klass, klass.__init__)  # type: ignore[misc]
        yield made
    finally:
        for klass, init in saved:
            if init is None:
                delattr(klass, "__init__")
            else:
                klass.__init__ = init  # type: ignore[misc]


def _pair(value: Any) -> tuple[float, float] | None:
    """A JSON list of two numbers as a tuple of floats; None stays None."""
    return None if value is None else (float(value[0]), float(value[1]))


def _json_value(value: Any, where: str) -> Any:
    """`value` as JSON (tuples become lists), or a UserError naming `where`."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, tuple | list):
        return [_json_value(v, where) for v in value]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {k: _json_value(v, f"{where}.{k}") for k, v in value.items()}
    raise UserError(
        f"{where} = {value!r} cannot be written to {CONFIG_FILE} (plain numbers, strings, "
        "lists and dicts only)"
    )


def _plugin_spec(
    registry: Any, kind: str, product: Any, made: Mapping[int, dict[str, Any]], where: str
) -> dict[str, Any]:
    """{"plugin": name, "arguments": {...}} of a network or schedule the run built."""
    entry = registry.maker(kind, product)
    if entry is None or id(product) not in made:
        raise UserError(
            f"{where} is a {type(product).__name__}, not built by a registered {kind} plugin "
            "class: it cannot be rebuilt from a name and arguments"
        )
    arguments = {k: _json_value(v, f"{where}.{k}") for k, v in made[id(product)].items()}
    return {"plugin": entry.name, "arguments": arguments}


def _sampler_name(registry: Any, sampler: Callable[..., Any], where: str) -> str:
    """The registered name of a sampler function."""
    target = f"{getattr(sampler, '__module__', '')}:{getattr(sampler, '__qualname__', '')}"
    for entry in registry.entries("samplers"):
        if entry.factory is sampler or entry.target == target:
            return str(entry.name)
    raise UserError(f"{where} is {sampler!r}, not a registered sampler: it cannot be exported")


def _latent_stats(
    encode: Callable[[Tensor], Tensor], source: Any, device: torch.device, limit: int | None
) -> tuple[list[float], list[float], int]:
    """Per-channel mean and std of the clean latents of a split (its first `limit` examples;
    None: all), and the number of examples encoded. Accumulated in float64."""
    from ulframe.data.pipeline import build_loader
    from ulframe.progress import progress

    loader = build_loader(
        source, batch_size=64, shuffle=False, repeat=False, drop_last=False, prefetch=0
    )
    total = sq = None
    count = seen = 0
    total_items = len(source.items) if limit is None else min(limit, len(source.items))
    with progress(total_items, phase="latent statistics", unit="examples") as bar:
        for batch in loader:
            x = batch["x"]
            if limit is not None:
                x = x[: limit - seen]
            z = encode(x.to(device)).double()  # (B, Cz, *s)
            flat = z.transpose(0, 1).reshape(z.shape[1], -1)  # (Cz, B·∏s)
            total = flat.sum(1) if total is None else total + flat.sum(1)
            sq = (flat**2).sum(1) if sq is None else sq + (flat**2).sum(1)
            count += flat.shape[1]
            seen += len(x)
            bar.update(len(x))
            if limit is not None and seen >= limit:
                break
    if total is None or sq is None:
        raise UserError("the train split is empty: no latent statistics to export")
    mean = total / count
    std = (sq / count - mean**2).clamp_min(0).sqrt()
    return mean.tolist(), std.tolist(), seen


def _class_names(dataset: Any, num_classes: int) -> list[str]:
    """The dataset's class names (`class_names` or `classes`), else "0" .. "num_classes-1"."""
    for attribute in ("class_names", "classes"):
        names = getattr(dataset, attribute, None)
        if isinstance(names, Sequence) and not isinstance(names, str) and len(names) == num_classes:
            return [str(n) for n in names]
    return [str(i) for i in range(num_classes)]


def _done(stage_dir: Path) -> dict[str, Any]:
    try:
        found = json.loads((stage_dir / "DONE.json").read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def export(
    workdir: Path, out: Path, stats_examples: int | None = None, bindings: Sequence[str] = ()
) -> dict[str, Any]:
    """Write the trained UL run `workdir` (stage 1 alone, or with its stage-2 base model) as a
    self-contained folder `out` (see the module docstring); returns the config written.

    `stats_examples` caps the train examples whose clean latents give the per-channel mean and
    std (None: the whole train split). `out` must be new, empty, or an earlier export."""
    from ulframe import trained
    from ulframe.registry import Registry
    from ulframe_plugins.stages.ul_base import ULBase, ULBaseModel
    from ulframe_plugins.stages.ul_joint import ULJoint, ULJointModel

    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; name a folder for the export")
    if out.is_dir() and any(out.iterdir()) and not (out / CONFIG_FILE).is_file():
        raise UserError(
            f"--out {out} is a folder that holds other files; name a new folder (or "
            "FILE.safetensors for one stage's weights)"
        )
    registry = Registry()
    classes = [e.factory for kind in RECORDED_KINDS for e in registry.entries(kind)]
    with _recording([c for c in classes if isinstance(c, type)]) as made:
        run = trained.open_run(workdir, trained.config_files(workdir), bindings)
    joint = next((r for r in run.stages if isinstance(r.model, ULJointModel)), None)
    base = next((r for r in run.stages if isinstance(r.model, ULBaseModel)), None)
    if joint is None:
        kinds = ", ".join(type(r.stage).__name__ for r in run.stages)
        raise UserError(
            f"{workdir}: no stage is a UL stage 1 (stages.ul_joint) to export (stages: {kinds}); "
            "export one stage's weights with --stage NAME --format safetensors"
        )
    model: Any = joint.model
    stage1: Any = joint.stage
    assert isinstance(stage1, ULJoint)
    experiment = run.experiment
    reg = run.registry
    networks: dict[str, nn.Module] = {
        "encoder": model.encoder,
        "prior": model.prior,
        "decoder": model.decoder,
    }
    specs = {
        role: _plugin_spec(reg, NETWORKS[role], net, made, f"{stage1.name}.{role}")
        for role, net in networks.items()
    }
    num_classes = int(experiment.dataset.num_classes)
    mean, std, counted = _latent_stats(
        model.encode_clean, experiment.dataset.source("train"), run.device, stats_examples
    )
    config: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "data": {
            "shape": list(model.image_shape),
            "range": list(DATA_RANGE),
            "dtype": "float32",
            "dataset": getattr(reg.maker("datasets", experiment.dataset), "name", None),
            "num_classes": num_classes,
            "class_names": _class_names(experiment.dataset, num_classes),
        },
        "latent": {
            "shape": list(model.latent_shape),
            "logsnr_max": float(model.latent_logsnr_max),
            "mean": mean,
            "std": std,
            "stats_examples": counted,
        },
        "stage1": {
            "networks": specs,
            "prior_schedule": _plugin_spec(
                reg, "schedules", model.prior_schedule, made, f"{stage1.name}.prior_schedule"
            ),
            "decoder_schedule": _plugin_spec(
                reg, "schedules", model.decoder_schedule, made, f"{stage1.name}.decoder_schedule"
            ),
            "loss_factor": float(model.loss_factor),
            "decoder_context_frames": int(model.context_frames),
            "sampler": _sampler_name(reg, stage1.sampler, f"{stage1.name}.sampler"),
            "steps": int(stage1.sample_steps),
            "bits_per_pixel_t": int(stage1.eval_t_per_example),
        },
        "stage2": None,
        "run": {"seed": int(experiment.seed), "samples_seen": {}},
    }
    run_info = config["run"]
    run_info["samples_seen"][stage1.name] = _done(joint.stage_dir).get("samples_seen")
    if base is not None:
        stage2: Any = base.stage
        assert isinstance(stage2, ULBase)
        bmodel: Any = base.model
        networks["base"] = bmodel.base
        config["stage2"] = {
            "networks": {
                "base": _plugin_spec(reg, "priors", bmodel.base, made, f"{stage2.name}.base")
            },
            "schedule": _plugin_spec(
                reg, "schedules", bmodel.schedule, made, f"{stage2.name}.schedule"
            ),
            "num_classes": int(bmodel.num_classes),
            "sampler": _sampler_name(reg, stage2.sampler, f"{stage2.name}.sampler"),
            "steps": int(stage2.sample_steps),
            "decoder_steps": stage2.decoder_sample_steps,
            "decoder_sampler": (
                None
                if stage2.decoder_sampler is None
                else _sampler_name(reg, stage2.decoder_sampler, f"{stage2.name}.decoder_sampler")
            ),
            "temperature": float(bmodel.temperature),
            "stack_context": bool(bmodel.stack_context),
            "guidance": float(stage2.guidance_scale),
            "guidance_interval": _json_value(stage2.guidance_interval, "guidance_interval"),
            "context_frames": int(bmodel.context_frames),
            "context_latent_steps": int(bmodel.context_latent_steps),
            "rollout_steps": int(bmodel.rollout_steps),
            "noisy_context": bool(bmodel.noisy_context),
            "window_steps": int(bmodel.window_steps),
            "context_noise": _json_value(bmodel.context_noise, "context_noise"),
            "context_noise_sample": float(bmodel.context_noise_sample),
            "context_dropout": float(bmodel.context_dropout),
            "anchor_context": bool(bmodel.anchor_context),
        }
        run_info["samples_seen"][stage2.name] = _done(base.stage_dir).get("samples_seen")
    evaluation = workdir / trained.EVAL_FILE
    if evaluation.is_file():
        with contextlib.suppress(ValueError):
            scalars = json.loads(evaluation.read_text())
            run_info["eval"] = {k: v for k, v in scalars.items() if isinstance(v, int | float)}
    write_folder(out, config, networks, workdir.name)
    return config


def write_folder(
    out: Path, config: Mapping[str, Any], networks: Mapping[str, nn.Module], source: str = ""
) -> None:
    """Write an exported folder: `<role>.safetensors` of each network's state dict, then
    config.json and the model card (`source`: the run's name shown in the card). Each file is
    written atomically; a `<role>.safetensors` of an earlier export whose role is gone is
    removed."""
    from safetensors.torch import save

    from ulframe import rundir

    out.mkdir(parents=True, exist_ok=True)
    for role, network in networks.items():
        tensors = {
            k: v.detach().cpu().contiguous().clone() for k, v in network.state_dict().items()
        }
        rundir.write_bytes(out / f"{role}.safetensors", save(tensors, metadata={"role": role}))
    for role in set(NETWORKS) - set(networks):
        (out / f"{role}.safetensors").unlink(missing_ok=True)
    rundir.write_text(out / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    rundir.write_text(out / CARD_FILE, model_card(config, source))


def _shape(values: Sequence[int]) -> str:
    return "×".join(str(v) for v in values)


def model_card(config: Mapping[str, Any], source: str = "") -> str:
    """The README.md of an exported folder: what the model is, what it was trained on and how
    well it did (the run's eval.json), how to load it."""
    data, latent, stage2 = config["data"], config["latent"], config["stage2"]
    nets = config["stage1"]["networks"] | (stage2["networks"] if stage2 else {})
    kind = "clips (C, T, H, W)" if len(data["shape"]) == 4 else "images (C, H, W)"
    lines = [
        "# A Unified Latents model (ulframe)",
        "",
        f"Exported by `ulframe export`{f' from `{source}`' if source else ''}: "
        "the EMA weights of a UL encoder, its diffusion prior and diffusion decoder"
        + (" and a stage-2 base model" if stage2 else "")
        + ".",
        "",
        "| what | value |",
        "|---|---|",
        f"| data | `{data['dataset']}`: {kind} {_shape(data['shape'])}, values in "
        f"[{data['range'][0]:g}, {data['range'][1]:g}] |",
        f"| classes | {data['num_classes']}"
        + (f": {', '.join(data['class_names'][:20])}" if data["num_classes"] else "")
        + (" ..." if data["num_classes"] > 20 else "")
        + " |",
        f"| clean latent | {_shape(latent['shape'])}; λ_z(0) = {latent['logsnr_max']:g} |",
        "| networks | " + ", ".join(f"{r}: `{s['plugin']}`" for r, s in nets.items()) + " |",
    ]
    if stage2:
        frames = stage2["context_frames"]
        conditioned = (f"continues clips from their first {frames} frames" if frames
                       else "draws new examples")  # fmt: skip
        classes = "class-conditional" if stage2["num_classes"] else "unconditional"
        lines.append(
            f"| base model | {classes}, {conditioned}: `{stage2['sampler']}`, {stage2['steps']} "
            f"steps, guidance {stage2['guidance']:g}"
            + (
                f", temperature {stage2['temperature']:g}"
                if stage2.get("temperature", 1) != 1
                else ""
            )
            + (f"; decoder `{stage2['decoder_sampler']}`" if stage2.get("decoder_sampler") else "")
            + " |"
        )
    for stage, seen in config["run"]["samples_seen"].items():
        if seen is not None:
            lines.append(f"| samples seen, {stage} | {seen:,} |")
    for name, value in config["run"].get("eval", {}).items():
        lines.append(f"| eval: {name} | {value:.4g} |")
    lines += [
        "",
        "## Load it",
        "",
        "```python",
        "import ulframe",
        "",
        'model = ulframe.load("PATH/TO/THIS/FOLDER", device="cpu")',
        "z = model.encode(x)              # x: (B, "
        + ("C, T, H, W" if len(data["shape"]) == 4 else "C, H, W")
        + ") in [-1, 1] -> clean latents",
        "x_hat = model.decode(z, steps=32)  # adds the λ_z(0) noise, then samples the decoder",
        "bpp = model.bits_per_pixel(x)    # the prior's bound on the latent's bits, per pixel",
    ]
    if stage2:
        lines.append(
            "samples = model.sample(8"
            + (", context=clips" if stage2["context_frames"] else "")
            + (", labels=3" if stage2["num_classes"] else "")
            + ")  # end-to-end samples (base model -> z_0 -> decoder)"
        )
    lines += [
        "```",
        "",
        "Per-channel mean and std of the clean latents over the train split are in `config.json`"
        " (`latent.mean`, `latent.std`; `model.latent_mean`, `model.latent_std`): normalise with"
        " them before training another model on the latents.",
        "",
    ]
    return "\n".join(lines)


# ---- reading: ulframe.load(DIR) ----------------------------------------------------------------
def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples constructors were given."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder (an export of `ulframe export RUN --out DIR`)")
    if not path.is_file():
        raise UserError(f"{path}: missing; {folder} is not a folder written by `ulframe export`")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise UserError(f"{path}: not a ulframe export (its \"format\" is not '{FORMAT}')")
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(
            f"{path}: format version {version!r} is newer than this ulframe reads "
            f"({FORMAT_VERSION}); upgrade ulframe"
        )
    return config


def _build(registry: Any, kind: str, spec: Mapping[str, Any], where: str) -> Any:
    """The plugin `spec["plugin"]` of `kind` called with `spec["arguments"]`."""
    try:
        factory = registry.get(kind, spec["plugin"]).factory
        return factory(**_tuples(spec["arguments"]))
    except (KeyError, TypeError) as err:
        raise UserError(f"{where}: cannot build {kind}.{spec.get('plugin')} ({err})") from err
    except UserError as err:
        raise UserError(f"{where}: {err}") from err


def _load_weights(network: nn.Module, path: Path, role: str) -> None:
    """Load `path` into `network`, or a one-line UserError naming the file and what is wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise UserError(f"{path}: missing (the {role}'s weights, named by {CONFIG_FILE})")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise UserError(f"{path}: not a readable safetensors file ({err})") from err
    expected = network.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        what = (
            f"lacks {len(missing)} tensors of the {role} (e.g. '{missing[0]}')"
            if missing
            else f"has {len(extra)} tensors the {role} does not (e.g. '{extra[0]}')"
        )
        raise UserError(f"{path}: {what}; it does not fit the {role} built from {CONFIG_FILE}")
    for key, value in tensors.items():
        if value.shape != expected[key].shape:
            raise UserError(
                f"{path}: tensor '{key}' has shape {tuple(value.shape)}, the {role} built from "
                f"{CONFIG_FILE} has {tuple(expected[key].shape)}"
            )
    network.load_state_dict(tensors)


@dataclass(frozen=True)
class _Sampling:
    """A sampler function, its registered name, and its default steps."""

    name: str
    fn: Callable[..., Tensor]
    steps: int


class Pretrained:
    """A loaded UL model (`load`): encode, decode, sample, bits per pixel.

    Attributes:
        path: the exported folder.
        config: its config.json.
        device, dtype: where the networks are and the dtype of their weights.
        data_shape: (C, H, W) or (C, T, H, W) of one example; values in `data_range`.
        latent_shape: (Cz, *s) of one clean latent.
        latent_logsnr_max: λ_z(0), the log-SNR of the noise a clean latent gets before decoding.
        latent_mean, latent_std: (Cz,) float32 tensors on `device`: per-channel statistics of the
            clean latents over the train split (normalise with them to train on the latents).
        class_names: the dataset's classes (the labels of `sample`), [] without classes.
        seed: the run's seed, every call's default (as `ulframe sample`'s).
        autoencoder: the stage-1 model (encoder, prior, decoder; `ULJointModel`), eval mode.
        base_model: the stage-2 model (`ULBaseModel`) or None when no base model was exported.
    """

    def __init__(
        self, path: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> None:
        from ulframe.diffusion import ELBOWeighting
        from ulframe.registry import Registry
        from ulframe_plugins.stages.ul_base import ULBaseModel
        from ulframe_plugins.stages.ul_joint import ULJointModel

        self.path = Path(path)
        self.config = config = _read_config(self.path)
        self.device = torch.device(device)
        self.dtype = dtype
        where = str(self.path / CONFIG_FILE)
        try:
            data, latent, stage1, stage2 = (
                config[k] for k in ("data", "latent", "stage1", "stage2")
            )
            self.data_shape: tuple[int, ...] = tuple(data["shape"])
            self.data_range: tuple[float, float] = (
                float(data["range"][0]),
                float(data["range"][1]),
            )
            self.latent_shape: tuple[int, ...] = tuple(latent["shape"])
            self.latent_logsnr_max = float(latent["logsnr_max"])
            self.class_names: list[str] = list(data["class_names"])
            mean, std = latent["mean"], latent["std"]
        except (KeyError, TypeError, IndexError) as err:
            raise UserError(f"{where}: malformed, {err!r} missing or of the wrong type") from err
        if len(mean) != self.latent_shape[0] or len(std) != self.latent_shape[0]:
            raise UserError(
                f"{where}: latent.mean and latent.std need {self.latent_shape[0]} values (one per "
                f"latent channel), got {len(mean)} and {len(std)}"
            )
        self.latent_mean = torch.tensor(mean, dtype=torch.float32, device=self.device)
        self.latent_std = torch.tensor(std, dtype=torch.float32, device=self.device)
        registry = Registry()
        nets = {
            role: _build(registry, NETWORKS[role], spec, f"{where}: stage1.networks.{role}")
            for role, spec in stage1["networks"].items()
        }
        if set(nets) != {"encoder", "prior", "decoder"}:
            raise UserError(f"{where}: stage1.networks must be encoder, prior and decoder")
        for role, network in nets.items():
            _load_weights(network, self.path / f"{role}.safetensors", role)
        prior_schedule = _build(registry, "schedules", stage1["prior_schedule"], where)
        decoder_schedule = _build(registry, "schedules", stage1["decoder_schedule"], where)
        self._decoding = _Sampling(
            stage1["sampler"], registry.get("samplers", stage1["sampler"]).factory, stage1["steps"]
        )
        self._bits_t = int(stage1["bits_per_pixel_t"])
        self.seed = int(config.get("run", {}).get("seed", 0))
        # The stages' own modules; what only training reads (the decoder's weighting, label
        # dropout) is inert here.
        self.autoencoder = ULJointModel(
            nets["encoder"],
            nets["prior"],
            nets["decoder"],
            prior_schedule,
            decoder_schedule,
            ELBOWeighting(),
            float(stage1["loss_factor"]),
            self.latent_logsnr_max,
            math.prod(self.data_shape[1:]),
            self.data_shape,
            self.latent_shape,
            int(stage1.get("decoder_context_frames", 0)),
        )
        self.autoencoder.to(self.device, dtype).eval().requires_grad_(False)
        self.base_model: Any = None
        self._stage2: dict[str, Any] = stage2 or {}
        if stage2:
            base = _build(
                registry, "priors", stage2["networks"]["base"], f"{where}: stage2.networks.base"
            )
            _load_weights(base, self.path / "base.safetensors", "base")
            schedule = _build(registry, "schedules", stage2["schedule"], where)
            self._sampling = _Sampling(
                stage2["sampler"],
                registry.get("samplers", stage2["sampler"]).factory,
                stage2["steps"],
            )
            self.base_model = ULBaseModel(
                self.autoencoder,
                base,
                schedule,
                ELBOWeighting(),
                0.0,
                stage2["num_classes"],
                self.latent_shape,
                self.data_shape,
                stage2["context_frames"],
                stage2["context_latent_steps"],
                stage2.get("rollout_steps", 0),  # absent from files written before it
                stage2.get("noisy_context", False),
                stage2.get("window_steps", 0),
                _pair(stage2.get("context_noise")),
                stage2.get("context_noise_sample", 0.0),
                stage2.get("context_dropout", 0.0),
                stage2.get("anchor_context", False),
                temperature=float(stage2.get("temperature", 1.0)),
                stack_context=bool(stage2.get("stack_context", False)),
            )
            decoder = stage2.get("decoder_sampler")
            self._decoder_sampling = (
                self._sampling
                if decoder is None
                else _Sampling(
                    decoder, registry.get("samplers", decoder).factory, self._sampling.steps
                )
            )
            self.base_model.to(self.device, dtype).eval().requires_grad_(False)

    # -- helpers ----------------------------------------------------------------------------
    def _generator(self, seed: int | None, generator: torch.Generator | None) -> torch.Generator:
        if generator is not None:
            return generator
        return torch.Generator(self.device).manual_seed(self.seed if seed is None else seed)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Lower-precision weights compute under autocast (the samplers' chains stay float32)."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _sampler(self, sampler: str | Callable[..., Tensor] | None, default: _Sampling) -> Any:
        if sampler is None:
            return default.fn
        if callable(sampler):
            return sampler
        from ulframe.registry import Registry

        return Registry().get("samplers", sampler).factory

    def _expected_data(self, what: str = "x") -> str:
        dims = "(B, C, T, H, W)" if len(self.data_shape) == 4 else "(B, C, H, W)"
        lo, hi = self.data_range
        return (
            f"{what} of shape {dims} = (B, {', '.join(map(str, self.data_shape))}), a floating "
            f"dtype (weights: {self.dtype}), values in [{lo:g}, {hi:g}]"
        )

    def _check_data(self, x: Any, what: str = "x", frames: tuple[int, ...] | None = None) -> Tensor:
        """x on the device, float, or a one-line UserError stating shape, dtype and range."""
        expected = self._expected_data(what)
        if not isinstance(x, Tensor):
            raise UserError(f"expected {expected}; got a {type(x).__name__}")
        shape = frames or self.data_shape
        if x.dim() != len(shape) + 1 or tuple(x.shape[1:]) != shape:
            raise UserError(f"expected {expected}; got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise UserError(f"expected {expected}; got dtype {x.dtype}")
        lo, hi = self.data_range
        if x.numel() and (float(x.min()) < lo - 1e-3 or float(x.max()) > hi + 1e-3):
            raise UserError(
                f"expected {expected}; got values in [{float(x.min()):.4g}, {float(x.max()):.4g}]"
            )
        return x.to(self.device, torch.float32)

    def _check_latent(self, z: Any) -> Tensor:
        expected = f"z of shape (B, {', '.join(map(str, self.latent_shape))}) and a floating dtype"
        if not isinstance(z, Tensor):
            raise UserError(f"expected {expected}; got a {type(z).__name__}")
        if z.dim() != len(self.latent_shape) + 1 or tuple(z.shape[1:]) != self.latent_shape:
            raise UserError(f"expected {expected}; got shape {tuple(z.shape)}")
        if not z.is_floating_point():
            raise UserError(f"expected {expected}; got dtype {z.dtype}")
        return z.to(self.device, torch.float32)

    # -- the model ------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Classes the base model is conditioned on (0: unconditional or no base model)."""
        return int(self._stage2.get("num_classes", 0))

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """The clean latent z = E(x), what a downstream model models: x (B, *data_shape) in
        the data range -> (B, *latent_shape), float32. Deterministic."""
        x = self._check_data(x)
        with self._autocast():
            return self.autoencoder.encode_clean(x.to(self.dtype)).float()

    @torch.no_grad()
    def decode(
        self,
        z: Tensor,
        steps: int | None = None,
        sampler: str | Callable[..., Tensor] | None = None,
        noised: bool = False,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        context: Tensor | None = None,
    ) -> Tensor:
        """Data (B, *data_shape) in the data range, sampled from the diffusion decoder.

        Args:
            z: (B, *latent_shape). A clean latent (`encode`'s output, or a downstream model's
                sample of one): it gets the λ_z(0) noise first, z_0 = alpha z + sigma eps
                (UL's z_0). With `noised=True`, z is already a z_0 (a base model's chain state
                at λ_z(0), Algorithm 2) and is decoded as it is.
            steps: decoder steps (default: the run's); sampler: a registered sampler name or a
                sampler function (default: the run's).
            seed, generator: the noise (eps of z_0, the decoder's chain); default: `seed`.
            context: (B, *data_shape) clips whose continuation `z` is: a decoder conditioned on
                the first frames of a clip (`ul_joint.decoder_context_frames`) needs them.
        """
        from ulframe.diffusion import diffuse

        z = self._check_latent(z)
        if steps is not None and steps < 1:
            raise UserError(f"steps must be >= 1, got {steps}")
        generator = self._generator(seed, generator)
        if not noised:
            eps = torch.randn(z.shape, generator=generator, device=self.device)
            logsnr = torch.full((z.shape[0],), self.latent_logsnr_max, device=self.device)
            z = diffuse(z, logsnr, eps)
        with self._autocast():
            return self.autoencoder.decode_latents(
                z, generator, self._sampler(sampler, self._decoding),
                steps or self._decoding.steps,
                context=None if context is None else self._check_data(context).to(self.dtype),
            ).float()  # fmt: skip

    @torch.no_grad()
    def sample(
        self,
        n: int,
        labels: int | Sequence[int] | Tensor | None = None,
        guidance: float | None = None,
        context: Tensor | None = None,
        steps: int | None = None,
        sampler: str | Callable[..., Tensor] | None = None,
        decoder_steps: int | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """n end-to-end samples (UL paper Algorithm 2: base model -> z_0 -> decoder), (n,
        *data_shape) in the data range; what `ulframe sample -n n` draws (same seed, labels,
        guidance and steps: the defaults are the run's).

        Args:
            labels: a class index for all, n indices, or None: the classes in class order
                (as `ulframe sample`); ignored without classes.
            guidance: classifier-free guidance scale (default: the run's).
            context: for a model that continues clips, the n real clips (n, C, T, H, W) whose
                first frames it continues (those frames are returned as they are).
            steps: base-model and decoder steps (default: the run's, each).
            sampler: a registered sampler name or a sampler function, for the base model and
                the decoder alike (default: the run's, each; the base model's chains start
                at the run's temperature); decoder_steps: the decoder's steps
                alone (default: `steps`, else the run's). As `ulframe sample --sampler S
                --steps N --decoder-steps M`.
            seed, generator: the noise; default: `seed`, the run's.
        """
        if self.base_model is None:
            raise UserError(
                f"{self.path} holds no base model (stage 2 was not exported): sample needs one; "
                "decode latents from another model with decode(z)"
            )
        if n < 1:
            raise UserError(f"n must be >= 1, got {n}")
        for name, value in (("steps", steps), ("decoder_steps", decoder_steps)):
            if value is not None and value < 1:
                raise UserError(f"{name} must be >= 1, got {value}")
        s2, device = self._stage2, self.device
        classes = self.num_classes
        label_tensor: Tensor | None = None
        if classes:
            if labels is None:  # class order, as the stage's `sample_labels`
                label_tensor = torch.arange(n, device=device) * classes // n
            else:
                label_tensor = torch.as_tensor(labels, device=device).long().reshape(-1)
                if label_tensor.numel() == 1:
                    label_tensor = label_tensor.expand(n)
                if label_tensor.shape != (n,) or not bool(
                    ((label_tensor >= 0) & (label_tensor < classes)).all()
                ):
                    raise UserError(
                        f"labels must be one class or {n} classes in [0, {classes}), got "
                        f"{labels if not isinstance(labels, Tensor) else tuple(labels.shape)}"
                    )
        if s2["context_frames"]:
            if context is None:
                raise UserError(
                    f"this model continues clips: pass context, {n} clips "
                    f"{self._expected_data('context')}"
                )
            context = self._check_data(context, "context")
            if len(context) != n:
                raise UserError(f"context holds {len(context)} clips for n = {n}")
        elif context is not None:
            raise UserError("context is for a model that continues clips; this one does not")
        generator = self._generator(seed, generator)
        if decoder_steps is None:
            decoder_steps = steps or s2["decoder_steps"]
        interval = s2["guidance_interval"]
        with self._autocast():
            return self.base_model.sample(
                n,
                generator,
                label_tensor,
                self._sampler(sampler, self._sampling),
                steps or self._sampling.steps,
                decoder_steps,
                self._stage2["guidance"] if guidance is None else float(guidance),
                tuple(interval) if interval is not None else None,
                context,
                self._sampler(sampler, self._decoder_sampling),
            ).float()

    @torch.no_grad()
    def bits_per_pixel(
        self,
        x: Tensor,
        t_per_example: int | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The prior's bound on the bits of each example's latent per pixel (H·W, T·H·W for
        clips), (B,): `t_per_example` stratified diffusion times each (default: the run's
        evaluation's); seed, generator: the times and noise (default: `seed`)."""
        x = self._check_data(x)
        num_t = self._bits_t if t_per_example is None else t_per_example
        if num_t < 1:
            raise UserError(f"t_per_example must be >= 1, got {num_t}")
        with self._autocast():
            return self.autoencoder.bits_per_pixel(
                x.to(self.dtype), self._generator(seed, generator), num_t
            ).float()

    # -- Hugging Face Hub conventions ----------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> Path:
        """Copy the exported folder to `folder` (config.json, weights, card); returns it."""
        target = Path(folder)
        target.mkdir(parents=True, exist_ok=True)
        if target.resolve() != self.path.resolve():
            for path in self.path.iterdir():
                if path.is_file():
                    shutil.copy2(path, target / path.name)
        return target

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        token: str | None = None,
    ) -> Pretrained:
        """A local exported folder, or a Hugging Face Hub repository id downloaded with
        `huggingface_hub.snapshot_download` (the optional extra `ulframe[hub]`)."""
        path = Path(name_or_path)
        if not path.exists():
            try:
                from huggingface_hub import snapshot_download
            except ImportError as err:
                raise UserError(
                    f"{name_or_path}: no such folder; a Hub repository needs huggingface_hub "
                    "(pip install 'ulframe[hub]')"
                ) from err
            path = Path(
                snapshot_download(
                    str(name_or_path), revision=revision, cache_dir=cache_dir, token=token
                )
            )
        return cls(path, device, dtype)

    def push_to_hub(self, repo_id: str, private: bool = False, token: str | None = None) -> str:
        """Upload the exported folder to the Hub repository `repo_id` (created if needed);
        returns the commit URL. Needs huggingface_hub (the optional extra `ulframe[hub]`)."""
        try:
            from huggingface_hub import HfApi
        except ImportError as err:
            raise UserError(
                "push_to_hub needs huggingface_hub (pip install 'ulframe[hub]')"
            ) from err
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        return str(api.upload_folder(folder_path=str(self.path), repo_id=repo_id))

    def __repr__(self) -> str:
        base = ", base model" if self.base_model is not None else ""
        return (
            f"Pretrained({str(self.path)!r}: data {self.data_shape}, latent "
            f"{self.latent_shape}{base}, {self.device}, {self.dtype})"
        )


def load(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Pretrained:
    """The model of an exported folder (`ulframe export RUN --out DIR`), on `device` with
    weights of `dtype`: no gin, no run directory, no dataset. Bad folders (a missing weights
    file, a newer format version, weights of the wrong shape) raise one-line UserErrors."""
    return Pretrained(Path(path), device, dtype)
