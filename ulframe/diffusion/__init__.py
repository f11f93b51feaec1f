"""Diffusion math of ulframe: log-SNR conventions, schedules, ELBO terms, weightings, samplers.

Sign conventions and shapes are stated once, in :mod:`ulframe.diffusion.logsnr`.
"""

from ulframe.diffusion.elbo import (
    antithetic_t,
    elbo_term_nats,
    kl_standard_normal_nats,
    stratified_t,
)
from ulframe.diffusion.logsnr import (
    alpha_sigma,
    diffuse,
    eps_from_v,
    eps_from_x,
    expand_like,
    v_from_x_eps,
    x_from_eps,
    x_from_v,
)
from ulframe.diffusion.noise import BatchNoise
from ulframe.diffusion.samplers import (
    EpsFn,
    Sampler,
    ancestral_step,
    ddim_step,
    denoise,
    logsnr_grid,
    sample_ancestral,
    sample_ddim,
)
from ulframe.diffusion.schedules import (
    CosineSchedule,
    LinearSchedule,
    Schedule,
    ShiftedCosineSchedule,
)
from ulframe.diffusion.weighting import (
    ELBOWeighting,
    SigmoidWeighting,
    Weighting,
    is_elbo_weighting,
)

__all__ = [
    "BatchNoise",
    "CosineSchedule",
    "ELBOWeighting",
    "EpsFn",
    "LinearSchedule",
    "Sampler",
    "Schedule",
    "ShiftedCosineSchedule",
    "SigmoidWeighting",
    "Weighting",
    "alpha_sigma",
    "ancestral_step",
    "antithetic_t",
    "ddim_step",
    "denoise",
    "diffuse",
    "elbo_term_nats",
    "eps_from_v",
    "eps_from_x",
    "expand_like",
    "is_elbo_weighting",
    "kl_standard_normal_nats",
    "logsnr_grid",
    "sample_ancestral",
    "sample_ddim",
    "stratified_t",
    "v_from_x_eps",
    "x_from_eps",
    "x_from_v",
]
