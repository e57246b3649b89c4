"""How the package is put together: one module reads flags and the rest takes plain values (the regime as a
frozen RegimeSpec, the run as a RunConfig), the import graph has no cycles and no arrow back up to the package,
and the one training loop steps exactly as a loop written out by hand."""

import argparse
import ast
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from diffusers import DDPMScheduler

from diffusers_curriculum.config import OptimizerSettings, RunConfig, from_flags
from diffusers_curriculum.errors import UsageError
from diffusers_curriculum.regimes import RegimeSpec, add_regime_args, build_regime, regime_spec

from conftest import ROOT

PACKAGE = ROOT / "diffusers_curriculum"
PARSER_MODULES = {"regimes/cli.py", "errors.py"}  # the flags' module, and the ArgumentParser subclass


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported_modules(name: str, path: Path):
    """The package modules ``name`` imports anywhere in it (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                target = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            elif (node.module or "").startswith("diffusers_curriculum"):
                target = node.module
            else:
                continue
            subs = {f"{target}.{alias.name}" for alias in node.names} & MODULES.keys()
            found |= subs or ({target} & MODULES.keys())
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names} & MODULES.keys()
    return found - {name}


def test_no_library_module_reads_an_argparse_namespace():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if str(path.relative_to(PACKAGE)) in PARSER_MODULES:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\bargs\.[A-Za-z_]|argparse\.Namespace|getattr\(args\b", line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_the_import_graph_has_no_cycle_and_no_arrow_back_up_to_the_package():
    graph = {name: imported_modules(name, path) for name, path in MODULES.items()}
    assert graph["diffusers_curriculum.loop"] >= {"diffusers_curriculum.training", "diffusers_curriculum.config"}  # it sees
    up = sorted(name for name, targets in graph.items() if "diffusers_curriculum" in targets)
    assert not up, f"import the package's root: {up}"
    state, path = {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for target in sorted(graph[node]):
            assert state.get(target) != "open", " -> ".join(path[path.index(target):] + [target])
            if target not in state:
                visit(target)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_import_check_sees_a_cycle(tmp_path, monkeypatch):
    """The cycle check above fails on a cycle (two modules importing each other, one lazily)."""
    for name, text in (("a", "from . import b\n"), ("b", "def f():\n    from .a import g\n")):
        (tmp_path / f"{name}.py").write_text(text)
    a, b = imported_modules("pkg.a", tmp_path / "a.py"), imported_modules("pkg.b", tmp_path / "b.py")
    assert a == set() and b == set()  # not package modules: ignored
    monkeypatch.setitem(MODULES, "diffusers_curriculum.a", tmp_path / "a.py")
    monkeypatch.setitem(MODULES, "diffusers_curriculum.b", tmp_path / "b.py")
    assert imported_modules("diffusers_curriculum.a", tmp_path / "a.py") == {"diffusers_curriculum.b"}
    assert imported_modules("diffusers_curriculum.b", tmp_path / "b.py") == {"diffusers_curriculum.a"}


def parse(*argv, **defaults):
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_train_steps", type=int, default=None)
    add_regime_args(parser)
    return parser.parse_args([str(a) for a in argv])


def test_a_spec_written_by_hand_is_the_spec_the_flags_make_and_builds_the_same_regime():
    flags = parse("--regime", "ant", "--ant_clusters", "4", "--timestep_sampling", "curriculum", "--snr_gamma", "3", "--seed", "7")
    before = dict(vars(flags))
    from_flags_spec = regime_spec(flags, 1000, "ddpm")
    assert vars(flags) == before  # the namespace is read, never changed
    by_hand = RegimeSpec(preset="ant", timestep_sampling="curriculum", balancer="uw", clusters=4, cluster_cost="log_snr",
                         weighting="min_snr", snr_gamma=3.0, seed=7)
    assert replace(from_flags_spec, flags=()) == by_hand
    assert from_flags_spec.flag("clusters") == "--ant_clusters" and by_hand.flag("clusters") == "--clusters"
    scheduler = DDPMScheduler()
    one, two = build_regime(from_flags_spec, scheduler, max_train_steps=500), build_regime(by_hand, scheduler, max_train_steps=500)
    assert one.describe() == two.describe() and one.describe()["name"] == "curriculum+uw"
    assert one.boundaries == two.boundaries and len(one.boundaries) == 5


@pytest.mark.parametrize("kwargs, message", [
    ({"balancer": "uw"}, "--balancer uw needs clusters: give --clusters K"),
    ({"weighting": "min_snr", "snr_gamma": -1.0}, "--weighting min_snr needs --snr_gamma > 0"),
    ({"weighting": "learned", "learned_weighting_lr": 0.0}, "--learned_weighting_lr must be > 0"),
    ({"clusters": 3, "cluster_cost": "snr"}, "--clusters has no effect"),
    ({"timestep_sampling": "warp"}, "--timestep_sampling 'warp' is unknown"),
])
def test_a_bad_spec_is_the_scripts_one_line_error_when_made(kwargs, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        RegimeSpec(**kwargs)


def test_a_spec_is_checked_against_the_process_it_is_built_for():
    spec = RegimeSpec(balancer="uw", clusters=200, cluster_cost="equal")  # fine until T is known
    with pytest.raises(UsageError, match=re.escape("--clusters must be in [1, 100]")):
        build_regime(spec, DDPMScheduler(num_train_timesteps=100))
    with pytest.raises(UsageError, match="--weighting cosmap is a rectified-flow loss weight"):
        build_regime(RegimeSpec(weighting="cosmap"), DDPMScheduler())
    with pytest.raises(TypeError, match="build_regime takes a RegimeSpec"):
        build_regime(parse(), DDPMScheduler())


def test_optimizer_settings_round_trip_through_their_record():
    settings = OptimizerSettings(learning_rate=3e-4, adam_beta1=0.9, adam_beta2=0.98, adam_weight_decay=0.01, adam_epsilon=1e-7,
                                 max_grad_norm=0.5)
    record = settings.record()
    assert record == {"name": "AdamW", "learning_rate": 3e-4, "betas": [0.9, 0.98], "weight_decay": 0.01, "eps": 1e-7,
                      "max_grad_norm": 0.5}
    assert OptimizerSettings.from_record(record) == settings
    assert OptimizerSettings.from_record(record, learning_rate=1e-5).learning_rate == 1e-5


def test_from_flags_takes_only_what_the_factory_names(tmp_path):
    flags = {"output_dir": str(tmp_path), "report_to": "none", "learning_rate": 1e-3, "checkpointing_steps": 7, "unrelated": 1}
    run = from_flags(RunConfig, flags, max_train_steps=11)
    assert (run.output_dir, run.checkpointing_steps, run.max_train_steps, run.hub_token) == (str(tmp_path), 7, 11, None)
    with pytest.raises(UsageError, match="--push_checkpoints_timeout must be > 0"):
        RunConfig(output_dir=str(tmp_path), report_to="none", push_checkpoints=True, hub_token="x", push_checkpoints_timeout=0)


# ---- the one loop against a loop written out by hand ---------------------------------------------------------
class Pairs(torch.utils.data.Dataset):
    def __init__(self, n=12):
        generator = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 3, generator=generator), torch.randn(n, 2, generator=generator)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


@pytest.mark.parametrize("accumulation", [1, 2])
def test_the_loop_steps_as_a_hand_written_loop_and_calls_its_hooks(tmp_path, accumulation):
    """Per-sample squared errors through a uniform regime with P2 weighting on fixed per-item levels: the loop's
    parameters equal plain torch's (weights computed here by hand, AdamW, clipping, accumulation averaging the
    micro-batches), across an epoch boundary, with each hook called at its step."""
    import logging

    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    from diffusers_curriculum.loop import TrainingLoop
    from diffusers_curriculum.training import end_training, make_optimizer

    data, levels = Pairs(), torch.tensor([10, 200, 500, 900] * 3)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    steps_per_epoch, max_steps = 6 // accumulation, 8 // accumulation  # 6 batches of 2 per epoch
    settings = OptimizerSettings(learning_rate=1e-2, max_grad_norm=0.05)
    scheduler = DDPMScheduler()
    regime = build_regime(RegimeSpec(weighting="p2", p2_gamma=1.0, p2_k=1.0), scheduler)
    run = RunConfig(output_dir=str(tmp_path / "run"), max_train_steps=max_steps, gradient_accumulation_steps=accumulation,
                    report_to="none", checkpointing_steps=100)
    accelerator = Accelerator(gradient_accumulation_steps=accumulation, cpu=True)
    optimizer = make_optimizer(settings, model.parameters())
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    loader = torch.utils.data.DataLoader(data, batch_size=2, shuffle=False)
    batches_seen = []

    loop = TrainingLoop(accelerator, run, regime, logging.getLogger("test"), "test", done_file="done.json")
    assert loop.begin() is None
    model, optimizer, loader, lr_scheduler = loop.prepare(model, optimizer, loader, lr_scheduler)

    def step(batch):
        start = (2 * len(batches_seen)) % len(data)
        batches_seen.append(start)
        return ((model(batch["x"]) - batch["y"]) ** 2).mean(dim=1), levels[start : start + 2]

    calls = []
    summary = loop.train(step, max_grad_norm=settings.max_grad_norm, on_step_end=lambda s: calls.append(("step", s)),
                         on_epoch_end=lambda e, s: calls.append(("epoch", e, s)), finish=lambda s: calls.append(("finish", s)))
    trained = accelerator.unwrap_model(model)
    model = optimizer = loader = lr_scheduler = None
    end_training(accelerator)

    steps = [("step", s) for s in range(1, max_steps + 1)]
    assert calls == [*steps[:steps_per_epoch], ("epoch", 0, steps_per_epoch), *steps[steps_per_epoch:], ("finish", max_steps)]
    assert summary["global_step"] == max_steps and len(summary["losses"]) == max_steps
    assert (tmp_path / "run" / f"checkpoint-{max_steps}").is_dir()  # the last step is always checkpointed

    alphas = scheduler.alphas_cumprod  # by hand: P2's weight 1/(1 + SNR(t)), SNR = ᾱ/(1 − ᾱ)

    def by_hand(weight):
        torch.manual_seed(0)
        reference = torch.nn.Linear(3, 2)
        hand = torch.optim.AdamW(reference.parameters(), lr=1e-2, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
        for update in range(max_steps):
            for micro in range(accumulation):
                start = ((update * accumulation + micro) * 2) % len(data)
                x, y, t = data.x[start : start + 2], data.y[start : start + 2], levels[start : start + 2]
                ((((reference(x) - y) ** 2).mean(dim=1) * weight(t)).mean() / accumulation).backward()
            torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
            hand.step()
            hand.zero_grad()
        return reference

    reference = by_hand(lambda t: 1.0 / (1.0 + alphas[t] / (1 - alphas[t])))
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(trained.state_dict()[name], value, rtol=1e-5, atol=1e-6)
    unweighted = by_hand(lambda t: torch.ones(len(t)))  # the comparison can tell: without the weight it differs
    assert not torch.allclose(trained.weight, unweighted.weight, rtol=1e-5, atol=1e-6)


def test_the_readme_architecture_table_names_every_module_and_only_modules_that_exist():
    text = (ROOT / "README.md").read_text()
    table = text[text.index("## Architecture"):text.index("## Extending")]
    rows = [line for line in table.splitlines() if line.startswith("| `diffusers_curriculum")]
    named = set()
    for row in rows:
        first, rest = row.split("|")[1], "|".join(row.split("|")[2:])
        named |= {name.split(".")[-1] for name in re.findall(r"`([\w.]+)`", first)}
        # sub-modules named in the description as `package.module` or `module` (the first column's package's)
        named |= {name.split(".")[-1] for name in re.findall(r"`(\w+\.\w+)`", rest)}
    top = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"} | {
        p.parent.name for p in PACKAGE.glob("*/__init__.py") if p.parent.name != "model_cards"}
    missing = sorted(top - named)
    assert not missing, f"modules missing from the README's architecture table: {missing}"
    for row in rows:
        for name in re.findall(r"`([\w.]+)`", row.split("|")[1]):
            module = name if name.startswith("diffusers_curriculum") else f"diffusers_curriculum.{name}"
            assert module in MODULES, f"the README's architecture table names {name}, which does not exist"
