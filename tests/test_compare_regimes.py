"""benchmarks/compare_regimes.py --quick: the CI-sized run produces the table, the plot and resumable results."""

import importlib.util
import json

import pytest
import torch

from conftest import ROOT, load_script


def load_benchmark(name="compare_regimes"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(arm, seed, step, fid, train_seconds, flops=4):
    """One results.jsonl row, as an evaluation records it."""
    return {"arm": arm, "seed": seed, "step": step, "fid": fid, "flops_per_sample": flops, "train_seconds": train_seconds}


@pytest.mark.slow
def test_quick_mode_writes_table_plot_and_resumes(tmp_path):
    bench = load_benchmark()
    out = tmp_path / "quick"
    table = bench.main(["--quick", "--output_dir", str(out), "--workers", "2"])  # one process per job
    assert {row["arm"] for row in table} == {"uniform", "loss_aware", "tdc", "tdc_pruned"}
    assert {p.name for p in (out / "logs").iterdir()} == {"uniform-seed0.log", "loss_aware-seed0.log", "tdc+tdc_pruned-seed0.log"}
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {(r["arm"], r["step"]) for r in rows} >= {("uniform", 4), ("uniform", 8), ("tdc", 8), ("tdc_pruned", 8)}
    assert all(r["fid"] > 0 for r in rows)
    pruned = next(r for r in rows if r["arm"] == "tdc_pruned")
    tdc = next(r for r in rows if r["arm"] == "tdc" and r["step"] == 8)
    assert pruned["flops_per_sample"] < tdc["flops_per_sample"]
    # pruned after TDC's branch (base 4 + 1 stage-2 step), then the 3 remaining steps' samples per expert: 3 × 8
    assert (pruned["prune_at"], pruned["finetune_steps_per_expert"], pruned["finetune_batch_size"]) == ("branch", 3, 8)
    assert json.loads((out / "runs" / "tdc_branch-seed0" / "training_regime.json").read_text())["stage"] == 2
    assert (out / "fid_vs_steps.png").stat().st_size > 0 and "| uniform |" in (out / "table.md").read_text()

    bench.main(["--quick", "--output_dir", str(out)])  # everything is done: nothing is retrained
    assert len((out / "results.jsonl").read_text().splitlines()) == len(rows)
    (out / "table.md").unlink()
    bench.main(["--quick", "--output_dir", str(out), "--summarize_only"])
    assert "| tdc_pruned |" in (out / "table.md").read_text() and "Table written" in (out / "table.md").read_text()
    with pytest.raises(SystemExit, match="other settings"):
        bench.main(["--quick", "--output_dir", str(out), "--prune_ratio", "0.3"])


def test_prune_recipe_flags_and_results_written_before_the_recipe_flag(tmp_path, capsys):
    bench = load_benchmark()
    assert bench.parse_args([]).prune_distill_weight == 0.0  # --prune_at branch: distillation measured worse there
    assert bench.parse_args(["--prune_at", "end"]).prune_distill_weight == 1.0  # rounds 1 and 2
    assert bench.parse_args(["--prune_at", "end", "--train_batch_size", "6"]).train_batch_size == 6
    with pytest.raises(SystemExit):
        bench.parse_args(["--train_batch_size", "6"])  # branch: a quarter of the batch per expert
    assert "--train_batch_size must be a multiple of 4, got 6" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--max_train_steps", "3"])  # no steps left to fine-tune after the branch
    assert "--max_train_steps must be at least 4, got 3" in capsys.readouterr().err
    # a results folder of an older version (no prune_at in its settings) summarizes under the recipe it used
    out = tmp_path / "old"
    out.mkdir()
    argv = ["--output_dir", str(out), "--regimes", "uniform,tdc_pruned", "--seeds", "0", "--max_train_steps", "20", "--summarize_only"]
    settings = {k: v for k, v in vars(bench.parse_args([*argv, "--prune_at", "end"])).items() if k not in bench.SETTINGS_IGNORED}
    del settings["prune_at"]
    (out / "settings.json").write_text(json.dumps(settings))
    (out / "results.jsonl").write_text(json.dumps(row("uniform", 0, 20, 30.0, 10)) + "\n")
    assert bench.main([*argv, "--prune_at", "end"])[0]["arm"] == "uniform"
    with pytest.raises(SystemExit, match="other settings"):
        bench.main(argv)  # its tdc_pruned rows were pruned at the end
    (out / "settings.json").write_text(json.dumps({**settings, "regimes": "uniform"}))
    uniform_only = [a if a != "uniform,tdc_pruned" else "uniform" for a in argv]
    assert bench.main(uniform_only)[0]["arm"] == "uniform"  # no pruned arm: the pruning settings do not count


def test_summary_statistics_and_steps_to_target():
    bench = load_benchmark()
    args = bench.parse_args(["--max_train_steps", "20", "--seeds", "0,1"])
    rows = [row("uniform", 0, 10, 50.0, 10), row("uniform", 0, 20, 30.0, 20),
            row("uniform", 1, 10, 40.0, 10), row("uniform", 1, 20, 34.0, 22),
            row("fast", 0, 10, 31.0, 10, flops=2), row("fast", 0, 20, 20.0, 20, flops=2)]
    table, targets = bench.summarize(rows, args)
    assert targets == {"uniform": pytest.approx(32.0)}  # the uniform arm's mean final FID
    entry = {e["arm"]: e for e in table}
    assert entry["uniform"]["fid"][20][:2] == pytest.approx((32.0, 2 ** 1.5))
    # median over seeds: uniform seed 0 reaches 32 at step 20, seed 1 never does
    assert entry["fast"]["steps_to_target"] == 10 and entry["uniform"]["steps_to_target"] == float("inf")
    assert entry["uniform"]["seconds_per_step"] == pytest.approx(1.05)
    pruned = [row("tdc_pruned", 0, 20, 30.0, 5, flops=3), row("tdc_pruned", 1, 20, 31.0, 5, flops=2)]
    assert {e["arm"]: e for e in bench.summarize(rows + pruned, args)[0]}["tdc_pruned"]["flops_per_sample"] == 2.5  # per-seed mean


def test_plan_puts_pruning_after_its_tdc_run_and_long_jobs_first():
    bench = load_benchmark()
    chosen = ["uniform", "tdc", "tdc_pruned"]
    jobs = bench.plan(chosen, [0, 1], done={("uniform", 0), ("tdc", 1)})
    assert jobs == [(0, ["tdc", "tdc_pruned"]), (1, ["tdc_pruned"]), (1, ["uniform"])]
    assert bench.plan(["flow_uniform", "flow_tdc"], [0], done=set()) == [(0, ["flow_tdc"]), (0, ["flow_uniform"])]


def test_flow_arms_are_measured_against_flow_uniform_and_ddpm_arms_against_uniform():
    bench = load_benchmark()
    args = bench.parse_args(["--max_train_steps", "20", "--seeds", "0"])
    rows = [row("uniform", 0, 10, 300.0, 10), row("uniform", 0, 20, 200.0, 20),
            row("p2", 0, 10, 190.0, 10), row("p2", 0, 20, 150.0, 20),
            row("flow_uniform", 0, 10, 150.0, 40), row("flow_uniform", 0, 20, 100.0, 80),
            # twice as fast per step as flow_uniform, slower than uniform; reaches 100 only at step 20
            row("flow_logit_normal", 0, 10, 120.0, 20), row("flow_logit_normal", 0, 20, 90.0, 40)]
    table, targets = bench.summarize(rows, args)
    assert targets == {"uniform": 200.0, "flow_uniform": 100.0}
    entry = {e["arm"]: e for e in table}
    assert entry["p2"]["steps_to_target"] == 10 and entry["p2"]["reference"] == "uniform"
    # against DDPM uniform's 200 it would reach the target at step 10 and have 20 s of budget (step 10 only)
    assert entry["flow_logit_normal"]["steps_to_target"] == 20 and entry["flow_logit_normal"]["reference"] == "flow_uniform"
    assert entry["flow_logit_normal"]["equal_wall_clock"] == pytest.approx((20, 90.0, 0.0))
    assert entry["flow_uniform"]["equal_wall_clock"] == pytest.approx((20, 100.0, 0.0))
    header = bench.print_table(table, targets, args).splitlines()[0]
    assert "uniform: 200.0, flow_uniform: 100.0" in header
    # a flow-only folder: the wall-clock column is there
    flow_only = bench.summarize(rows[4:], args)
    assert flow_only[1] == {"flow_uniform": 100.0} and "its uniform arm's wall-clock" in bench.print_table(*flow_only, args)


def test_equal_wall_clock_takes_each_seeds_last_evaluation_within_its_uniform_runs_time():
    bench = load_benchmark()
    args = bench.parse_args(["--max_train_steps", "20", "--seeds", "0,1"])
    rows = [row("uniform", 0, 10, 50.0, 10), row("uniform", 0, 20, 30.0, 20),
            row("uniform", 1, 10, 52.0, 30), row("uniform", 1, 20, 34.0, 60),
            # twice as slow per step: within its seed's uniform time it reaches step 10 only
            row("slow", 0, 10, 40.0, 20), row("slow", 0, 20, 20.0, 40),
            row("slow", 1, 10, 44.0, 60), row("slow", 1, 20, 24.0, 120)]
    entry = {e["arm"]: e for e in bench.summarize(rows, args)[0]}
    assert entry["uniform"]["equal_wall_clock"] == pytest.approx((20, 32.0, 2 ** 1.5))
    assert entry["slow"]["equal_wall_clock"] == pytest.approx((10, 42.0, 2 ** 1.5))

    # modelled clocks: per-step costs as overhead.py measures them; TDC pays its stage-2 cost after branching
    costs = {"uniform": 1.0, "slow": 1.0, "tdc": 1.0, "tdc_stage2": 3.0}
    assert bench.modelled_seconds("tdc", 20, costs, args) == 10 * 1.0 + 10 * 3.0
    assert bench.modelled_seconds("tdc+p2", 20, {**costs, "tdc+p2": 0.5}, args) == 10 * 0.5 + 10 * 3.0  # composed: same stage 2
    assert bench.modelled_seconds("tdc+p2", 20, costs, args) is None  # not timed
    round_robin = {**costs, "tdc_round_robin": 1.0, "tdc_round_robin_stage2": 1.5}
    assert bench.modelled_seconds("tdc_round_robin", 20, round_robin, args) == 10 * 1.0 + 10 * 1.5  # its own stage 2
    assert bench.modelled_seconds("tdc_round_robin", 20, {**costs, "tdc_round_robin": 1.0}, args) is None
    tdc = [row("tdc", s, step, fid, 0) for s in (0, 1) for step, fid in ((10, 45.0), (20, 25.0))]
    entry = {e["arm"]: e for e in bench.summarize(rows + tdc, args, costs)[0]}
    assert entry["slow"]["equal_wall_clock"] == pytest.approx((20, 22.0, 2 ** 1.5))  # same cost as uniform here
    assert entry["tdc"]["equal_wall_clock"] == pytest.approx((10, 45.0, 0.0))  # 40 s for 20 steps > 20 s budget


def test_step_costs_must_be_overhead_output(tmp_path):
    bench = load_benchmark()
    (tmp_path / "costs.json").write_text('{"rows": [{"variant": "plain", "median_s": 1.0}]}')
    with pytest.raises(SystemExit, match="times no 'uniform' arm"):
        bench.load_step_costs(tmp_path / "costs.json")
    with pytest.raises(SystemExit, match="not benchmarks/overhead.py output"):
        bench.load_step_costs(tmp_path / "missing.json")


def test_a_failing_worker_is_reported_with_its_log(tmp_path):
    bench = load_benchmark()
    argv = ["--quick", "--output_dir", str(tmp_path)]
    failed = bench.run_workers(bench.parse_args(argv + ["--workers", "2"]), [(0, ["no_such_arm"])], argv, tmp_path)
    assert failed == ["no_such_arm-seed0"]
    assert "KeyError: 'no_such_arm'" in (tmp_path / "logs" / "no_such_arm-seed0.log").read_text()


def test_a_run_slower_only_by_timing_noise_keeps_its_last_evaluation():
    bench = load_benchmark()
    args = bench.parse_args(["--max_train_steps", "20", "--seeds", "0"])
    rows = [row("uniform", 0, 10, 50.0, 10.0), row("uniform", 0, 20, 30.0, 20.0),
            row("noisy", 0, 10, 49.0, 10.1), row("noisy", 0, 20, 29.0, 20.3),     # 1.5 % slower
            row("slower", 0, 10, 48.0, 10.5), row("slower", 0, 20, 28.0, 21.0)]  # 5 % slower
    entry = {e["arm"]: e for e in bench.summarize(rows, args)[0]}
    assert bench.WALL_CLOCK_TOLERANCE == 0.02
    assert entry["noisy"]["equal_wall_clock"][:2] == (20, 29.0) and entry["slower"]["equal_wall_clock"][:2] == (10, 48.0)
    # a noisier cost measurement: the tolerance is a flag, and the table says which one it used
    args = bench.parse_args(["--max_train_steps", "20", "--seeds", "0", "--wall_clock_tolerance", "0.06"])
    table, target = bench.summarize(rows, args)
    assert {e["arm"]: e for e in table}["slower"]["equal_wall_clock"][:2] == (20, 28.0)
    assert "+6% tolerance" in bench.print_table(table, target, args)
    with pytest.raises(SystemExit):
        bench.parse_args(["--wall_clock_tolerance", "-0.1"])


# The axis each part of an arm's name sets (regime.axes()), to check composed arms against their names.
ARM_PARTS = {
    "min_snr": ("weighting", "min_snr"), "p2": ("weighting", "p2"), "learned": ("weighting", "learned"),
    "logit_normal": ("timestep_sampling", "logit_normal"), "curriculum": ("timestep_sampling", "curriculum"),
    "ant_uw": ("balancer", "uw"), "tdc": ("experts", 4),
}


def test_every_arm_builds_the_regime_its_name_says(train_unconditional):
    from diffusers import DDPMScheduler

    from diffusers_curriculum.regimes import build_regime

    bench = load_benchmark()
    all_arms = bench.arms(300)
    assert {"ant_uw+p2", "ant_uw+min_snr", "curriculum+p2", "curriculum+ant_uw", "learned", "learned+logit_normal",
            "tdc+p2"} <= set(all_arms)
    for arm, flags in all_arms.items():
        if flags is None:
            continue
        args = train_unconditional.parse_args(["--output_dir", "unused", "--max_train_steps", "300", *flags])
        axes = build_regime(args.regime_spec, DDPMScheduler(num_train_timesteps=1000), max_train_steps=300).axes()
        found = {"weighting": axes["weighting"]["weighting"], "timestep_sampling": axes["timestep_sampling"],
                 "balancer": axes["balancer"]["method"], "experts": (axes["experts"] or {}).get("num_experts")}
        for part in arm.split("+"):
            if part in ARM_PARTS:
                axis, value = ARM_PARTS[part]
                assert found[axis] == value, (arm, axis, found)
    round_robin = train_unconditional.parse_args(["--output_dir", "unused", "--max_train_steps", "300", *all_arms["tdc_round_robin"]])
    assert build_regime(round_robin.regime_spec, DDPMScheduler(num_train_timesteps=1000)).axes()["experts"]["schedule"] == "round_robin"


@pytest.mark.parametrize("share, cap, check_every", [(0.5, 30, 6), (0.05, 3, 3), (0.2, 12, 6)])
def test_the_curriculum_share_caps_its_stages(train_unconditional, share, cap, check_every):
    """The arm's stages, as the training script builds them: cap ⌊share · 300 / 5⌋, a check every min(cap, 300 // 50)."""
    from diffusers import DDPMScheduler

    from diffusers_curriculum.regimes import build_regime

    flags = load_benchmark().arms(300, curriculum_share=share, curriculum_clusters=5)["curriculum"]
    args = train_unconditional.parse_args(["--output_dir", "unused", "--max_train_steps", "300", *flags])
    pacing = build_regime(args.regime_spec, DDPMScheduler(num_train_timesteps=1000), max_train_steps=300).sampler.pacing
    assert (pacing.max_stage_steps, pacing.check_every, pacing.patience) == (cap, check_every, 5)


def test_the_curriculum_sweep_adds_one_arm_per_share_and_stage_count():
    bench = load_benchmark()
    args = bench.parse_args(["--max_train_steps", "300", "--sweep_shares", "0.05,0.4", "--sweep_clusters", "3,10"])
    table = bench.arms_of(args)
    swept = {name: flags for name, flags in table.items() if name.startswith("curriculum_s")}
    assert set(swept) == {"curriculum_s5_c3", "curriculum_s5_c10", "curriculum_s40_c3", "curriculum_s40_c10"}
    flags = swept["curriculum_s40_c3"]
    assert flags[flags.index("--curriculum_clusters") + 1] == "3" and flags[flags.index("--curriculum_share") + 1] == "0.4"
    with pytest.raises(SystemExit):
        bench.parse_args(["--sweep_shares", "0,0.5"])


@pytest.mark.slow
def test_class_conditional_arms_record_how_often_the_requested_class_is_generated(tmp_path):
    bench = load_benchmark()
    out = tmp_path / "classes"
    table = bench.main(["--quick", "--class_conditional", "--regimes", "uniform,tdc", "--output_dir", str(out)])
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {(r["arm"], r["step"]) for r in rows} == {("uniform", 4), ("uniform", 8), ("tdc", 4), ("tdc", 8)}
    for r in rows:  # 32 images requested as classes 0..9, 0, 1: every class asked for, a share in [0, 1] each
        assert 0 <= r["class_agreement"] <= 1 and len(r["class_agreement_per_class"]) == 10
        assert all(0 <= share <= 1 for share in r["class_agreement_per_class"])
        assert r["class_agreement"] == pytest.approx(sum(r["class_agreement_per_class"]) / 10)
    assert all(len(e["class_agreement"]) == 2 for e in table)
    text = (out / "table.md").read_text()
    assert "class agreement (mean)" in text and "Share of the images requested as class c" in text
    assert json.loads((out / "settings.json").read_text())["class_conditional"] is True
    with pytest.raises(SystemExit, match="other settings"):  # an unconditional run cannot reuse these rows
        bench.main(["--quick", "--regimes", "uniform", "--output_dir", str(out)])


def test_class_conditional_images_are_requested_class_by_class():
    from diffusers import DDPMScheduler, UNet2DModel

    from diffusers_curriculum.portable.class_conditional_pipeline import ClassConditionalPipeline

    bench = load_benchmark()
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8,), layers_per_block=1,
                       down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), norm_num_groups=4, num_class_embeds=4)
    pipeline = ClassConditionalPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=10), num_classes=3)
    assert bench.requested_classes(pipeline, 7).tolist() == [0, 1, 2, 0, 1, 2, 0]
    seen = []
    unet.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["class_labels"].tolist()), with_kwargs=True)
    images = bench.fid_images(pipeline, 7, 2, seed=0)
    assert images.shape == (7, 1, 8, 8) and 0 <= images.min() and images.max() <= 1
    assert seen == [[0, 1, 2, 0, 1, 2, 0]] * 2  # both DDIM steps, every image with its own label


def test_summary_reports_the_class_agreement_of_the_last_evaluation():
    bench = load_benchmark()
    args = bench.parse_args(["--max_train_steps", "20", "--seeds", "0,1", "--class_conditional", "--regimes", "uniform"])

    def agreeing(seed, step, per_class):
        return {**row("uniform", seed, step, 30.0, step), "class_agreement": sum(per_class) / 2, "class_agreement_per_class": per_class}

    rows = [agreeing(0, 10, [0.0, 0.0]), agreeing(0, 20, [0.5, 0.7]), agreeing(1, 10, [0.0, 0.0]), agreeing(1, 20, [0.7, 0.9])]
    entry = bench.summarize(rows, args)[0][0]
    assert entry["class_agreement"] == pytest.approx((0.7, 0.1 * 2 ** 0.5))  # means 0.6 and 0.8
    assert entry["class_agreement_per_class"] == pytest.approx([0.6, 0.8])
    text = bench.print_table(*bench.summarize(rows, args), args)
    assert "| 0.700 ± 0.141 |" in text and "| uniform | 0.60 | 0.80 |" in text


def test_class_conditional_runs_refuse_the_pruned_arm():
    bench = load_benchmark()
    with pytest.raises(SystemExit):
        bench.parse_args(["--class_conditional", "--regimes", "uniform,tdc_pruned"])
    everything = bench.chosen_arms(bench.parse_args([]))
    assert bench.chosen_arms(bench.parse_args(["--class_conditional"])) == [a for a in everything if a != "tdc_pruned"]


def test_a_half_done_arm_resumes_from_its_newest_evaluated_checkpoint(tmp_path):
    bench = load_benchmark()
    args = bench.parse_args(["--output_dir", str(tmp_path), "--eval_every", "4", "--checkpointing_steps", "4"])
    for step in (4, 8):
        (bench.run_dir(args, "p2", 0) / f"checkpoint-{step}").mkdir(parents=True)
    rows = [row("p2", 0, 4, 50.0, 3.0), row("p2", 1, 8, 40.0, 6.0)]  # seed 0 stopped before its step-8 evaluation
    path, at = bench.resume_point(args, "p2", 0, rows)
    assert path.name == "checkpoint-4" and at == rows[0]  # checkpoint-8 has no evaluated row: it cannot be continued
    rows.append(row("p2", 0, 8, 45.0, 6.0))
    assert bench.resume_point(args, "p2", 0, rows)[0].name == "checkpoint-8"
    assert bench.resume_point(args, "uniform", 0, rows) is None  # no checkpoint: it restarts
    assert bench.resume_point(bench.parse_args(["--output_dir", str(tmp_path)]), "p2", 0, rows) is None  # not asked for
    with pytest.raises(SystemExit):
        bench.parse_args(["--eval_every", "4", "--checkpointing_steps", "6"])


@pytest.mark.slow
def test_a_stopped_run_continues_its_arm_from_the_checkpoint_and_ends_as_an_uninterrupted_one(tmp_path, monkeypatch):
    bench = load_benchmark()
    argv = ["--quick", "--regimes", "uniform", "--checkpointing_steps", "4"]
    bench.main(argv + ["--output_dir", str(tmp_path / "whole")])
    whole = [json.loads(line) for line in (tmp_path / "whole" / "results.jsonl").read_text().splitlines()]

    appender = bench.appender

    def stopping_at_step_8(results):
        record = appender(results)

        def stop(row):
            if row["step"] == 8:
                raise RuntimeError("stopped")
            record(row)

        return stop

    out = tmp_path / "stopped"
    monkeypatch.setattr(bench, "appender", stopping_at_step_8)
    with pytest.raises(RuntimeError, match="stopped"):
        bench.main(argv + ["--output_dir", str(out)])
    monkeypatch.setattr(bench, "appender", appender)
    assert [p.name for p in (out / "runs" / "uniform-seed0").glob("checkpoint-*")] == ["checkpoint-4"]
    before = (out / "results.jsonl").read_text().splitlines()

    bench.main(argv + ["--output_dir", str(out)])
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4, 8] and rows[0] == json.loads(before[0])  # step 4 kept, not trained again
    assert rows[1]["fid"] == pytest.approx(whole[1]["fid"], rel=1e-6)  # the continued run ends where the whole one did
    assert rows[1]["train_seconds"] >= rows[0]["train_seconds"]


def load_overhead(monkeypatch):
    import sys

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    overhead = load_benchmark("overhead")
    monkeypatch.setitem(sys.modules, "overhead", overhead)
    return overhead


def test_overhead_times_the_tdc_stages_says_which_path_ran_and_profiles(tmp_path, monkeypatch):
    """overhead.py --arms: the routed stage-2 rows say whether the batched (wide) step or one forward per group
    ran, and --profile writes one operator table per timed variant."""
    overhead = load_overhead(monkeypatch)
    out = tmp_path / "overhead.json"
    overhead.main(["--arms", "--only", "tdc,tdc_stage2,tdc_stage2_per_group,tdc_round_robin_stage2", "--steps", "1", "--warmup", "1",
                   "--batch_size", "8", "--resolution", "16", "--block_out_channels", "8,16", "--output", str(out),
                   "--profile", str(tmp_path / "profiles"), "--profile_steps", "1"])
    rows = {r.get("arm", r["variant"]): r for r in json.loads(out.read_text())["rows"]}
    assert rows["tdc_stage2"]["experts_forward"] == "batched"
    assert rows["tdc_stage2_per_group"]["experts_forward"] == "per group: --experts_forward per_group"
    assert rows["tdc_round_robin_stage2"]["experts_forward"] == "one expert per step"
    assert "experts_forward" not in rows["tdc"]  # stage 1: the base alone, nothing routed
    tables = sorted(p.name for p in (tmp_path / "profiles").iterdir())
    with pytest.raises(SystemExit):  # refused before any model is built
        overhead.main(["--profile", str(tmp_path / "p"), "--profile_steps", "0"])
    assert len(tables) == len(rows) and "arm_tdc_stage2.txt" in tables
    assert "aten::" in (tmp_path / "profiles" / "arm_tdc_stage2.txt").read_text()


def test_overhead_times_every_variant_as_a_flow_against_the_sd3_step(tmp_path, monkeypatch):
    """overhead.py --noise_process flow: the plain rows are diffusers' SD3 step, every regime variant (and the flow-only
    ones) runs as a rectified flow."""
    overhead = load_overhead(monkeypatch)
    out = tmp_path / "overhead.json"
    overhead.main(["--noise_process", "flow", "--steps", "1", "--warmup", "0", "--batch_size", "4", "--resolution", "16",
                   "--block_out_channels", "8,16", "--output", str(out)])
    result = json.loads(out.read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert result["noise_process"] == "flow"
    assert {"plain diffusers step", "plain SD3 step + logit-normal", "--weighting_scheme cosmap", "--timestep_sampling two_phase",
            "--balancer uw (--regime ant)"} <= set(rows)
    step = overhead.regime_variant(load_script("train_unconditional"), overhead.Accelerator(),
                                   overhead.FlowMatchEulerDiscreteScheduler(), torch.zeros(2, 1, 16, 16), 16, "8,16", [], 10)
    assert step.args[5].noise_process.name == "flow"


def test_overhead_times_the_flow_arms_under_flow_and_their_costs_model_a_flow_folders_clocks(tmp_path, monkeypatch):
    overhead = load_overhead(monkeypatch)
    out = tmp_path / "overhead.json"
    overhead.main(["--noise_process", "flow", "--arms", "--only", "flow_uniform,flow_tdc,flow_tdc_stage2,uniform", "--steps", "1",
                   "--warmup", "1", "--batch_size", "8", "--resolution", "16", "--block_out_channels", "8,16", "--output", str(out)])
    rows = {r["arm"]: r for r in json.loads(out.read_text())["rows"] if "arm" in r}
    assert set(rows) == {"flow_uniform", "flow_tdc", "flow_tdc_stage2"}  # the DDPM arm is another process's
    assert rows["flow_tdc_stage2"]["experts_forward"] == "batched"
    bench = load_benchmark()
    costs = bench.load_step_costs(out)
    assert costs.keys() == rows.keys()
    args = bench.parse_args(["--max_train_steps", "20"])
    costs = {"flow_uniform": 1.0, "flow_tdc": 1.0, "flow_tdc_stage2": 3.0}
    assert bench.modelled_seconds("flow_tdc", 20, costs, args) == 10 * 1.0 + 10 * 3.0  # its stage 2 after the branch
    assert bench.modelled_seconds("flow_tdc+p2", 20, {**costs, "flow_tdc+p2": 1.0}, args) == 10 * 1.0 + 10 * 3.0


def load_pruned_tdc(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return load_benchmark("pruned_tdc")


def test_pruned_tdc_judges_each_pruned_model_against_tdc_at_the_same_steps(monkeypatch):
    pruned_tdc = load_pruned_tdc(monkeypatch)
    args = pruned_tdc.parse_args(["--max_train_steps", "100", "--finetune_steps", "10"])
    assert args.tdc_base_steps == 50 and args.prune_learning_rate == args.learning_rate / 4
    rows = [{"seed": s, "model": m, "steps": steps, "seconds": 1.0, "fid": fid, "flops_per_sample": flops}
            for s, base in enumerate((100.0, 110.0, 120.0))  # the reference's std: 10
            for m, steps, fid, flops in (("tdc@100", 100, base + 50, 10.0), ("tdc@140", 140, base, 10.0),
                                         ("pruned(close)", 140, base + 9, 7.5), ("pruned(far)", 140, base + 11, 7.5),
                                         ("pruned(small saving)", 140, base, 8.5))]
    table = pruned_tdc.summarize(rows, args)
    assert table["tdc@140"]["fid_std"] == pytest.approx(10.0)
    assert table["pruned(close)"]["flops_saved"] == pytest.approx(0.25) and table["pruned(close)"]["goal_met"]
    assert table["pruned(far)"]["fid_gap"] == pytest.approx(11.0) and not table["pruned(far)"]["goal_met"]
    assert not table["pruned(small saving)"]["goal_met"]  # 15 % fewer FLOPs is short of 20 %
    assert "flops_saved" not in table["tdc@100"]


def test_pruned_tdc_prunes_after_the_branch_point_or_refuses_a_base_stage_without_stage_2(monkeypatch, capsys):
    pruned_tdc = load_pruned_tdc(monkeypatch)
    assert pruned_tdc.parse_args(["--max_train_steps", "504", "--tdc_base_steps", "500"]).tdc_base_steps == 500
    with pytest.raises(SystemExit):  # the training script wants at least one stage-2 step
        pruned_tdc.parse_args(["--max_train_steps", "500", "--tdc_base_steps", "500"])
    assert "--tdc_base_steps must be in [1, --max_train_steps 500), got 500" in capsys.readouterr().err


def test_pruned_tdc_counts_a_smaller_fine_tuning_batch_in_training_steps(monkeypatch, capsys):
    """F steps at a quarter of the batch count as F/4 steps per expert: the reference trains 4·F/4 = F more steps."""
    pruned_tdc = load_pruned_tdc(monkeypatch)
    args = pruned_tdc.parse_args(["--max_train_steps", "504", "--tdc_base_steps", "500", "--finetune_steps", "896",
                                  "--finetune_batch_size", "8"])
    assert pruned_tdc.extra_steps(args) == 896  # the reference is tdc@1400
    assert pruned_tdc.extra_steps(pruned_tdc.parse_args(["--finetune_steps", "224"])) == 896
    with pytest.raises(SystemExit):
        pruned_tdc.parse_args(["--finetune_steps", "3", "--finetune_batch_size", "8"])
    assert "must be a multiple of --train_batch_size 32" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pruned_tdc.parse_args(["--finetune_batch_size", "0"])
    assert "--finetune_batch_size must be >= 1, got 0" in capsys.readouterr().err


def write_summary(folder, table, steps=500, batch=32, extra=None):
    """A compare_regimes summary.json holding ``table``: {arm: (mean, std)} at the last step, 3 seeds; ``extra``:
    more entries per arm (``steps_to_target``, ``equal_wall_clock``)."""
    folder.mkdir(parents=True)
    rows = [{"arm": arm, "fid": {"250": [mean + 50, std, 3], str(steps): [mean, std, 3]}, **(extra or {}).get(arm, {})}
            for arm, (mean, std) in table.items()]
    (folder / "summary.json").write_text(json.dumps({"settings": {"max_train_steps": steps, "train_batch_size": batch, "seeds": "0,1,2"},
                                                     "target_fid": None, "table": rows}))


def test_rank_stability_judges_each_arm_against_uniform_and_the_best_baseline_in_every_setting(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    rank = load_benchmark("rank_stability")
    write_summary(tmp_path / "ddpm", {"uniform": (100, 5), "p2": (90, 3), "min_snr": (95, 10), "learned": (80, 4), "tdc": (98, 2),
                                      "ant_uw": (70, 2), "learned+logit_normal": (60, 1)})
    write_summary(tmp_path / "flow", {"uniform": (300, 5), "flow_uniform": (50, 2), "flow_logit_normal": (40, 1),
                                      "flow_learned": (45, 2), "flow_ant_uw": (30, 1), "flow_two_phase": (20, 1)}, steps=2000, batch=8)
    summary = rank.main([f"cpu500={tmp_path / 'ddpm'}", f"flow2000={tmp_path / 'flow'}", "--output_dir", str(tmp_path / "out")])
    rows = json.loads((tmp_path / "out" / "rank_stability.json").read_text())["rows"]
    # by hand: a win needs a gap above the larger std
    assert (rows["cpu500"]["p2"]["vs_uniform"], rows["cpu500"]["p2"]["best_baseline"], rows["cpu500"]["p2"]["vs_best_baseline"]) == (
        "beats", "min_snr", "ties")  # 10 > 5; 95 - 90 = 5 within 10
    assert (rows["cpu500"]["learned"]["vs_uniform"], rows["cpu500"]["learned"]["best_baseline"],
            rows["cpu500"]["learned"]["vs_best_baseline"]) == ("beats", "p2", "beats")  # 20 > 5; 10 > 4
    assert rows["cpu500"]["tdc"]["vs_uniform"] == "ties" and rows["cpu500"]["min_snr"]["vs_uniform"] == "ties"  # 2 < 5; 5 = 5... within 10
    assert "uniform" in rows["flow2000"] and rows["flow2000"]["uniform"]["fid"] == [50, 2]  # the flow arms, not the DDPM one
    assert (rows["flow2000"]["learned"]["vs_uniform"], rows["flow2000"]["learned"]["vs_best_baseline"]) == ("beats", "loses")
    assert "vs_best_baseline" not in rows["flow2000"]["logit_normal"]  # the only baseline there: nothing to judge it by
    assert summary["learned"] == {"settings": ["cpu500", "flow2000"], "holds": False, "holds_on": ["ddpm"], "flips": ["vs_best_baseline"],
                                  "missing": []}
    assert summary["p2"] == {"settings": ["cpu500"], "holds": False, "holds_on": [], "flips": [], "missing": ["flow2000"]}
    assert summary["ant_uw"]["holds"] and not summary["ant_uw"]["flips"]  # 70 vs 100 and 90; 30 vs 50 and 40
    assert [name for name, entry in summary.items() if entry["holds"]] == ["ant_uw"]  # not one that ran in one setting only
    assert summary["learned+logit_normal"]["missing"] == ["flow2000"]
    assert summary["learned+logit_normal"]["holds_on"] == ["ddpm"]  # 60 vs 100 and 90: the one DDPM setting
    assert summary["ant_uw"]["holds_on"] == ["ddpm", "flow"]
    # a flow-only regime holds on flow, not everywhere
    assert (summary["two_phase"]["holds"], summary["two_phase"]["holds_on"]) == (False, ["flow"])
    text = (tmp_path / "out" / "rank_stability.md").read_text()
    assert "cpu500: ddpm, 500 steps × batch 32" in text and "flow2000: flow, 2000 steps × batch 8" in text
    assert text.index("| ant_uw |") < text.index("| learned |")  # what holds comes first
    assert "| learned | 80.0 ± 4.0 U+ B+ (p2) | 45.0 ± 2.0 U+ B− (logit_normal) | no | ddpm | vs_best_baseline |" in text
    assert rank.verdict((95, 1), (100, 5)) == "ties" and rank.verdict((94.9, 1), (100, 5)) == "beats"
    with pytest.raises(SystemExit):
        rank.parse_args([f"x={tmp_path / 'missing'}"])


def test_the_moonshot_needs_half_the_steps_at_the_longest_budget_and_wins_over_the_best_baseline_at_both_clocks(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    rank = load_benchmark("rank_stability")

    def wall(mean, std):
        return {"equal_wall_clock": [0, mean, std]}

    write_summary(tmp_path / "short", {"uniform": (100, 5), "p2": (90, 3), "min_snr": (95, 10), "ant_uw+p2": (80, 2), "tdc+p2": (70, 1)},
                  extra={"p2": wall(92, 3), "ant_uw+p2": wall(85, 2), "tdc+p2": wall(88, 1)})
    write_summary(tmp_path / "long", {"uniform": (60, 2), "p2": (50, 2), "ant_uw+p2": (40, 2), "tdc+p2": (45, 1), "curriculum+p2": (30, 1)},
                  steps=2000, batch=8,
                  extra={"p2": wall(52, 2), "ant_uw+p2": {**wall(44, 2), "steps_to_target": 1000},
                         "tdc+p2": {**wall(51, 1), "steps_to_target": 750}, "curriculum+p2": {**wall(35, 1), "steps_to_target": 1250}})
    rank.main([f"ddpm500={tmp_path / 'short'}", f"ddpm2000={tmp_path / 'long'}", "--output_dir", str(tmp_path / "out")])
    result = json.loads((tmp_path / "out" / "rank_stability.json").read_text())
    # by hand: ant_uw+p2 beats P2 by 10 > 3 and 10 > 2 at equal steps, by 7 > 3 and 8 > 2 at the wall-clock; step 1000 of 2000
    assert result["moonshot"]["ant_uw+p2"] == {"ddpm": []}
    assert result["moonshot"]["tdc+p2"] == {"ddpm": ["ddpm2000: ties the best baseline at uniform's wall-clock"]}  # 52 - 51 < 2
    assert result["moonshot"]["curriculum+p2"] == {"ddpm": ["ddpm500: not run", "ddpm2000: uniform's final FID at step 1250, not by 1000"]}
    assert result["rows"]["ddpm500"]["tdc+p2"]["vs_best_baseline_equal_wall_clock"] == "beats"  # 92 - 88 > 3
    assert "p2" not in result["moonshot"]  # single regimes are not candidates
    text = (tmp_path / "out" / "rank_stability.md").read_text()
    assert "- ant_uw+p2 (ddpm): met" in text and "BW=" in text


def test_a_protocol_sets_its_budget_and_explicit_flags_win():
    bench = load_benchmark()
    long = bench.parse_args(["--protocol", "cpu_long"])
    assert (long.max_train_steps, long.train_batch_size, long.eval_every, long.num_fid_images) == (2000, 8, 250, 250)
    assert bench.parse_args(["--protocol", "cpu_long", "--max_train_steps", "3000"]).max_train_steps == 3000
    round2 = bench.parse_args(["--protocol", "cpu_round2"])
    saved = json.loads((ROOT / "benchmarks" / "results" / "compare_round2" / "settings.json").read_text())
    for key in ("max_train_steps", "train_batch_size", "eval_every", "num_fid_images", "num_inference_steps", "curriculum_share"):
        assert getattr(round2, key) == saved[key], key  # the protocol is round 2's, as its results folder records it
    assert bench.parse_args([]).max_train_steps == 1500  # no protocol: the defaults as before


def test_more_arms_and_seeds_may_join_a_results_folder_but_not_other_settings():
    bench = load_benchmark()
    first = {k: v for k, v in vars(bench.parse_args(["--protocol", "cpu_long", "--regimes", "uniform,p2"])).items()
             if k not in bench.SETTINGS_IGNORED}
    later = bench.parse_args(["--protocol", "cpu_long", "--regimes", "min_snr", "--seeds", "3"])
    current = {k: v for k, v in vars(later).items() if k not in bench.SETTINGS_IGNORED}
    assert bench.same_settings(first, current, ["min_snr"])
    other = {**current, "learning_rate": 1e-3}
    assert not bench.same_settings(first, other, ["min_snr"])
