"""The Normal prior of the paper's Table 5 as a prior plugin: the exact denoiser of N(0, I) latents.

For z_clean ~ N(0, I) and z_t = alpha z_clean + sigma eps, the Bayes-optimal predictions are

    x_hat = E[z_clean | z_t] = alpha z_t,    eps_hat = E[eps | z_t] = sigma z_t,

so the v-prediction `v = alpha eps_hat - sigma x_hat = (alpha sigma - sigma alpha) z_t` is exactly
0 at every noise level. A network that returns zeros is therefore the diffusion model of the
standard normal, and the stage-1 prior loss that `stages.ul_joint` computes with it, the diffusion
ELBO over [λ_min, λ_z(0)] plus KL_1, equals in expectation (over t and eps)

    KL(q(z_0 | x) || N(0, I)) = ½ Σ (alpha_0² z_clean² + sigma_0² − 1 − log sigma_0²),

with alpha_0, sigma_0 at λ_z(0): the rate of a VAE with the fixed encoder noise of UL and a
standard normal prior (`tests/unit/test_normal_prior.py` checks it against
`ulframe.diffusion.kl_standard_normal_nats` at λ_z(0)). Same code path as the diffusion prior,
no special case in the stage; only the estimator's variance differs from the closed form.

Use in gin: `stage1/stages.ul_joint.prior = @priors.normal`.
"""

from __future__ import annotations

import torch
from torch import nn

from ulframe.errors import ConfigError


class NormalPrior(nn.Module):
    """Parameter-free prior N(0, I) over latents: predicts v = 0 for every input.

    The distribution is the same for every class: labels (and `label=None`, the null label) are
    accepted and ignored, so `num_classes` only records what the engine passed.

    Attributes:
        num_classes: number of classes the engine passed (0 = unconditional); unused.
        shape: per-example latent shape (C, *S).
    """

    def __init__(self, shape: tuple[int, ...], num_classes: int = 0) -> None:
        """
        Args:
            shape: per-example latent shape, (C, H, W) or (C, T, H, W), measured from the data.
            num_classes: number of classes (supplied by the engine); N(0, I) ignores labels.
        """
        super().__init__()
        if len(shape) < 2:
            raise ConfigError(f"priors.normal needs a latent shape (C, *spatial), got {shape}")
        self.shape = tuple(shape)
        self.num_classes = num_classes

    def forward(
        self, z_t: torch.Tensor, logsnr: torch.Tensor, label: torch.Tensor | None = None
    ) -> torch.Tensor:
        """v_hat = 0 for z_t (B, C, *S) at logsnr (B,): eps_hat = sigma z_t, x_hat = alpha z_t.

        Returns:
            zeros of z_t's shape and dtype, (B, C, *S).
        """
        del logsnr, label  # N(0, I): the optimal v is 0 at every noise level, for every class
        return torch.zeros_like(z_t)  # (B, C, *S)
