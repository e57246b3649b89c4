"""The parts the benchmark studies share: the arms (regime flags per arm), the training scripts loaded as modules,
feature-FID images and sampling FLOPs of a pipeline, the pruning call, and small statistics. The entry points
(``compare_regimes.py``, ``overhead.py``, ``pruned_tdc.py``, ...) import from here, never from each other."""

import importlib.util
import statistics
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BLOCK_OUT_CHANNELS = "16,32,32"  # the benchmarks' tiny UNet


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "train_scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TDC_EXPERTS = 4  # the tdc arms' groups


def curriculum_flags(total_steps, share=0.5, clusters=5):
    """The curriculum as a warm-up of at most ``share`` of the run: ``clusters`` stages under adaptive pacing, each
    capped at share · total / clusters steps, then the full range (the training scripts' ``--curriculum_share``;
    earlier rounds passed the same cap and check interval as explicit flags)."""
    return ["--curriculum_share", str(share)]


def arms(total_steps, curriculum_share=0.5, curriculum_clusters=5):
    """Regime flags per arm, for a run of ``total_steps`` optimizer steps. A composed arm is named by its parts
    (``ant_uw+p2``: the ant_uw arm with P2 weighting)."""
    curriculum = curriculum_flags(total_steps, curriculum_share, curriculum_clusters)
    single = {
        "uniform": [],
        "min_snr": ["--snr_gamma", "5"],
        "p2": ["--weighting", "p2"],
        "learned": ["--weighting", "learned"],
        "logit_normal": ["--timestep_sampling", "logit_normal"],
        "speed": ["--timestep_sampling", "speed"],
        "loss_aware": ["--timestep_sampling", "loss_aware"],
        "timestep_bias": ["--timestep_sampling", "timestep_bias", "--timestep_bias_strategy", "earlier"],
        # by default 5 stages, each at most a tenth of the run: the curriculum takes at most half the budget
        "curriculum": ["--regime", "curriculum", "--curriculum_clusters", str(curriculum_clusters), *curriculum],
        "ant_uw": ["--regime", "ant", "--ant_method", "uw"],
        "tdc": ["--regime", "tdc", "--tdc_groups", str(TDC_EXPERTS), "--tdc_base_steps", str(total_steps // 2)],
    }
    # stage 2 fine-tunes one expert per step on a full batch of its group, the experts in turn
    single["tdc_round_robin"] = [*single["tdc"], "--experts_schedule", "round_robin"]
    composed = {
        "ant_uw+p2": [*single["ant_uw"], *single["p2"]],
        "ant_uw+min_snr": [*single["ant_uw"], *single["min_snr"]],
        "curriculum+p2": [*single["curriculum"], *single["p2"]],
        # the curriculum's stages over ANT's clusters, their losses balanced by UW
        "curriculum+ant_uw": [*single["ant_uw"], "--timestep_sampling", "curriculum", "--ant_clusters", str(curriculum_clusters),
                              *curriculum],
        "learned+logit_normal": [*single["learned"], *single["logit_normal"]],
        "tdc+p2": [*single["tdc"], *single["p2"]],
    }
    # rectified flow (--noise_process flow): uniform, SD3's logit-normal, Curriculum Sampling, EDM2's learned weighting
    flow = {"flow_uniform": ["--noise_process", "flow"]}
    flow["flow_logit_normal"] = [*flow["flow_uniform"], *single["logit_normal"]]
    flow["flow_two_phase"] = [*flow["flow_uniform"], "--timestep_sampling", "two_phase"]
    flow["flow_learned"] = [*flow["flow_uniform"], *single["learned"]]
    # round 3's flow arms: SD3's mode density, ANT, TDC, and the compositions that led on DDPM (round 2)
    flow["flow_mode"] = [*flow["flow_uniform"], "--timestep_sampling", "mode"]
    flow["flow_ant_uw"] = [*flow["flow_uniform"], *single["ant_uw"]]
    flow["flow_tdc"] = [*flow["flow_uniform"], *single["tdc"]]
    flow["flow_learned+logit_normal"] = [*flow["flow_learned"], *single["logit_normal"]]
    flow["flow_ant_uw+logit_normal"] = [*flow["flow_ant_uw"], *single["logit_normal"]]
    # DDPM's weighting baselines under flow (their velocity-loss forms, weighting.py)
    flow["flow_p2"] = [*flow["flow_uniform"], *single["p2"]]
    flow["flow_min_snr"] = [*flow["flow_uniform"], *single["min_snr"]]
    # the two leading flow arms at 2,000 CPU steps (round 3), composed
    flow["flow_logit_normal+min_snr"] = [*flow["flow_logit_normal"], *single["min_snr"]]
    return {**single, **composed, **flow, "tdc_pruned": None}  # tdc_pruned prunes the tdc run


def sweep_arm(share, clusters):
    """The name of the curriculum arm with ``share`` of the run in ``clusters`` stages (e.g. ``curriculum_s10_c5``)."""
    return f"curriculum_s{round(share * 100):g}_c{clusters}"


def requested_classes(pipeline, n):
    """The labels :func:`fid_images` asks a class-conditional ``pipeline`` for (``i % num_classes``); None when unconditional."""
    num_classes = pipeline.config.get("num_classes")
    return None if num_classes is None else torch.arange(n) % num_classes


def fid_sampler(pipeline):
    """The scheduler FID images are sampled with: DDIM for a DDPM model, the pipeline's own flow-matching Euler
    scheduler for a rectified flow."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    if isinstance(pipeline.scheduler, FlowMatchEulerDiscreteScheduler):
        return FlowMatchEulerDiscreteScheduler.from_config(pipeline.scheduler.config)
    return DDIMScheduler.from_config(pipeline.scheduler.config)


def fid_images(pipeline, n, steps, seed):
    """``n`` generated images in [0, 1], (n, C, H, W), sampled with :func:`fid_sampler`; a class-conditional
    pipeline is asked for :func:`requested_classes`."""
    from diffusers import DDPMPipeline

    ddim_scheduler = fid_sampler(pipeline)
    labels = requested_classes(pipeline, n)
    if labels is None:
        ddim = DDPMPipeline(unet=pipeline.unet, scheduler=ddim_scheduler)
    else:
        ddim = type(pipeline)(unet=pipeline.unet, scheduler=ddim_scheduler, num_classes=pipeline.config.num_classes,
                              guidance_trained=pipeline.config.guidance_trained)
    ddim.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(10_000 + seed)
    out = []
    for start in range(0, n, 250):
        size = min(250, n - start)
        batch = {"batch_size": size} if labels is None else {"class_labels": labels[start : start + size].tolist()}
        images = ddim(**batch, generator=generator, num_inference_steps=steps, output_type="np").images
        out.append(torch.from_numpy(images).permute(0, 3, 1, 2))
    return torch.cat(out)


def sampling_flops(pipeline, steps):
    from diffusers_curriculum.experts import is_routed_experts
    from diffusers_curriculum.experts.pruning import count_flops, flops_report

    scheduler = fid_sampler(pipeline)
    scheduler.set_timesteps(steps)
    if is_routed_experts(pipeline.unet):
        return flops_report(pipeline.unet, scheduler.timesteps.tolist())["flops_per_sample"]
    return count_flops(pipeline.unet) * steps


def prune_experts(source, out, seed, ratio, finetune_steps, batch_size, distill_weight, num_inference_steps, recipe,
                  max_loss_increase="0.1"):
    """``prune_experts.py`` on the TDC pipeline in ``source``: 3 search rounds per expert, each proxy fine-tuning a
    fifth of ``finetune_steps``; ``recipe``: the script's flags for when it prunes (``--prune_at``) and how it
    fine-tunes."""
    script = load_script("prune_experts")
    script.main(script.parse_args([
        "--pretrained_model_name_or_path", str(source), "--output_dir", str(out), "--overwrite_output_dir",
        "--prune_ratio", str(ratio), "--search_rounds", "3", "--proxy_steps", str(max(1, finetune_steps // 5)),
        "--train_batch_size", str(batch_size), "--num_inference_steps", str(num_inference_steps), "--validation_size", "64",
        "--seed", str(seed), "--distill_weight", str(distill_weight), "--max_loss_increase", str(max_loss_increase), *recipe,
    ]))


def mean_std(values):
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def real_images(args):
    """Held-out Fashion-MNIST test images in [0, 1] for the FID: ``--num_fid_images`` of them, at least 500 (all with
    ``--quick``)."""
    from diffusers_curriculum.metrics import fashion_mnist_unit

    test_images, _ = fashion_mnist_unit("test")
    return test_images[: max(args.num_fid_images, 500) if not args.quick else args.num_fid_images]
