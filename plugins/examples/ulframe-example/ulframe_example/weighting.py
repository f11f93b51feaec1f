"""EDM's loss weighting (Karras et al. 2022) as a weighting ``w(λ)`` of the ELBO integrand.

ulframe's weighted loss (Kingma & Gao 2023, "Understanding Diffusion Objectives") is

    L_w = E_{t ~ U(0, 1)} [ (-dλ/dt) · ½ · w(λ_t) · ||eps - eps_hat||² ],

so any weighting of the noise levels, including one induced by a sampling density of the noise
level, is a function ``w(λ)``. EDM samples ``ln σ ~ N(P_mean, P_std²)`` and weights the
x-prediction error by ``(σ² + σ_data²) / (σ · σ_data)²``. EDM's σ is the noise-to-signal ratio
``σ/α`` of a variance-preserving process, so ``λ = -2 ln σ`` and ``||x̂ - x||² = σ² ||eps_hat -
eps||²``. Moving the density of λ from the sampling into the weight gives the weighting Kingma &
Gao list for EDM:

    w(λ) = N(λ; -2·P_mean, (2·P_std)²) · (exp(-λ) + σ_data²) / σ_data²

With EDM's defaults (P_mean = -1.2, P_std = 1.2, σ_data = 0.5): ``N(λ; 2.4, 2.4²)``. The
weight is evaluated in log space, so it stays finite at very negative λ where ``exp(-λ)``
alone would overflow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass(frozen=True)
class EDMWeighting:
    """EDM weighting on log-SNR: ``w(λ) = N(λ; -2 P_mean, (2 P_std)²) (e^-λ + σ_data²) / σ_data²``.

    Args:
        p_mean: mean of EDM's ``ln σ`` sampling density (EDM: -1.2).
        p_std: standard deviation of EDM's ``ln σ`` sampling density (EDM: 1.2).
        sigma_data: standard deviation of the data (EDM: 0.5 for images in [-1, 1]).
    """

    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_data: float = 0.5

    def __post_init__(self) -> None:
        if not (self.p_std > 0 and self.sigma_data > 0):
            raise ValueError(
                f"EDMWeighting needs p_std > 0 and sigma_data > 0, got p_std={self.p_std}, "
                f"sigma_data={self.sigma_data}"
            )

    def log_weight(self, logsnr: Tensor) -> Tensor:
        """``log w(λ)``, same shape as ``logsnr``."""
        mean = -2.0 * self.p_mean  # λ = -2 ln σ
        std = 2.0 * self.p_std
        log_density = -0.5 * ((logsnr - mean) / std) ** 2 - math.log(std) - LOG_SQRT_2PI
        log_sigma_data_sq = 2.0 * math.log(self.sigma_data)
        log_sq = torch.logaddexp(-logsnr, torch.full_like(logsnr, log_sigma_data_sq))
        return log_density + log_sq - log_sigma_data_sq  # log[(e^-λ + σ_d²) / σ_d²]

    def __call__(self, logsnr: Tensor) -> Tensor:
        """``w(logsnr)``, same shape as ``logsnr``."""
        return torch.exp(self.log_weight(logsnr))
