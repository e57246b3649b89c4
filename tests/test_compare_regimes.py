"""benchmarks/compare_regimes.py --quick: the CI-sized run produces the table, the plot and resumable results."""

import importlib.util
import json

import pytest

from conftest import ROOT


def load_benchmark():
    spec = importlib.util.spec_from_file_location("compare_regimes", ROOT / "benchmarks" / "compare_regimes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_mode_writes_table_plot_and_resumes(tmp_path):
    bench = load_benchmark()
    out = tmp_path / "quick"
    table = bench.main(["--quick", "--output_dir", str(out)])
    assert {row["arm"] for row in table} == {"uniform", "loss_aware", "tdc", "tdc_pruned"}
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {(r["arm"], r["step"]) for r in rows} >= {("uniform", 4), ("uniform", 8), ("tdc", 8), ("tdc_pruned", 8)}
    assert all(r["fid"] > 0 for r in rows)
    pruned = next(r for r in rows if r["arm"] == "tdc_pruned")
    tdc = next(r for r in rows if r["arm"] == "tdc" and r["step"] == 8)
    assert pruned["flops_per_sample"] < tdc["flops_per_sample"]
    assert (out / "fid_vs_steps.png").stat().st_size > 0 and "| uniform |" in (out / "table.md").read_text()

    bench.main(["--quick", "--output_dir", str(out)])  # everything is done: nothing is retrained
    assert len((out / "results.jsonl").read_text().splitlines()) == len(rows)
    with pytest.raises(SystemExit, match="other settings"):
        bench.main(["--quick", "--output_dir", str(out), "--prune_ratio", "0.3"])


def test_summary_statistics_and_steps_to_target():
    bench = load_benchmark()
    args = bench.parse_args(["--max_train_steps", "20", "--seeds", "0,1"])
    rows = [
        {"arm": "uniform", "seed": 0, "step": 10, "fid": 50.0, "flops_per_sample": 4, "train_seconds": 10},
        {"arm": "uniform", "seed": 0, "step": 20, "fid": 30.0, "flops_per_sample": 4, "train_seconds": 20},
        {"arm": "uniform", "seed": 1, "step": 10, "fid": 40.0, "flops_per_sample": 4, "train_seconds": 10},
        {"arm": "uniform", "seed": 1, "step": 20, "fid": 34.0, "flops_per_sample": 4, "train_seconds": 22},
        {"arm": "fast", "seed": 0, "step": 10, "fid": 31.0, "flops_per_sample": 2, "train_seconds": 10},
        {"arm": "fast", "seed": 0, "step": 20, "fid": 20.0, "flops_per_sample": 2, "train_seconds": 20},
    ]
    table, target = bench.summarize(rows, args)
    assert target == pytest.approx(32.0)  # the uniform arm's mean final FID
    entry = {e["arm"]: e for e in table}
    assert entry["uniform"]["fid"][20][:2] == pytest.approx((32.0, 2 ** 1.5))
    # median over seeds: uniform seed 0 reaches 32 at step 20, seed 1 never does
    assert entry["fast"]["steps_to_target"] == 10 and entry["uniform"]["steps_to_target"] == float("inf")
    assert entry["uniform"]["seconds_per_step"] == pytest.approx(1.05)
