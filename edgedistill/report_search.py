"""The report's student-search section (the search stage's record, report.json "search"): what
was chosen and why, every trial, what the search cost, and the front of validation score
against measured latency."""

from __future__ import annotations

HEADERS = ("trial", "student", "p50 ms", "temperature", "alpha_distill", "match loss", "epochs",
           "validation", "state")


def verdict(found: dict) -> str:
    """One paragraph: the budget, what was measured, what was chosen, what it cost."""
    chosen, budget = found["chosen"], f"{found['budget_ms']:g} ms p50"
    model = found.get("budget_model")
    if model:
        budget += (f" ({model['model']}: {model['model_p50_ms']:.2f} ms, timed beside the "
                   f"shapes, + {model['tolerance']:.0%})")
    if found.get("budget_mb"):
        budget += f" and {found['budget_mb']:g} MB peak memory"
    fits = sum(c["within_budget"] for c in found["candidates"])
    cost = found["seconds"]
    return (f"Budget {budget} for student-int8 on profile {found['profile']}: "
            f"{fits} of {len(found['candidates'])} shapes fit (each measured untrained, as int8, "
            f"before any training). Chosen: trial {chosen['trial']}, {chosen['name']} "
            f"({chosen['p50_ms']:.2f} ms p50), validation {found['metric']} "
            f"{chosen['value']:.4f} after its short distillation{why(found)}; then distilled "
            "in full. "
            f"Search cost: {cost['measuring']:.0f} s measuring, {cost['trials']:.0f} s of trials.")


def why(found: dict) -> str:
    """How search.selection one_se came to its pick (nothing for best: the table shows it)."""
    how = found.get("selection") or {}
    if how.get("rule") != "one_se":
        return ""
    return (f" (one_se: the slowest student of the {len(how['within'])} trials within one "
            f"bootstrap standard error of the best, trial {how['best_trial']})")


def rows(found: dict) -> list[list[str]]:
    front = set(found["pareto"])
    out = []
    for t in found["trials"]:
        mark = " (chosen)" if t["number"] == found["chosen"]["trial"] else \
            " (front)" if t["number"] in front else ""
        state = {"COMPLETE": "finished", "PRUNED": "stopped early"}.get(t["state"], t["state"])
        if "repeat_of" in t:
            state += f", repeat of {t['repeat_of']}"
        value = "" if t.get("value") is None else f"{t['value']:.4f}"
        out.append([f"{t['number']}{mark}", t["student"], f"{t['p50_ms']:.2f}",
                    f"{t['temperature']:g}", f"{t['alpha_distill']:g}", t["match_loss"],
                    str(t.get("epochs", "")), value, state])
    return out


def plot(found: dict, plt):
    """Validation score against measured p50 of every finished trial, the front joined, the
    budget line and the chosen trial marked; returns the figure."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    done = [t for t in found["trials"] if t["state"] == "COMPLETE"]
    ax.scatter([t["p50_ms"] for t in done], [t["value"] for t in done], s=40, color="tab:blue",
               alpha=0.6, label="finished trials")
    front = sorted((t for t in done if t["number"] in found["pareto"]),
                   key=lambda t: t["p50_ms"])
    ax.plot([t["p50_ms"] for t in front], [t["value"] for t in front], color="tab:blue",
            drawstyle="steps-post", lw=1.2, label="front (score vs latency)")
    chosen = next(t for t in done if t["number"] == found["chosen"]["trial"])
    ax.scatter([chosen["p50_ms"]], [chosen["value"]], s=160, marker="*", color="tab:green",
               zorder=3, label=f"chosen: {chosen['student']}")
    ax.axvline(found["budget_ms"], color="tab:red", ls="--", lw=1,
               label=f"budget {found['budget_ms']:g} ms")
    ax.set_xlabel(f"p50 latency of the int8 student, ms (profile {found['profile']})")
    better = "higher" if found["greater_is_better"] else "lower"
    ax.set_ylabel(f"validation {found['metric']} after a trial ({better} is better)")
    ax.set_title("Student search")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig
