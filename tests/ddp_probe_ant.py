"""Run under `accelerate launch` by test_distributed.py: a tiny UNet trains a few steps with each ANT
balancer on both ranks; each rank writes its balancer state and a weight checksum to <out>/<method>-rank<i>.pt."""

import sys

import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler, UNet2DModel

from diffusers_curriculum.clustering import partition
from diffusers_curriculum.distributed import force_cpu_backend
from diffusers_curriculum.models import tiny_unet_config
from diffusers_curriculum.losses import denoising_loss
from diffusers_curriculum.regimes import Regime
from diffusers_curriculum.regimes.balancers import build_balancer
from diffusers_curriculum.sampling import StratifiedSampler
from diffusers_curriculum.training import end_training


def main(out_dir):
    accelerator = Accelerator(cpu=force_cpu_backend())
    scheduler = DDPMScheduler(num_train_timesteps=100)
    for method in ("uw", "pcgrad", "nash"):
        torch.manual_seed(0)
        model = UNet2DModel.from_config(tiny_unet_config(8, 1, (8, 16)))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model, optimizer = accelerator.prepare(model, optimizer)
        boundaries = partition("log_snr", 3, 100, scheduler.alphas_cumprod)
        regime = Regime(
            scheduler, StratifiedSampler(100, boundaries), balancer=build_balancer(method, 3, nash_update_every=2),
            boundaries=boundaries, seed=1, process_index=accelerator.process_index, num_processes=accelerator.num_processes,
        )
        # Different data on each rank, so per-rank balancer decisions would differ without syncing.
        data = torch.randn(6, 4, 1, 8, 8, generator=torch.Generator().manual_seed(10 + accelerator.process_index))
        for step in range(6):
            clean = data[step]
            noise, t = regime.sample(clean)
            with accelerator.accumulate(model), regime.forward_context(accelerator, model):
                pred = model(scheduler.add_noise(clean, noise, t), t).sample
                per_sample = denoising_loss(pred, scheduler, clean, noise, t)
                regime.backward(accelerator, per_sample, t, model)
                optimizer.step()
                optimizer.zero_grad()
            regime.on_step_end(accelerator, step + 1)
        checksum = sum(p.detach().double().sum() for p in accelerator.unwrap_model(model).parameters())
        state = {k: v for k, v in regime.balancer.state_dict().items() if k != "optimizer"}
        torch.save({"balancer": state, "checksum": checksum, "num_processes": accelerator.num_processes},
                   f"{out_dir}/{method}-rank{accelerator.process_index}.pt")
    del model, optimizer
    end_training(accelerator)  # ranks leave together: a rank exiting under a live gloo group aborted now and then


if __name__ == "__main__":
    main(sys.argv[1])
