"""Judging generated samples against real data: what `ulframe eval` reports about samples.

One function, :func:`judge_samples`, turns (real eval examples, as many samples, the labels
they were drawn for, as many real train examples) into the scalars a reader needs to tell
whether the samples are good and what "good" is on this data:

- ``fd`` (images) or ``fvd`` (clips): the sample metric's Fréchet distance, eval vs samples;
- ``fd_real`` / ``fvd_real``: the same distance between the real eval and train examples (as
  many): the value a perfect generator would reach at this sample count;
- ``class_accuracy``: when the metric classifies (e.g. ``metrics.fd_digits``), the fraction of
  samples drawn for label c that it labels c;
- ``speckle`` (images): mean absolute Laplacian of the samples over that of the real eval
  images (:func:`ulframe.eval.metrics.speckle`): 1 is as clean as the data, above 1 noisier.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ulframe.eval.metrics import speckle


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
    """
    video = reference.dim() == 5
    key = "fvd" if video else "fd"
    out: dict[str, Any] = {"fd_samples": len(reference)}
    if not video:
        out["speckle"] = speckle(reference, samples)
    if metric is None:
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
