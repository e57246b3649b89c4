"""Which arms win at every budget and on both noise processes: a rank-stability summary over several
``compare_regimes.py`` results folders.

Each folder is one setting (a budget on one noise process), given as ``LABEL=FOLDER`` (its ``summary.json``). Per
setting, each arm's final FID (mean ± std over seeds) is compared with the setting's uniform arm and with its best
single baseline (of Min-SNR, P2, logit-normal and mode, the one with the lowest final mean FID; never the arm
itself). An arm *beats* a reference by more than the seed spread when its mean is lower by more than the larger of
the two standard deviations; it *loses* when higher by more than that; else it *ties*. Flow-matching arms are named
``flow_<regime>`` and compare with ``flow_uniform``; the summary names every arm by its regime, so ``learned`` and
``flow_learned`` are one row measured on both processes. With an ``equal_wall_clock`` entry (the folder's
``--step_costs`` or its own clocks) the arm is also judged at uniform's wall-clock.

An arm **holds** when it was run in every setting and beats uniform and the best baseline in each; it holds **on a
noise process** when it does so in every setting of that process (an arm defined for one process only, such as
Curriculum Sampling's ``two_phase``, can hold there). It **flips** when it beats a reference in one setting and ties
or loses against it in another.

    python benchmarks/rank_stability.py cpu500=benchmarks/results/compare_round2 \\
        flow500=benchmarks/results/compare_flow_round1 --output_dir benchmarks/results/rank_stability
"""

import argparse
import json
import math
from pathlib import Path

BASELINES = ("min_snr", "p2", "logit_normal", "mode")
UNIFORM = "uniform"
FLOW_PREFIX = "flow_"


def regime_of(arm: str) -> str:
    """The regime an arm trains, without its process (``flow_learned`` -> ``learned``)."""
    return arm[len(FLOW_PREFIX):] if arm.startswith(FLOW_PREFIX) else arm


def process_of(summary) -> str:
    """``flow`` for a folder with flow-matching arms (:func:`final_fids` keeps those), else ``ddpm``."""
    return "flow" if any(e["arm"].startswith(FLOW_PREFIX) for e in summary["table"]) else "ddpm"


def final_fids(summary):
    """``{regime: (mean, std, seeds)}`` at each arm's last evaluated step, ``{regime: (mean, std)}`` at uniform's
    wall-clock where the table has it, and ``{regime: steps to uniform's final FID}``. A folder holding both
    processes' arms keeps the flow arms (the other process's arms are another setting: give them their own folder)."""
    table = summary["table"]
    flow = process_of(summary) == "flow"
    final, wall, reach = {}, {}, {}
    for entry in table:
        if flow != entry["arm"].startswith(FLOW_PREFIX):
            continue
        last = max(entry["fid"], key=int)
        mean, std, seeds = entry["fid"][last]
        final[regime_of(entry["arm"])] = (mean, std, seeds)
        reach[regime_of(entry["arm"])] = float(entry.get("steps_to_target", math.inf))
        if entry.get("equal_wall_clock"):
            wall[regime_of(entry["arm"])] = tuple(entry["equal_wall_clock"][1:3])
    return final, wall, reach


def verdict(arm, reference) -> str:
    """``beats`` / ``loses`` / ``ties``: ``arm``'s mean against ``reference``'s, beyond the larger standard deviation."""
    gap, spread = reference[0] - arm[0], max(arm[1], reference[1])
    return "beats" if gap > spread else "loses" if -gap > spread else "ties"


def setting_rows(final, wall, reach=None):
    """Per regime of one setting: its final FID, steps to uniform's final FID, the best baseline it is judged against
    and the verdicts, at equal steps and (where the folder has clocks) at uniform's wall-clock."""
    present = [b for b in BASELINES if b in final]
    rows = {}
    for regime, fid in final.items():
        row = {"fid": fid[:2], "seeds": fid[2], "steps_to_target": (reach or {}).get(regime, math.inf)}
        if UNIFORM in final and regime != UNIFORM:
            row["vs_uniform"] = verdict(fid, final[UNIFORM])
            if regime in wall:
                row["vs_uniform_equal_wall_clock"] = verdict(wall[regime], final[UNIFORM])
        others = [b for b in present if b != regime]
        if others and regime != UNIFORM:
            best = min(others, key=lambda b: final[b][0])
            row["best_baseline"], row["vs_best_baseline"] = best, verdict(fid, final[best])
            if regime in wall and best in wall:
                row["vs_best_baseline_equal_wall_clock"] = verdict(wall[regime], wall[best])
        rows[regime] = row
    return rows


def wins(rows) -> bool:
    """Whether every one of ``rows`` beats both uniform and the best baseline."""
    return all(row.get("vs_uniform") == "beats" and row.get("vs_best_baseline") == "beats" for row in rows)


def stability(settings, processes=None):
    """``settings``: ``{label: rows}`` (:func:`setting_rows`); ``processes``: ``{label: noise process}``. Per regime:
    the verdicts by setting, whether it holds (beats uniform and the best baseline in every setting), the processes
    it holds on (in every setting of that process) and which comparisons flip between settings."""
    processes = processes or {}
    regimes = sorted({r for rows in settings.values() for r in rows if r != UNIFORM})
    out = {}
    for regime in regimes:
        where = {label: rows[regime] for label, rows in settings.items() if regime in rows}
        flips = [key for key in ("vs_uniform", "vs_best_baseline")
                 if len({row.get(key) for row in where.values() if key in row}) > 1
                 and any(row.get(key) == "beats" for row in where.values())]
        missing = sorted(set(settings) - set(where))
        holds_on = [process for process in sorted(set(processes.values()))
                    if all(label in where for label in settings if processes.get(label) == process)
                    and wins(where[label] for label in settings if processes.get(label) == process)]
        out[regime] = {"settings": sorted(where), "holds": not missing and wins(where.values()), "holds_on": holds_on,
                       "flips": flips, "missing": missing}
    return out


def moonshot(settings, context):
    """Round 3's moonshot, per composed regime (a name with ``+``) and noise process it ran on: in that process's
    longest budget it reaches uniform's final FID within half the steps, and in every setting of the process it
    beats the best single baseline by more than the seed spread at equal steps and at uniform's wall-clock.
    ``{regime: {process: [the conditions it misses]}}`` (an empty list: met)."""
    longest = {}
    for c in context.values():
        longest[c["process"]] = max(longest.get(c["process"], 0), c["max_train_steps"])
    out = {}
    for regime in sorted({r for rows in settings.values() for r in rows if "+" in r}):
        for process in sorted(longest):
            labels = [label for label, c in context.items() if c["process"] == process]
            if not any(regime in settings[label] for label in labels):
                continue
            misses = []
            for label in labels:
                row, steps = settings[label].get(regime), context[label]["max_train_steps"]
                if row is None:
                    misses.append(f"{label}: not run")
                    continue
                if steps == longest[process] and not row["steps_to_target"] <= steps / 2:
                    misses.append(f"{label}: uniform's final FID at step {row['steps_to_target']:g}, not by {steps // 2}")
                for key, where in (("vs_best_baseline", "equal steps"), ("vs_best_baseline_equal_wall_clock", "uniform's wall-clock")):
                    if row.get(key) != "beats":
                        misses.append(f"{label}: {row.get(key, 'not judged against')} the best baseline at {where}")
            out.setdefault(regime, {})[process] = misses
    return out


def render_moonshot(result) -> str:
    lines = ["Moonshot (a composed regime: uniform's final FID in at most half the steps at the longest budget, and a win "
             "over the best single baseline beyond the seed spread at equal steps and at uniform's wall-clock in every "
             "setting of its process):", ""]
    for regime, by_process in result.items():
        for process, misses in by_process.items():
            lines.append(f"- {regime} ({process}): " + ("met" if not misses else "not met; " + "; ".join(misses)))
    return "\n".join(lines) + "\n"


def render(settings, summary) -> str:
    """The Markdown table: one row per regime, one column per setting (FID mean ± std, verdicts), then holds/flips."""
    labels = list(settings)
    short = {"beats": "+", "loses": "−", "ties": "="}
    lines = ["| regime | " + " | ".join(labels) + " | holds everywhere | holds on | flips |",
             "| --- |" + " --- |" * (len(labels) + 3)]
    for regime in sorted(summary, key=lambda r: (not summary[r]["holds"], not summary[r]["holds_on"], r)):
        cells = []
        for label in labels:
            row = settings[label].get(regime)
            if row is None:
                cells.append("not run")
                continue
            cell = f"{row['fid'][0]:.1f} ± {row['fid'][1]:.1f}"
            marks = [f"U{short[row['vs_uniform']]}"] if "vs_uniform" in row else []
            marks += [f"B{short[row['vs_best_baseline']]} ({row['best_baseline']})"] if "vs_best_baseline" in row else []
            marks += [f"BW{short[row['vs_best_baseline_equal_wall_clock']]}"] if "vs_best_baseline_equal_wall_clock" in row else []
            marks += [f"W{short[row['vs_uniform_equal_wall_clock']]}"] if "vs_uniform_equal_wall_clock" in row else []
            cells.append(f"{cell} {' '.join(marks)}")
        entry = summary[regime]
        holds = "yes" if entry["holds"] else f"not run in {', '.join(entry['missing'])}" if entry["missing"] else "no"
        holds_on = ", ".join(entry["holds_on"]) or "—"
        lines.append(f"| {regime} | " + " | ".join(cells) + f" | {holds} | {holds_on} | {', '.join(entry['flips']) or '—'} |")
    legend = ("U: against uniform, B: against the best single baseline, BW: both at uniform's wall-clock, W: at uniform's "
              "wall-clock against uniform's final FID; + beats by more than the seed spread (the larger std), − loses by "
              "more, = within it.")
    return "\n".join(lines) + "\n\n" + legend + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("settings", nargs="+", help="LABEL=FOLDER: a compare_regimes.py results folder (its summary.json).")
    parser.add_argument("--output_dir", type=str, default="benchmarks/results/rank_stability")
    args = parser.parse_args(argv)
    pairs = []
    for item in args.settings:
        label, sep, folder = item.partition("=")
        if not sep or not label or not (Path(folder) / "summary.json").is_file():
            parser.error(f"{item!r}: expected LABEL=FOLDER with FOLDER/summary.json")
        pairs.append((label, Path(folder)))
    if len({label for label, _ in pairs}) != len(pairs):
        parser.error("each LABEL must be given once")
    args.settings = pairs
    return args


def main(argv=None):
    args = parse_args(argv)
    settings, context = {}, {}
    for label, folder in args.settings:
        summary = json.loads((folder / "summary.json").read_text())
        settings[label] = setting_rows(*final_fids(summary))
        s = summary["settings"]
        context[label] = {"folder": str(folder), "process": process_of(summary), "max_train_steps": s["max_train_steps"],
                          "train_batch_size": s["train_batch_size"], "seeds": s["seeds"]}
    summary = stability(settings, {label: c["process"] for label, c in context.items()})
    shot = moonshot(settings, context)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    budgets = ", ".join(f"{label}: {c['process']}, {c['max_train_steps']} steps × batch {c['train_batch_size']}, seeds {c['seeds']}"
                        for label, c in context.items())
    command = "python benchmarks/rank_stability.py " + " ".join(f"{label}={c['folder']}" for label, c in context.items())
    text = (f"Settings ({budgets}).\n\n" + render(settings, summary) + "\n" + render_moonshot(shot)
            + f"\n{command} --output_dir {args.output_dir}\n")
    (out / "rank_stability.md").write_text(text)
    (out / "rank_stability.json").write_text(json.dumps({"settings": context, "rows": settings, "summary": summary, "moonshot": shot}, indent=2))
    print(text)
    return summary


if __name__ == "__main__":
    main()
