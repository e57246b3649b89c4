"""EDM's loss weight (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models", eq. 8
and table 1): λ(σ) = (σ² + σ_data²) / (σ·σ_data)² on the denoiser's x₀ error, where σ is EDM's noise level.

For a DDPM (VP) or rectified-flow process σ = 1/√SNR: x_t / √ᾱ = x₀ + σ ε, and x_σ / (1 − σ_flow) = x₀ + σ ε. So
λ = (1 + SNR·σ_data²) / σ_data², which the process carries to its target (an ε target: × 1/SNR, giving
1 + 1/(SNR·σ_data²)). This is EDM's weighting moved onto another noise process, not EDM training: EDM also
preconditions the network and samples σ log-normally.
"""

from . import WeightingPlugin


def edm_weights(process, timesteps, edm_sigma_data=0.5):
    snr = process.snr(timesteps)
    return (1 + snr * edm_sigma_data**2) / edm_sigma_data**2 * process.x0_weight_factor(snr)


WEIGHTING = WeightingPlugin(
    name="edm",
    weights=edm_weights,
    words=lambda record: f"EDM's loss weight λ(σ) = (σ² + σ_data²)/(σ·σ_data)², σ_data = {record['edm_sigma_data']:g}",
    flags={"edm_sigma_data": {"type": float, "default": 0.5, "help": "--weighting edm: σ_data, the data's standard deviation."}},
    check=lambda settings: None if settings["edm_sigma_data"] > 0 else f"--edm_sigma_data must be > 0, got {settings['edm_sigma_data']}",
)
