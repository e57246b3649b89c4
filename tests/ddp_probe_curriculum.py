"""Run under `accelerate launch` by test_distributed.py: each rank feeds the curriculum its own loss
stream and writes the stage it is in after every step to <out>/rank<i>.json."""

import json
import sys

import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler

from diffusers_curriculum.clustering import equal_boundaries
from diffusers_curriculum.distributed import force_cpu_backend
from diffusers_curriculum.regimes import Regime
from diffusers_curriculum.regimes.timesteps import AdaptivePacing, CurriculumSampler
from diffusers_curriculum.training import end_training


def rank_loss(rank: int, step: int) -> float:
    """Rank 0's loss keeps improving; rank 1's stalls. Decided alone, they would pace differently."""
    return 1.0 / step if rank == 0 else 1.0 + 0.01 * (step % 3)


def main(out_dir):
    accelerator = Accelerator(cpu=force_cpu_backend())
    pacing = AdaptivePacing(patience=2, check_every=2, smoothing=0.0)
    regime = Regime(
        DDPMScheduler(num_train_timesteps=100), CurriculumSampler(100, equal_boundaries(100, 5), pacing),
        process_index=accelerator.process_index, num_processes=accelerator.num_processes,
    )
    stages, draws = [], []
    for step in range(1, 61):
        _, t = regime.sample(torch.zeros(4, 1, 2, 2))
        draws.append(t.tolist())
        regime.backward(accelerator, torch.full((4,), rank_loss(accelerator.process_index, step), requires_grad=True), t)
        stages.append(regime.on_step_end(accelerator, step)["curriculum_stage"])
    with open(f"{out_dir}/rank{accelerator.process_index}.json", "w") as f:
        json.dump({"num_processes": accelerator.num_processes, "stages": stages, "draws": draws,
                   "history": regime.sampler.stage_history}, f)
    end_training(accelerator)  # ranks leave together: a rank exiting under a live gloo group aborted now and then


if __name__ == "__main__":
    main(sys.argv[1])
