
import pytest
import torch
from diffusers import DDPMScheduler

from diffusers_curriculum import read_training_regime
from diffusers_curriculum.clustering import boundaries_to_clusters, check_boundaries, equal_boundaries, partition
from diffusers_curriculum.errors import UsageError
from diffusers_curriculum.regimes import Regime, build_regime
from diffusers_curriculum.regimes.timesteps import (
    AdaptivePacing, CurriculumSampler, FixedPacing, curriculum_outlook, stage_interval, stage_step_cap, stage_steps_range,
)

from conftest import regime_args as conftest_regime_args


class SingleProcess:
    """The two accelerator calls a regime makes, for one process."""

    device = torch.device("cpu")

    def backward(self, loss):
        pass

    def reduce(self, tensor, reduction="mean"):
        return tensor


def test_equal_clusters_cover_range_exactly():
    for T, n in [(1000, 20), (1000, 7), (10, 10), (10, 1), (13, 4)]:
        boundaries = equal_boundaries(T, n)
        check_boundaries(boundaries, n)
        sizes = [end - start for start, end in boundaries_to_clusters(boundaries)]
        assert boundaries[-1] == T and len(sizes) == n and max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        equal_boundaries(10, 11)
    with pytest.raises(ValueError):
        check_boundaries([0, 5, 5, 10])


def test_stages_grow_from_the_highest_timesteps():
    clusters = boundaries_to_clusters(equal_boundaries(100, 4))
    assert [stage_interval(clusters, n) for n in (1, 2, 3, 4)] == [(75, 100), (50, 100), (25, 100), (0, 100)]
    with pytest.raises(ValueError):
        stage_interval(clusters, 5)


def test_fixed_pacing_is_exact():
    pacing = FixedPacing(steps_per_stage=3)
    assert [pacing.update(1.0) for _ in range(9)] == [False, False, True] * 3


def test_stage_advances_after_exactly_patience_non_improving_checks():
    pacing = AdaptivePacing(patience=3, check_every=2, smoothing=0.0)
    decisions = [pacing.update(1.0) for _ in range(8)]
    # check at step 2 sets the best; steps 4, 6, 8 do not improve -> advance at step 8, not before
    assert decisions == [False] * 7 + [True]
    assert pacing.stage_steps == 0 and pacing.best is None  # fresh state for the next stage


def test_improving_loss_resets_patience_and_cap_still_applies():
    pacing = AdaptivePacing(patience=2, check_every=1, smoothing=0.0)
    assert not any(pacing.update(1.0 / (i + 1)) for i in range(50))
    capped = AdaptivePacing(patience=2, check_every=1, max_stage_steps=10, smoothing=0.0)
    assert [capped.update(1.0 / (i + 1)) for i in range(10)] == [False] * 9 + [True]


def test_non_improvement_must_be_consecutive():
    pacing = AdaptivePacing(patience=2, check_every=1, smoothing=0.0)
    stream = [1.0, 1.0, 0.5, 0.5, 0.5]  # best, bad, better (reset), bad, bad -> advance at 5
    assert [pacing.update(x) for x in stream] == [False, False, False, False, True]


def make_regime(pacing, T=100, clusters=4, seed=0):
    scheduler = DDPMScheduler(num_train_timesteps=T)
    boundaries = equal_boundaries(T, clusters)
    return Regime(scheduler, CurriculumSampler(T, boundaries, pacing, seed=seed), boundaries=boundaries, timestep_sampling="curriculum")


def test_sampler_never_draws_outside_the_stage_and_never_skips_a_stage():
    regime, accelerator = make_regime(FixedPacing(5)), SingleProcess()
    clean = torch.zeros(16, 1, 4, 4)
    stages = []
    for step in range(1, 41):
        _, t = regime.sample(clean)
        low, high = stage_interval(regime.sampler.clusters, regime.sampler.stage)
        assert int(t.min()) >= low and int(t.max()) < high
        regime.backward(accelerator, torch.rand(16), t)
        stages.append(regime.on_step_end(accelerator, step)["curriculum_stage"])
    assert all(b - a in (0, 1) for a, b in zip(stages, stages[1:]))
    assert stages[-1] == 4  # stays on the full range after the last stage
    assert [h["start_step"] for h in regime.sampler.stage_history] == [0, 5, 10, 15]


def test_state_dict_restores_stage_pacing_and_draws():
    accelerator = SingleProcess()
    a = make_regime(AdaptivePacing(patience=2, check_every=1, smoothing=0.5))
    losses = [1.0, 0.9, 0.95, 0.97, 0.99, 0.98, 1.0, 1.0, 1.0, 1.0]
    for step, loss in enumerate(losses[:5], start=1):
        a.backward(accelerator, torch.full((4,), loss), a.sample(torch.zeros(4, 1, 2, 2))[1])
        a.on_step_end(accelerator, step)
    state = a.state_dict()
    b = make_regime(AdaptivePacing(patience=2, check_every=1, smoothing=0.5), seed=123)
    b.load_state_dict(state)
    for step, loss in enumerate(losses[5:], start=6):
        for regime in (a, b):
            regime.backward(accelerator, torch.full((4,), loss), regime.sample(torch.zeros(4, 1, 2, 2))[1])
            regime.on_step_end(accelerator, step)
        assert torch.equal(a.sample(torch.zeros(4, 1, 2, 2))[1], b.sample(torch.zeros(4, 1, 2, 2))[1])
    assert a.sampler.stage_history == b.sampler.stage_history and a.sampler.stage == b.sampler.stage > 1


def regime_args(*argv):
    return conftest_regime_args("--regime", "curriculum", *argv)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--curriculum_clusters", "0"], "--curriculum_clusters must be in \\[1, 1000\\]"),
        (["--curriculum_clusters", "1001"], "--curriculum_clusters must be in \\[1, 1000\\]"),
        (["--curriculum_patience", "0"], "--curriculum_patience must be >= 1"),
        (["--curriculum_check_every", "0"], "--curriculum_check_every must be >= 1"),
        (["--curriculum_steps_per_stage", "10"], "--curriculum_steps_per_stage needs --curriculum_pacing fixed"),
        (["--curriculum_share", "0"], "--curriculum_share must be in \\(0, 1\\]"),
        (["--curriculum_share", "1.5"], "--curriculum_share must be in \\(0, 1\\]"),
        (["--curriculum_pacing", "fixed", "--curriculum_steps_per_stage", "5", "--curriculum_max_stage_steps", "9"],
         "--curriculum_max_stage_steps applies to adaptive"),
        (["--clusters", "0"], "--clusters must be in \\[1, 1000\\]"),  # the shared flag wins over the alias
    ],
)
def test_bad_curriculum_flags_are_one_line_errors(argv, message):
    with pytest.raises(UsageError, match=message):
        regime_args(*argv)


def test_build_regime_gives_the_curriculum():
    args = regime_args("--curriculum_clusters", "10", "--snr_gamma", "5")
    regime = build_regime(args, DDPMScheduler(num_train_timesteps=1000))
    assert isinstance(regime.sampler, CurriculumSampler) and regime.sampler.num_stages == 10
    assert stage_interval(regime.sampler.clusters, 1) == (900, 1000) and regime.weighting.name == "min_snr"
    info = regime.describe()
    assert info["name"] == "curriculum" and info["pacing"]["policy"] == "AdaptivePacing" and info["pacing"]["patience"] == 5


CURRICULUM = ["--regime", "curriculum", "--curriculum_clusters", "4", "--curriculum_pacing", "fixed",
              "--curriculum_steps_per_stage", "3", "--no_validation"]


def test_script_records_stage_history_in_the_regime_file_and_card(train_unconditional, tmp_path, tiny_flags):
    args = train_unconditional.parse_args(["--output_dir", str(tmp_path / "run"), *tiny_flags, *CURRICULUM, "--max_train_steps", "14"])
    train_unconditional.main(args)
    record = read_training_regime(tmp_path / "run")
    assert record["name"] == "curriculum" and record["clusters"] == [[0, 25], [25, 50], [50, 75], [75, 100]]
    assert record["stage_history"] == [
        {"stage": 1, "start_step": 0, "t_min": 75}, {"stage": 2, "start_step": 3, "t_min": 50},
        {"stage": 3, "start_step": 6, "t_min": 25}, {"stage": 4, "start_step": 9, "t_min": 0},
    ]
    card = (tmp_path / "run" / "README.md").read_text()
    assert "Curriculum pacing: fixed pacing: 3 steps per stage." in card
    assert "The curriculum reached stage 4 of 4 (the full range) at step 9 of 14" in card


def test_resume_mid_stage_reproduces_stage_history_and_draws(train_unconditional, tmp_path, tiny_flags):
    flags = [*tiny_flags, "--regime", "curriculum", "--curriculum_clusters", "4", "--curriculum_patience", "1",
             "--curriculum_check_every", "2", "--curriculum_max_stage_steps", "5", "--max_train_steps", "16",
             "--checkpointing_steps", "7", "--no_validation"]
    straight = train_unconditional.main(train_unconditional.parse_args(["--output_dir", str(tmp_path / "a"), *flags]))
    (tmp_path / "b").mkdir()
    import shutil

    shutil.copytree(tmp_path / "a" / "checkpoint-7", tmp_path / "b" / "checkpoint-7")
    resumed = train_unconditional.main(train_unconditional.parse_args(
        ["--output_dir", str(tmp_path / "b"), *flags, "--resume_from_checkpoint", "latest"]))
    assert resumed["regime_state"]["sampler"]["stage_history"] == straight["regime_state"]["sampler"]["stage_history"]
    assert len(straight["regime_state"]["sampler"]["stage_history"]) >= 3  # the run did move through stages
    assert resumed["losses"] == pytest.approx(straight["losses"][7:], rel=1e-5)
    assert torch.equal(resumed["regime_state"]["sampler"]["generator"], straight["regime_state"]["sampler"]["generator"])
    a, b = read_training_regime(tmp_path / "a"), read_training_regime(tmp_path / "b")
    assert a == b


def test_curriculum_cluster_cost_is_wired_to_the_stages():
    """--curriculum_cluster_cost log_snr: the stages are the DP's clusters, not equal intervals."""
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    regime = build_regime(regime_args("--curriculum_clusters", "4", "--curriculum_cluster_cost", "log_snr"), scheduler)
    expected = partition("log_snr", 4, 1000, scheduler.alphas_cumprod)
    assert expected != equal_boundaries(1000, 4)
    assert regime.sampler.clusters == boundaries_to_clusters(expected) and regime.boundaries == expected
    assert regime.sampler.t_min == expected[3]  # stage 1: the highest-t cluster of the DP


# ---- the preset's defaults fit the run (--curriculum_share) ----------------------------------------------------
def test_stage_cap_and_stage_lengths_by_hand():
    assert stage_step_cap(200, 0.2, 5) == 8 and stage_step_cap(1000, 0.2, 5) == 40 and stage_step_cap(10, 0.2, 5) == 1
    assert stage_steps_range(FixedPacing(7)) == (7, 7)
    # first check sets the best, then 5 failed checks of 50 steps: 300 steps at the earliest, no cap
    assert stage_steps_range(AdaptivePacing(patience=5, check_every=50)) == (300, None)
    assert stage_steps_range(AdaptivePacing(patience=5, check_every=20, max_stage_steps=40)) == (40, 40)


def test_outlook_names_how_far_the_old_twenty_stage_default_got():
    old = AdaptivePacing(patience=5, check_every=50)  # the preset before --curriculum_share: 20 stages, no cap
    assert "stage 4 of 20 at best" in curriculum_outlook(20, old, 1000)  # stages change at 300, 600, 900
    with pytest.raises(ValueError, match="never leaves it"):
        curriculum_outlook(20, old, 200)
    assert "may not reach" in curriculum_outlook(5, AdaptivePacing(patience=1, check_every=10), 1000)  # no cap
    assert curriculum_outlook(5, AdaptivePacing(patience=5, check_every=20, max_stage_steps=40), 1000) is None


@pytest.mark.parametrize("max_train_steps", [200, 1000])
@pytest.mark.parametrize("loss", ["improving", "flat"])
def test_default_curriculum_reaches_its_last_stage_within_a_fifth_of_the_run(max_train_steps, loss):
    """Whatever the loss does (an always-improving loss never trips the patience, so only the cap advances), the
    default preset reaches the full range within --curriculum_share 0.2 of the run."""
    regime = build_regime(regime_args(), DDPMScheduler(num_train_timesteps=1000), max_train_steps=max_train_steps)
    sampler = regime.sampler
    assert sampler.num_stages == 5 and stage_interval(sampler.clusters, 1) == (800, 1000)
    for step in range(1, max_train_steps + 1):
        sampler.advance(1.0 / step if loss == "improving" else 1.0, step)
    last = sampler.stage_history[-1]
    assert last["stage"] == 5 and last["t_min"] == 0 and last["start_step"] <= 0.2 * max_train_steps


def test_a_curriculum_out_of_reach_warns_up_front_naming_the_numbers(caplog):
    args = regime_args("--curriculum_clusters", "20", "--curriculum_check_every", "50", "--curriculum_max_stage_steps", "1000")
    with caplog.at_level("WARNING"):
        build_regime(args, DDPMScheduler(num_train_timesteps=1000), max_train_steps=1000)
    assert "cannot reach its last stage in 1000 steps" in caplog.text and "stage 4 of 20" in caplog.text
    assert "--curriculum_max_stage_steps 1000" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        build_regime(regime_args(), DDPMScheduler(num_train_timesteps=1000), max_train_steps=1000)
    assert caplog.text == ""


def test_a_curriculum_that_never_leaves_its_first_stage_is_refused(train_unconditional, tmp_path, tiny_flags):
    with pytest.raises(UsageError, match="never leaves it .*--curriculum_steps_per_stage 300"):
        train_unconditional.parse_args(["--output_dir", str(tmp_path / "run"), *tiny_flags, "--regime", "curriculum",
                                        "--curriculum_pacing", "fixed", "--curriculum_steps_per_stage", "300",
                                        "--max_train_steps", "200"])
    assert not (tmp_path / "run").exists()


def test_fixed_pacing_takes_its_stage_length_from_the_share():
    regime = build_regime(regime_args("--curriculum_pacing", "fixed"), DDPMScheduler(num_train_timesteps=1000), max_train_steps=500)
    assert regime.sampler.pacing.steps_per_stage == 20  # 0.2 · 500 / 5
    with pytest.raises(UsageError, match="--curriculum_pacing fixed needs --curriculum_steps_per_stage"):
        build_regime(regime_args("--curriculum_pacing", "fixed"), DDPMScheduler(num_train_timesteps=1000))


DIGITS = ["--dataset_name", "digits", "--resolution", "8", "--block_out_channels", "16,32", "--train_batch_size", "8",
          "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--ddpm_num_steps", "100", "--ddpm_num_inference_steps", "2",
          "--eval_batch_size", "4", "--report_to", "none", "--seed", "0", "--max_train_samples", "64"]


def test_a_200_step_default_curriculum_run_trains_the_full_range_and_says_so(train_unconditional, tmp_path):
    out = tmp_path / "run"
    train_unconditional.main(train_unconditional.parse_args(["--output_dir", str(out), *DIGITS, "--max_train_steps", "200",
                                                             "--regime", "curriculum", "--no_validation"]))
    record = read_training_regime(out)
    # cap ⌊0.2 · 200 / 5⌋ = 8 steps; adaptive checks every 4 steps cannot end a stage before 6 · 4 = 24 steps
    assert [h["start_step"] for h in record["stage_history"]] == [0, 8, 16, 24, 32]
    assert [h["t_min"] for h in record["stage_history"]] == [80, 60, 40, 20, 0]
    card = (out / "README.md").read_text()
    assert ("The curriculum reached stage 5 of 5 (the full range) at step 32 of 200, and trained on every timestep for "
            "the remaining 168 steps.") in card
