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

from ulframe.errors import UserError
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

    A metric that cannot judge this data (one with ``inputs = "videos"`` given images, or the
    reverse, or one that raises on their shape) is skipped with one WARNING line: the other
    scalars are still returned. A `UserError` of the metric (a missing weights file) stops.
    """
    video = reference.dim() == 5
    key = "fvd" if video else "fd"
    out: dict[str, Any] = {"fd_samples": len(reference)}
    if not video:
        out["speckle"] = speckle(reference, samples)
    if metric is None:
        return out
    wants = getattr(metric, "inputs", "images")
    if wants in ("images", "videos") and (wants == "videos") != video:
        _skip(metric, reference, f"it compares {wants}")
        return out
    classifies = labels is not None and callable(getattr(metric, "classify", None))
    scores: dict[str, Any] = {}
    try:
        values = dict(
            metric(reference, samples, labels=labels) if classifies else metric(reference, samples)
        )
        name = next(iter(values))
        scores[key] = float(values.pop(name))
        scores[f"{key}_metric"] = name
        scores.update({k: float(v) for k, v in values.items()})
        if real is not None and len(real) == len(reference):
            scores[f"{key}_real"] = float(next(iter(metric(reference, real).values())))
    except UserError:  # asks the user for something (a weights file): say so, stop
        raise
    except Exception as err:  # a metric that cannot apply to this data: one line, no crash
        first = str(err).strip().splitlines()
        _skip(metric, reference, f"{type(err).__name__}: {first[0] if first else ''}")
        return out
    return out | scores


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
