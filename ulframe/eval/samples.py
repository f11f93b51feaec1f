"""Judging generated samples against real data: what `ulframe eval` reports about samples.

:func:`draw_samples` draws samples of a sampling stage in chunks; :func:`judge_samples` turns
(real eval examples, as many samples, the labels they were drawn for, as many real train
examples) into the scalars a reader needs to tell whether the samples are good and what "good"
is on this data:

- ``fd`` (images) or ``fvd`` (clips): the sample metric's Fréchet distance, eval vs samples;
- ``fd_real`` / ``fvd_real``: the same distance between the real eval and train examples (as
  many): the value a perfect generator would reach at this sample count;
- ``class_accuracy``: when the metric classifies (e.g. ``metrics.fd_digits``), the fraction of
  samples drawn for label c that it labels c;
- ``speckle`` (images): mean absolute Laplacian of the samples over that of the real eval
  images (:func:`ulframe.eval.metrics.speckle`): 1 is as clean as the data, above 1 noisier.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import Tensor

from ulframe.eval.metrics import speckle

logger = logging.getLogger(__name__)


def judge_samples(
    metric: Any | None,
    reference: Tensor,
    samples: Tensor,
    labels: Tensor | None = None,
    real: Tensor | None = None,
) -> dict[str, Any]:
    """Scalars about `samples` (N, C, *S) in [-1, 1] against real `reference` examples.

    Args:
        metric: a metric plugin ``metric(reference, estimate) -> {name: value}`` (its first
            value is the Fréchet distance); one that defines ``classify`` also takes
            ``labels=``. None: only ``speckle``.
        reference: real eval examples (N, C, *S).
        samples: generated examples, as many.
        labels: (N,) the classes the samples were drawn for, or None (unconditional).
        real: real train examples, as many as `reference`, for ``fd_real``; None: skipped.

    A metric that declares it cannot judge this data is skipped with one WARNING line, the
    other scalars still returned: its ``inputs`` kind is not the data's (``"videos"`` given
    images, or the reverse; ``"images"`` when it says nothing), or its ``in_channels`` (0:
    any) is not the data's channel count and it cannot adapt channels (no
    ``adapt_channels``, as `ulframe.eval.frechet.FeatureFrechetMetric` has). Anything the
    metric raises on data it declares it takes (out of memory, a bug, a `UserError` such as a
    missing weights file) propagates.
    """
    video = reference.dim() == 5
    key = "fvd" if video else "fd"
    out: dict[str, Any] = {"fd_samples": len(reference)}
    if not video:
        out["speckle"] = speckle(reference, samples)
    if metric is None:
        return out
    mismatch = _mismatch(metric, reference)
    if mismatch:
        _skip(metric, reference, mismatch)
        return out
    classifies = labels is not None and callable(getattr(metric, "classify", None))
    values = dict(
        metric(reference, samples, labels=labels) if classifies else metric(reference, samples)
    )
    name = next(iter(values))
    out[key] = float(values.pop(name))
    out[f"{key}_metric"] = name
    out.update({k: float(v) for k, v in values.items()})
    if real is not None and len(real) == len(reference):
        out[f"{key}_real"] = float(next(iter(metric(reference, real).values())))
    return out


def _mismatch(metric: Any, reference: Tensor) -> str:
    """Why `metric` declares it cannot judge examples like `reference` ("": it can)."""
    video = reference.dim() == 5
    wants = getattr(metric, "inputs", "images")
    if wants in ("images", "videos") and (wants == "videos") != video:
        return f"it compares {wants}"
    takes, channels = getattr(metric, "in_channels", 0), reference.shape[1]
    if isinstance(takes, int) and takes not in (0, channels):
        if not callable(getattr(metric, "adapt_channels", None)):
            return f"it takes {takes}-channel inputs"
    return ""


def _skip(metric: Any, reference: Tensor, why: str) -> None:
    """One WARNING line: the metric is skipped on this data, and why."""
    name = getattr(metric, "name", type(metric).__name__)
    logger.warning(
        "metric %s skipped: it cannot judge examples of shape %s (%s)",
        name, tuple(reference.shape[1:]), why,
    )  # fmt: skip


def draw_samples(
    stage: Any,
    model: Any,
    n: int,
    num_classes: int,
    device: Any,
    seed: int,
    context: Tensor | None = None,
    chunk: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """n samples of a sampling stage (`protocols.SamplingStage`) with its own settings, in
    chunks, for labels covering the classes (`stage.sample_labels`): (samples, labels or None)
    on CPU. Samples that continue real examples (`sample_settings(model).continues`) continue
    the examples of `context`, as many."""
    import torch

    from ulframe.progress import progress

    generator = torch.Generator(device).manual_seed(seed)
    labels = stage.sample_labels(n, device, num_classes)
    samples = []
    with torch.no_grad(), progress(n, phase="sampling", unit="samples") as bar:
        for start in range(0, n, chunk):
            part = slice(start, min(n, start + chunk))
            count = part.stop - part.start
            samples.append(
                stage.sample(
                    model, count, None if labels is None else labels[part], generator=generator,
                    context=None if context is None else context[part],
                ).cpu()
            )  # fmt: skip
            bar.update(count)
    return torch.cat(samples), (None if labels is None else labels.cpu())
