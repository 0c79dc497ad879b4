"""The study's outputs: ``convergence.json``, ``convergence.md`` (tables + findings) and the plots.

Plots: ``error_vs_batch.png`` (fixed-epoch error per recipe, baseline ± 1
point band, B_noise marks), ``steps_to_target.png`` (log-log, perfect
scaling, B_noise), ``curves.png`` (test error vs epoch, B_noise vs epoch).
"""

from __future__ import annotations

from convergence_study import design as D


def _fmt(x, spec=".2f", none="–"):
    return none if x is None else format(x, spec)


def _parts(cost: dict, spec: str) -> str:
    return ", ".join(f"{p}: {c['runs']} runs, {format(c['hours'], spec)} h" for p, c in cost["parts"].items())


def _grid(grid: dict) -> str:
    return ", ".join(f"x{k}: {v:.2f}" for k, v in grid.items())


def _verdict(flag) -> str:
    return "unknown (not yet measured)" if flag is None else "MET" if flag else "MISSED"


def _of(best: dict) -> str:
    n, total = best.get("recipes_measured"), best.get("recipes")
    return f" (best of {n} of {total} recipes measured so far)" if n is not None and n < total else ""


def targets(res: dict) -> list[str]:
    """The issue's targets, each stated plainly as met, missed or unknown."""
    fx, sp, out = res.get("fixed") or {}, res.get("steps") or {}, ["", "## Targets", ""]
    out.append(
        f"- Within 1 point of the baseline at the batch nearest the late B_noise "
        f"({fx.get('batch_nearest_late_b_noise')}), same epochs: "
        f"{_verdict(fx.get('target_within_1_at_b_noise'))}."
    )
    best = fx.get("best_at_32x")
    out.append(
        "- Best recipe at 32x the baseline batch: "
        + (f"{best['recipe']}, {best['vs_baseline']:+.2f} points from the baseline{_of(best)}." if best
           else "unknown.")
    )
    for recipe, lb in sp.get("largest_within", {}).items():
        more = " or more" if lb["censored"] else ""
        more = more if lb.get("complete", True) else f" so far (grid incomplete{_bracket(lb)})"
        out.append(
            f"- {D.LABELS[recipe]}: largest batch within 1 point {lb['batch']}{more}; "
            f"early B_noise predicts it within 2x: {lb['prediction']['verdict']}."
        )
    return out


def markdown(res: dict, cost: dict, plan: dict) -> str:
    """``convergence.md``: cost, the targets, then one table section per part that has results."""
    out = ["# Convergence study (steps to target, fixed epochs, Akiba BN, LARS gap)", ""]
    out += _cost_md(cost, plan)
    out += targets(res)
    sections = (("budget-check", _budget_md), ("fixed", _fixed_md), ("steps", _steps_md),
                ("akiba-bn", _akiba_md), ("lars-gap", _lars_md))
    for part, section in sections:
        if res.get(part):
            out += section(res[part])
    return "\n".join(out) + "\n"


def _cost_md(cost: dict, plan: dict) -> list[str]:
    out = [
        f"Measured cost of the records used: {cost['runs']} runs, {cost['hours']:.2f} run-hours "
        f"({_parts(cost, '.2f')}). "
        f"CPU: {', '.join(cost['cpu_models'])}. Runs on a loaded machine: {len(cost['loaded_runs'])}."
    ]
    if plan["runs"]:
        out.append(
            f"Still to run: {plan['runs']} runs, about {plan['hours']:.1f} run-hours by the cost model "
            f"({_parts(plan, '.1f')})."
        )
    return out


def _budget_md(bc: dict) -> list[str]:
    out = [
        "",
        "## Budget check (baseline at E and 2E)",
        "",
        "| E | 2E | error at E | at 2E | diff | ≤ tol |",
        "|---|---|---|---|---|---|",
    ]
    out += [
        f"| {p['epochs']:g} | {p['epochs_2x']:g} | {p['error']:.2f} | {p['error_2x']:.2f} | "
        f"{p['difference']:+.2f} | {'yes' if p['within_tol'] else 'no'} |"
        for p in bc["pairs"]
    ]
    out.append(
        f"\nChosen budget: {bc['chosen']:g} epochs (tolerance {bc['tol']} points)."
        if bc["chosen"]
        else f"\nNo budget passed (tolerance {bc['tol']} points): the other parts use the default budget."
    )
    tl = bc.get("at_tuned_lr")
    for p in (tl or {}).get("pairs", []):
        out.append(
            f"At the tuned LR {tl['lr']:g}: {p['error']:.2f}% after {p['epochs']:g} epochs, "
            f"{p['error_2x']:.2f}% after {p['epochs_2x']:g} ({p['difference']:+.2f}, "
            f"{'within' if p['within_tol'] else 'NOT within'} {bc['tol']} points; {p['seeds']} seeds)."
        )
    if tl is not None and not tl.get("pairs"):
        out.append(f"At the tuned LR {tl['lr']:g}: the 2E runs are still to run.")
    return out


def _tuned(row: dict) -> str:
    """The 'tuned' column; it names a best LR that is still an end of the grid after its extensions."""
    if not row["lr_tuned"]:
        return "no"
    return "yes, at the grid's edge" if row.get("lr_at_grid_edge") else "yes"


def _fixed_md(fx: dict) -> list[str]:
    out = [
        "",
        f"## Fixed epochs ({fx['epochs']:g}; budget verified: {fx['budget_verified']})",
        "",
        "| batch | recipe | LR | tuned | steps | seeds | error % | ± | vs baseline | LR grid errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in fx["rows"]:
        out.append(
            f"| {r['batch']} | {D.LABELS.get(r['recipe'], r['recipe'])} | {r['lr']:g} | "
            f"{_tuned(r)} | {r['steps']:g} | {','.join(map(str, r['seeds']))} | "
            f"{_fmt(r.get('mean'))} | {_fmt(r.get('half_spread'))} | "
            f"{_fmt(r.get('vs_baseline'), '+.2f')} | "
            f"{_grid(r['grid'])} |"
        )
    n = fx["b_noise"]
    out.append(
        f"\nB_noise of the baseline (median over seeds): early {_fmt(n.get('early'), '.0f')}, "
        f"late {_fmt(n.get('late'), '.0f')} images. Batch nearest the late B_noise: "
        f"{fx['batch_nearest_late_b_noise']}; a recipe within 1 point there: "
        f"{fx['target_within_1_at_b_noise']}. Best at 32x the baseline batch: {fx['best_at_32x']}."
    )
    return out


def _steps_md(sp: dict) -> list[str]:
    batches = sorted({p["batch"] for c in sp["curves"].values() for p in c})
    out = [
        "",
        f"## Steps to {_fmt(sp['target_error'])}% test error ({sp['epochs']:g}-epoch schedules)",
        "",
        "Baseline reaches the target: "
        + "; ".join(
            f"seed {x['seed']}: {_fmt(x.get('steps'), '.0f')} steps ({_fmt(x.get('fraction_of_budget'))} "
            "of its budget)"
            for x in sp["baseline_reaches_target"]
        ),
        "",
        "| recipe | " + " | ".join(str(b) for b in batches) + " |",
        "|---" * (len(batches) + 1) + "|",
    ]
    for recipe, pts in sp["curves"].items():
        by = {p["batch"]: p for p in pts}
        cells = ((f"{by[b]['steps']:.0f}" if by[b]["reached"] else f">{by[b]['cap']:.0f}") if b in by else "–"
                 for b in batches)
        out.append(f"| {D.LABELS[recipe]} | " + " | ".join(cells) + " |")
    out += [
        "",
        "| recipe | largest batch within 1 point | early B_noise | late B_noise | ratio to early | "
        "predicted within 2x | B_noise at the target | ratio to it | predicted within 2x |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    n = sp["b_noise"]
    for recipe, lb in sp["largest_within"].items():
        pred, at = lb["prediction"], lb.get("prediction_at_target") or {"ratio": None, "verdict": "–"}
        out.append(
            f"| {D.LABELS[recipe]} | {lb['batch']}{' (top of grid)' if lb['censored'] else ''}"
            f"{'' if lb.get('complete', True) else f' (grid incomplete{_bracket(lb)})'} | "
            f"{_fmt(n.get('early'), '.0f')} | {_fmt(n.get('late'), '.0f')} | "
            f"{_fmt(pred['ratio'])} | {pred['verdict']} | "
            f"{_fmt(n.get('at_target'), '.0f')} | {_fmt(at['ratio'])} | {at['verdict']} |"
        )
    out += [
        "",
        "B_noise at the target: the baseline's smoothed B_noise within 1 epoch of where it reaches "
        "the target error (median over seeds), McCandlish et al.'s critical batch for that loss.",
    ]
    return out


def _bracket(lb: dict) -> str:
    """'; measured cells: within at A, beyond at B' for a largest batch whose grid is incomplete."""
    br = lb.get("bracket") or {}
    parts = ([f"within at {br['within']}"] if br.get("within") else []) + (
        [f"beyond at {br['out']}"] if br.get("out") else [])
    return ("; measured cells: " + ", ".join(parts)) if parts else ""


def _akiba_md(ak: dict) -> list[str]:
    out = [
        "",
        "## Akiba's BN under accumulation",
        "",
        "| batch | BN | LR | error % | ± |",
        "|---|---|---|---|---|",
    ]
    return out + [
        f"| {r['batch']} | {r['variant']} | {r['lr']:g} | {_fmt(r.get('mean'))} | "
        f"{_fmt(r.get('half_spread'))} |"
        for r in ak["rows"]
    ]


def _lars_md(lg: dict) -> list[str]:
    out = [
        "",
        f"## LARS gap at 1k ({lg['epochs']:g} epochs; reference: baseline "
        f"{lg['reference']['baseline_error']}%, LARS {lg['reference']['lars_1k_error']}%)",
        "",
        "| config | seeds | error % | ± | gap vs baseline | SE | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in lg["rows"]:
        v = r.get("vs_reference_gap", {})
        out.append(
            f"| {r['config']} | {r.get('n', 0)} | {_fmt(r.get('mean'))} | {_fmt(r.get('half_spread'))} | "
            f"{_fmt(v.get('gap'), '+.2f')} | {_fmt(v.get('se'))} | {v.get('verdict', '')} |"
        )
    return out


def plots(res: dict, records: dict, out) -> list[str]:
    """Write the plots that the available results allow; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    noise = (res.get("steps") or res.get("fixed") or {}).get("b_noise", {})

    def mark_noise(ax):
        for phase, ls in (("early", ":"), ("at_target", "-"), ("late", "--")):
            if noise.get(phase):
                ax.axvline(noise[phase], color="k", ls=ls, lw=0.8,
                           label=f"B_noise ({phase.replace('_', ' ')})")

    sp, fx = res.get("steps"), res.get("fixed")
    drawn = [
        ("steps_to_target.png", (7, 5), _plot_steps, sp if sp and sp["curves"] else None),
        ("error_vs_batch.png", (7, 4.5), _plot_error_vs_batch, (fx, sp) if fx or sp else None),
        ("curves.png", (12, 4.5), _plot_curves, (fx, records) if fx else None),
    ]
    written = []
    for name, size, draw, data in drawn:
        if data is None:
            continue
        fig = plt.figure(figsize=size)
        draw(fig, data, mark_noise)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        written.append(name)
    return written


def _plot_steps(fig, sp: dict, mark_noise) -> None:
    """Steps to the target error vs batch, log-log, per recipe; open triangles: the cap, not reached."""
    ax = fig.add_subplot()
    base_pts = [p for p in sp["curves"].get("sgd", []) if p["reached"]]
    for recipe, pts in sp["curves"].items():
        ok = [p for p in pts if p["reached"]]
        line = ax.plot([p["batch"] for p in ok], [p["steps"] for p in ok], "o-", label=D.LABELS[recipe])
        miss = [p for p in pts if not p["reached"]]
        ax.plot([p["batch"] for p in miss], [p["cap"] for p in miss], "^", mfc="none",
                color=line[0].get_color())
    if base_pts:
        b0 = min(base_pts, key=lambda p: p["batch"])
        xs = sorted({p["batch"] for c in sp["curves"].values() for p in c})
        ax.plot(xs, [b0["steps"] * b0["batch"] / b for b in xs], color="0.5", ls="-.",
                label="perfect scaling")
        bn = sp.get("b_noise", {}).get("at_target")
        if bn:  # McCandlish et al.: S(B) = S_min (1 + B_noise / B), through the smallest batch's point
            s_min = b0["steps"] / (1 + bn / b0["batch"])
            dense = [xs[0] * (xs[-1] / xs[0]) ** (k / 63) for k in range(64)]  # smooth on the log axis
            ax.plot(dense, [s_min * (1 + bn / b) for b in dense], color="tab:purple", ls=":",
                    label="S_min (1 + B_noise/B), B_noise at the target")
    mark_noise(ax)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("global batch (images)")
    ax.set_ylabel(f"optimizer steps to {sp['target_error']}% test error")
    ax.set_title("Steps to target (open triangles: not reached by the step cap)")
    ax.legend(fontsize=7)


def _plot_error_vs_batch(fig, data, mark_noise) -> None:
    """Error at the fixed budget vs batch per recipe, the baseline and its 1-point band."""
    fx, sp = data
    ax = fig.add_subplot()
    base = fx["rows"][0] if fx and "mean" in fx["rows"][0] else None
    if base:
        ax.axhline(base["mean"], color="gray", ls="--", label="baseline")
        ax.axhspan(base["mean"], base["mean"] + 1.0, color="gray", alpha=0.15, label="within 1 point")
    for recipe, lb in (sp or {}).get("largest_within", {}).items():
        errs = {int(b): e for b, e in lb["errors"].items()}  # keys are strings once read from JSON
        xs = sorted(errs)
        ax.plot(xs, [errs[b] for b in xs], "o-", label=D.LABELS[recipe])
    if fx and not (sp or {}).get("largest_within"):
        for recipe in {r["recipe"] for r in fx["rows"][1:]}:
            rows = [r for r in fx["rows"] if r["recipe"] == recipe and "mean" in r]
            ax.errorbar([r["batch"] for r in rows], [r["mean"] for r in rows],
                        yerr=[r["half_spread"] for r in rows], marker="o", capsize=3, label=D.LABELS[recipe])
    mark_noise(ax)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("global batch (images)")
    ax.set_ylabel("test top-1 error (%) at the fixed epoch budget")
    ax.legend(fontsize=7)


def _plot_curves(fig, data, mark_noise) -> None:
    """Test error vs epoch of the baseline and the largest batch; the baseline's B_noise vs epoch."""
    fx, records = data
    axes = fig.subplots(1, 2)
    for row in fx["rows"]:
        rec = records.get(row["runs"][0]) if row["runs"] else None
        if rec and (row["batch"] in (D.Design.base_batch, max(r["batch"] for r in fx["rows"]))):
            axes[0].plot([e["epoch"] for e in rec["evals"]], [e["error"] for e in rec["evals"]],
                         label=f"{D.LABELS.get(row['recipe'], row['recipe'])} ({row['batch']})")
        if rec and rec.get("noise") and row["recipe"] == "baseline":
            axes[1].plot([p["epoch"] for p in rec["noise"]], [p["b_noise"] for p in rec["noise"]],
                         label="baseline")
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("test top-1 error (%)")
    shown = [y for line in axes[0].get_lines() for y in line.get_ydata()]
    if shown:  # zoom on the converged part: up to 30% error, or just above the best if worse
        axes[0].set_ylim(max(0.0, min(shown) - 1.0), max(30.0, min(shown) + 5.0))
    if axes[0].get_lines():
        axes[0].legend(fontsize=6)
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("B_noise (images, EMA)")
    axes[1].set_yscale("log")
