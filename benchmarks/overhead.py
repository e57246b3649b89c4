"""Step time of the regime path against a plain diffusers training step, measured side by side.

Every variant trains its own copy of the same UNet on the same Fashion-MNIST batch; the variants take turns
step by step, each round starting one variant later (so drifts in machine load, and what the variant before
leaves in the caches, hit all of them alike) and the table reports median step times and
their ratio to the plain step. ``--arms`` also times the regime of every ``compare_regimes.py`` arm, built
from that arm's flags exactly as the training script builds it (rows with an ``arm`` key; TDC as ``tdc``,
its base stage, ``tdc_stage2``, the routed step after branching, and ``tdc_round_robin_stage2``, a stage-2 step of
``--experts_schedule round_robin``): ``compare_regimes.py --step_costs``
turns them into its equal-wall-clock column. On CUDA every step is synchronized before its clock stops. Targets: uniform regime with Min-SNR ≤ 1.01×, curriculum sampler ≤ 1.01× vs uniform; ANT at k = 5:
UW ≤ 1.01×, Nash ≤ 1.05×, PCGrad ≤ 1.38× (the ratios of the ANT paper, measured there on an LDM on GPU).

``--noise_process flow`` times every variant as a rectified flow, against a plain step written as diffusers' SD3
script writes it (``compute_density_for_timestep_sampling`` → scheduler timesteps and sigmas → (1 − σ)x₀ + σε →
``compute_loss_weighting_for_sd3`` → velocity MSE). Target: every non-PCGrad regime ≤ 1.02× that step.

    python benchmarks/overhead.py --steps 60 --output benchmarks/results/overhead.json
    python benchmarks/overhead.py --arms --batch_size 32 --output overhead-arms.json   # + compare_regimes' arms
    python benchmarks/overhead.py --arms --only uniform,tdc,tdc_stage2,tdc_stage2_per_group,tdc_round_robin_stage2 --batch_size 32
    python benchmarks/overhead.py --arms --only uniform,tdc_stage2 --profile profiles/   # + where each step's time goes
    python benchmarks/overhead.py --noise_process flow --output benchmarks/results/overhead_flow.json
"""

import argparse
import copy
from functools import partial
from itertools import count
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DModel
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3, compute_snr

from harness import DEFAULT_BLOCK_OUT_CHANNELS, arms, load_script
from diffusers_curriculum.data import build_dataset
from diffusers_curriculum.losses import denoising_loss
from diffusers_curriculum.models import tiny_unet_config
from diffusers_curriculum.noise import as_process
from diffusers_curriculum.regimes import build_regime
from diffusers_curriculum.training import make_optimizer


def plain_step(accelerator, model, optimizer, scheduler, clean, snr_gamma=None):
    """diffusers' examples, verbatim in spirit: randint timesteps, randn noise, MSE (optionally Min-SNR)."""
    noise = torch.randn_like(clean)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (clean.shape[0],), device=clean.device)
    noisy = scheduler.add_noise(clean, noise, timesteps)
    pred = model(noisy, timesteps).sample
    if snr_gamma is None:
        loss = F.mse_loss(pred.float(), noise.float())
    else:  # train_text_to_image.py's Min-SNR block
        snr = compute_snr(scheduler, timesteps)
        weights = torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0] / snr
        loss = F.mse_loss(pred.float(), noise.float(), reduction="none")
        loss = (loss.mean(dim=list(range(1, loss.ndim))) * weights).mean()
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()


def plain_flow_step(accelerator, model, optimizer, scheduler, clean, weighting_scheme="none"):
    """diffusers' SD3 script's step on a FlowMatchEulerDiscreteScheduler: u from the density, the scheduler's
    timestep and sigma at index u·T, x_σ = (1 − σ)x₀ + σε, the SD3 loss weight on the velocity MSE."""
    noise = torch.randn_like(clean)
    u = compute_density_for_timestep_sampling(weighting_scheme, clean.shape[0], logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
    indices = (u * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices].to(clean.device)
    sigmas = scheduler.sigmas[indices].to(device=clean.device, dtype=clean.dtype).view(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * clean + sigmas * noise
    pred = model(noisy, timesteps).sample
    weighting = compute_loss_weighting_for_sd3(weighting_scheme, sigmas)
    target = noise - clean
    loss = torch.mean((weighting.float() * (pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1).mean()
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()


def regime_step(accelerator, model, optimizer, scheduler, clean, regime, steps):
    """The path train_scripts/ take: every timestep and loss decision goes through the regime and the noise process."""
    process = regime.noise_process
    noise, timesteps = regime.sample(clean)
    noisy = process.add_noise(clean, noise, timesteps)
    with regime.forward_context(accelerator, model):
        pred = model(noisy, process.model_timesteps(timesteps)).sample
    regime.backward(accelerator, denoising_loss(pred, process, clean, noise, timesteps), timesteps, model)
    optimizer.step()
    optimizer.zero_grad()
    regime.on_step_end(accelerator, next(steps))


# One variant per axis value, each built from the training script's own flags (the axis alone, all else default).
AXIS_VARIANTS = {
    "--regime uniform": [],
    "--snr_gamma 5": ["--snr_gamma", "5"],
    "--weighting p2": ["--weighting", "p2"],
    "--weighting learned": ["--weighting", "learned"],
    "--timestep_sampling logit_normal": ["--timestep_sampling", "logit_normal"],
    "--timestep_sampling speed": ["--timestep_sampling", "speed"],
    "--timestep_sampling timestep_bias": ["--timestep_sampling", "timestep_bias"],
    "--timestep_sampling loss_aware": ["--timestep_sampling", "loss_aware"],
    "--timestep_sampling stratified": ["--timestep_sampling", "stratified", "--clusters", "5"],
    "--regime curriculum (adaptive)": ["--regime", "curriculum", "--curriculum_patience", "2", "--curriculum_check_every", "5"],
    "--balancer uw (--regime ant)": ["--regime", "ant"],
    "--balancer nash": ["--regime", "ant", "--balancer", "nash"],
    "--balancer pcgrad": ["--regime", "ant", "--balancer", "pcgrad"],
    "--experts 4 (stage 2)": ["--experts", "4", "--experts_base_steps", "1"],  # branches during warm-up
}
# Timed only under --noise_process flow: SD3's loss weights and Curriculum Sampling.
FLOW_VARIANTS = {
    "--weighting_scheme cosmap": ["--weighting_scheme", "cosmap"],
    "--timestep_sampling two_phase": ["--timestep_sampling", "two_phase"],
}


def regime_variant(train, accelerator, scheduler, clean, resolution, widths, flags, steps):
    """A step through the regime the training script's parser and ``build_regime`` make of ``flags``, with its
    own fresh UNet (``widths``: comma-separated block widths)."""
    process = as_process(scheduler)
    run_args = train.parse_args(["--output_dir", "unused", "--resolution", str(resolution), "--block_out_channels", widths,
                                 "--max_train_steps", str(steps), "--seed", "0", "--noise_process", process.name, *flags])
    regime = build_regime(run_args.regime_spec, process, max_train_steps=steps)
    torch.manual_seed(0)
    model = regime.wrap_model(UNet2DModel.from_config(tiny_unet_config(resolution, 1, block_out_channels=run_args.block_out_channels)))
    optimizer = make_optimizer(run_args.optimizer_settings, model.parameters(), 1e-4, accelerator.device)  # as the script builds it
    model, optimizer = accelerator.prepare(model, optimizer)
    regime.attach(optimizer=optimizer)
    return partial(regime_step, accelerator, model, optimizer, scheduler, clean, regime, count(1))


def arm_variants(args, accelerator, scheduler, clean):
    """``{arm: (label, step)}``: each compare_regimes.py arm's regime of ``--noise_process`` (the ``flow_*`` arms
    under flow, the others under DDPM), built from its flags."""
    train = load_script("train_unconditional")
    widths = args.block_out_channels or DEFAULT_BLOCK_OUT_CHANNELS
    steps = 10 ** 6  # long enough that no curriculum stage or TDC base stage ends while timed
    flow = args.noise_process == "flow"
    flags = {arm: f for arm, f in arms(steps).items() if f is not None and ("--noise_process" in f) == flow}
    prefix = "flow_" if flow else ""
    flags[f"{prefix}tdc_stage2"] = ["--regime", "tdc", "--tdc_groups", "4", "--tdc_base_steps", "1"]  # branches in warm-up
    flags[f"{prefix}tdc_stage2_per_group"] = [*flags[f"{prefix}tdc_stage2"], "--experts_forward", "per_group"]  # the fallback path
    flags[f"{prefix}tdc_round_robin_stage2"] = [*flags[f"{prefix}tdc_stage2"], "--experts_schedule", "round_robin"]  # one expert a step
    only = args.only.split(",") if args.only else flags
    return {arm: (f"arm {arm}", regime_variant(train, accelerator, scheduler, clean, args.resolution, widths, arm_flags, steps))
            for arm, arm_flags in flags.items() if arm in only}


def experts_forward(step) -> Optional[str]:
    """How a timed TDC variant ran its routed steps: ``batched`` (one wide model), ``per group: <why>`` or ``one
    expert per step`` (``--experts_schedule round_robin``); None for a model without experts. Read after timing, so
    it tells whether the first-batch check kept the wide path on this device."""
    model, regime = (step.args[1], step.args[5]) if isinstance(step, partial) else (None, None)
    batched = getattr(model, "batched", None)
    if getattr(model, "experts", None) is None or getattr(model, "route_all_to", None) is not None:
        return None
    if regime.experts.schedule == "round_robin":
        return "one expert per step"
    if batched is None:
        return "per group: --experts_forward per_group"
    return "batched" if batched.wide is not None else f"per group: {batched.reason}"


def profile_variants(variants, folder, steps, sync) -> None:
    """``steps`` steps of each variant under ``torch.profiler`` (CUDA kernels too on a GPU): one operator table
    per variant in ``folder``, sorted by the device's self time on a GPU (what the kernels cost, against the
    step's wall time: launching them), else by the host's."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    Path(folder).mkdir(parents=True, exist_ok=True)
    for name, step in variants.items():
        sync()
        with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
            for _ in range(steps):
                step()
            sync()
        table = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=30)
        slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
        (Path(folder) / f"{slug}.txt").write_text(f"{name}: {steps} steps\n{table}\n")


def machine(accelerator):
    if accelerator.device.type == "cuda":
        return f"{torch.cuda.get_device_name()}, {platform.machine()}"
    return f"{platform.machine()}, {torch.get_num_threads()} torch threads"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="Timed steps per variant (after warm-up).")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--output", type=str, default="benchmarks/results/overhead.json")
    parser.add_argument("--arms", action="store_true", help="Also time every compare_regimes.py arm's regime.")
    parser.add_argument("--only", type=str, default=None,
                        help="With --arms: time only these arms (comma-separated, e.g. uniform,tdc,tdc_stage2) and the plain steps.")
    parser.add_argument("--profile", type=str, default=None,
                        help="Also profile --profile_steps steps of every variant (torch.profiler, after the timing) and "
                             "write one operator table per variant to this folder: where a step's time goes.")
    parser.add_argument("--profile_steps", type=int, default=5)
    parser.add_argument("--noise_process", type=str, default="ddpm", choices=["ddpm", "flow"],
                        help="Time every variant under this process; flow's plain steps are diffusers' SD3 step.")
    parser.add_argument("--block_out_channels", type=str, default=None,
                        help="UNet widths of every timed model (default: the models.py tiny UNet for the plain steps "
                             "and the axis variants, compare_regimes.py's for the --arms variants).")
    args = parser.parse_args(argv)
    if args.profile_steps < 1:
        parser.error(f"--profile_steps must be >= 1, got {args.profile_steps}")
    if args.only and not args.arms:
        parser.error("--only selects among the --arms variants: pass --arms too")

    torch.manual_seed(0)
    accelerator = Accelerator()
    flow = args.noise_process == "flow"
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000) if flow else DDPMScheduler(num_train_timesteps=1000)
    clean = build_dataset("fashion_mnist", resolution=args.resolution, max_train_samples=args.batch_size)
    clean = torch.stack([clean[i]["pixel_values"] for i in range(args.batch_size)]).to(accelerator.device)
    sized = {} if args.block_out_channels is None else {"block_out_channels": [int(w) for w in args.block_out_channels.split(",")]}
    base = UNet2DModel.from_config(tiny_unet_config(args.resolution, 1, **sized))

    train = load_script("train_unconditional")

    def make(step_fn, **kwargs):
        model = copy.deepcopy(base)
        optimizer = make_optimizer(train.parse_args(["--output_dir", "unused"]).optimizer_settings, model.parameters(), 1e-4,
                                   accelerator.device)
        model, optimizer = accelerator.prepare(model, optimizer)
        return lambda: step_fn(accelerator, model, optimizer, scheduler, clean, **kwargs)

    widths = ",".join(str(w) for w in base.config.block_out_channels)
    # The second plain step is the weighted one: Min-SNR (DDPM, train_text_to_image.py) or logit-normal (flow, SD3).
    second = "plain SD3 step + logit-normal" if flow else "plain diffusers step + Min-SNR"
    if flow:
        variants = {"plain diffusers step": make(plain_flow_step), second: make(plain_flow_step, weighting_scheme="logit_normal")}
    else:
        variants = {"plain diffusers step": make(plain_step), second: make(plain_step, snr_gamma=5.0)}
    if not args.only:
        for name, flags in {**AXIS_VARIANTS, **(FLOW_VARIANTS if flow else {})}.items():
            variants[name] = regime_variant(train, accelerator, scheduler, clean, args.resolution, widths, flags, 10 ** 6)
    arm_of = {}
    if args.arms:
        for arm, (name, step) in arm_variants(args, accelerator, scheduler, clean).items():
            variants[name], arm_of[name] = step, arm
    sync = torch.cuda.synchronize if accelerator.device.type == "cuda" else (lambda: None)
    times = {name: [] for name in variants}
    names = list(variants)
    for i in range(args.warmup + args.steps):
        # Each round starts one variant later, so no variant always runs right after the same one (e.g. the big
        # plain models). It did not remove the 3-10 % by which the uniform arm times slower than arms doing the
        # same work (min_snr, TDC stage 1): that cause is still unknown.
        for name in names[i % len(names):] + names[:i % len(names)]:
            step = variants[name]
            sync()
            start = time.perf_counter()
            step()
            sync()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)

    if args.profile:
        profile_variants(variants, args.profile, args.profile_steps, sync)

    # Medians show the typical step; means include the occasional heavy step (e.g. a Nash solve every 25).
    plain = {f: f(times["plain diffusers step"]) for f in (statistics.median, statistics.mean)}
    plain_snr = {f: f(times[second]) for f in (statistics.median, statistics.mean)}
    rows = []
    print(f"{'variant':36s} {'median s':>9s} {'mean s':>8s} {'median/plain':>13s} {'mean/plain':>11s} {'median/plain+MinSNR':>20s}")
    for name, samples in times.items():
        median, mean = statistics.median(samples), statistics.mean(samples)
        rows.append({
            "variant": name, "median_s": median, "mean_s": mean,
            "median_ratio_vs_plain": median / plain[statistics.median], "mean_ratio_vs_plain": mean / plain[statistics.mean],
            "median_ratio_vs_plain_min_snr": median / plain_snr[statistics.median],
            **({"arm": arm_of[name]} if name in arm_of else {}),
            **({"experts_forward": path} if (path := experts_forward(variants[name])) else {}),
        })
        print(f"{name:36s} {median:9.4f} {mean:8.4f} {rows[-1]['median_ratio_vs_plain']:13.3f} "
              f"{rows[-1]['mean_ratio_vs_plain']:11.3f} {rows[-1]['median_ratio_vs_plain_min_snr']:20.3f}"
              + (f"  ({rows[-1]['experts_forward']})" if "experts_forward" in rows[-1] else ""))
    result = {
        "date": date.today().isoformat(), "machine": machine(accelerator),
        "torch": torch.__version__, "noise_process": args.noise_process, "batch_size": args.batch_size, "resolution": args.resolution, "steps": args.steps,
        "rows": rows,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
