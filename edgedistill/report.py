"""The run report: report.json (machine-readable), report.md and report.html (with plots)."""

from __future__ import annotations

import base64
import collections
import dataclasses
import datetime as dt
import html
import io
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from . import report_search
from .artifacts import write_atomic
from .host import environment
from .report_training import training_lines, training_warnings


def value_at(row: dict, path: str):
    """The value at a dotted ``path`` of a model row (``latency.p50_ms``), or None."""
    for key in path.split("."):
        row = row.get(key) if isinstance(row, dict) else None
    return row


def _measured(rows: dict, path: str):
    """The number at ``model.key...`` of the report rows, or None where this run has none."""
    model, _, keys = path.partition(".")
    node = value_at(rows.get(model) or {}, keys)
    return node if isinstance(node, (int, float)) and not isinstance(node, bool) else None


def judge_targets(targets, models: list[dict]) -> list[dict]:
    """The recipe's ``report.targets`` judged on the report rows. A target whose value or
    denominator this run did not measure (a model not run, a value missing, a zero
    denominator) is left out rather than marked missed."""
    rows = {m["name"]: m for m in models}
    out = []
    for t in targets:
        value = _measured(rows, t.value)
        if t.per is not None:
            per = _measured(rows, t.per)
            value = value / per if value is not None and per else None
        if value is None:
            continue
        met = value >= t.at_least if t.at_least is not None else value <= t.at_most
        out.append({"target": t.label, "measured": round(value, 4), "goal": t.goal, "met": met})
    return out


def build_report(recipe, models: list[dict], records: dict, view) -> dict:
    """The report of a run: a row per model (its evaluation and benchmark records), the
    recipe's targets judged, training and quantization records, and ``view`` (the task's
    :class:`~edgedistill.tasks.base.ReportView`), kept so the report is drawn from this dict."""
    evaluation = records.get("evaluate", {}).get("models", {})
    bench = records.get("bench", {}).get("models", {})
    rows = []
    for m in models:
        row = {k: str(v) if k == "path" else v for k, v in m.items()}
        metrics = dict(evaluation.get(m["name"], {}))
        metrics.pop("predictions", None)
        row["generated_text"] = metrics.pop("generations", [])
        row["metrics"] = metrics
        row.update(bench.get(m["name"], {}))
        rows.append(row)
    training = {stage: {k: v for k, v in records.get(stage, {}).items() if k != "log_history"}
                for stage in ("teacher", "distill")}
    return {
        "name": recipe.name,
        "task": recipe.task,
        "view": dataclasses.asdict(view),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "models": rows,
        "targets": judge_targets(recipe.report.targets, rows),
        "training": training,
        "warnings": training_warnings(training),
        "export_validation": records.get("export", {}),
        "quantization": records.get("quantize", {}),
        "search": records.get("search"),  # None: the run chose no student by search
        "test_rows": records.get("evaluate", {}).get("test_rows"),
        "test_tokens": records.get("evaluate", {}).get("test_tokens"),
        "dropped_rows": records.get("evaluate", {}).get("dropped_rows") or {},
        # the processes each training stage ran on (a launched run: several)
        "environment": {**environment(), "training_processes": {
            stage: record["processes"] for stage, record in training.items()
            if "processes" in record}},
        "recipe": recipe.to_dict(),
    }


# ------------------------------------------------------------------------------ writing

def fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _headers(report: dict) -> list[str]:
    columns = [c["header"] for c in report["view"]["columns"]]
    return ["model", "backend", "precision", *columns, "peak RSS MB", "size MB"]


def _table_rows(report: dict) -> list[list[str]]:
    columns = report["view"]["columns"]
    return [[m["name"], m["backend"], m["precision"],
             *(fmt(value_at(m, c["path"]), c["digits"]) for c in columns),
             fmt(m.get("peak_rss_mb"), 0), fmt(m.get("size_mb"), 1)]
            for m in report["models"]]


def _setting_line(report: dict) -> str:
    """What was measured, in one sentence above the table."""
    view = report["view"]
    bench = next((m for m in report["models"] if m.get(view["timing"])), {})
    fields = collections.defaultdict(lambda: None, {**bench, **report})
    line = view["setting"].format_map(fields)
    if report.get("dropped_rows"):  # data.drop_empty: say what the numbers leave out
        line += (" Left out for an empty text or label cell: " + ", ".join(
            f"{n} rows of split '{split}'" for split, n in report["dropped_rows"].items()) + ".")
    return line


def _budget_lines(report: dict) -> list[str]:
    """How the profile was imitated on this host, and which models did not fit its budget."""
    measured = next((m for m in report["models"] if m.get("constraints")), None)
    if measured is None:
        return []
    c = measured["constraints"]
    lines = [f"profile `{measured.get('profile')}` stands for {c['target']}; measured on "
             f"{c['host_cores']} host cores with {c['threads']} threads"
             + (f", pinned to cores {c['pinned_cores']}" if c["pinned_cores"] else "")
             + (f", memory budget {c['memory_budget_mb']} MB" if c["memory_budget_mb"] else "")]
    if c.get("note"):
        lines.append(c["note"])
    mobile = report.get("quantization", {}).get("mobile")
    if mobile:
        u = mobile["usability"]
        lines.append(f"phone artifact: quantize/student-int8-mobile/{mobile['ort_file']} "
                     f"({mobile['size_mb']:.1f} MB, ORT format); a reduced onnxruntime build "
                     f"needs {mobile['operator_types']} operator types "
                     f"({mobile['required_operators']}); onnxruntime's mobile check: NNAPI "
                     f"{u['NNAPI']}, CoreML NeuralNetwork {u['CoreML NeuralNetwork']}, CoreML "
                     f"MLProgram {u['CoreML MLProgram']}, dynamic inputs "
                     f"{', '.join(u['dynamic_inputs']) or 'none'}; XNNPACK {u['XNNPACK']}")
    lines += [f"{m['name']}: {m['over_budget']}" for m in report["models"] if m.get("over_budget")]
    return lines + _runtime_lines(report) + _roofline_lines(report)


def _runtime_lines(report: dict) -> list[str]:
    """Which runtime ran the int8 student fastest on this host, where it shipped on several:
    at the fixed benchmark shape and, where measured, at the test texts' own lengths (the two
    can disagree: OpenVINO's CPU plugin pays for every new input shape)."""
    timing = report["view"]["timing"]
    rows = [m for m in report["models"] if m.get("role") == "student" and m["precision"] == "int8"]
    lines = []
    for key, what in ((timing, "p50"), ("latency_real_lengths", "real-length p50")):
        timed = sorted((m for m in rows if (m.get(key) or {}).get("p50_ms")),
                       key=lambda m: m[key]["p50_ms"])
        if len({m["backend"] for m in timed}) < 2:
            continue
        fastest = timed[0]
        times = ", ".join(f"{m['backend']} {m[key]['p50_ms']:.2f} ms" + (
            f" (computes in {m['inference_precision']})" if m.get("inference_precision") else "")
            for m in timed)
        ratios = ", ".join(f"{fastest[key]['p50_ms'] / m[key]['p50_ms']:.2f}x {m['backend']}'s"
                           for m in timed[1:])
        lines.append(f"int8 student {what} by runtime on this host: {times}; the fastest here "
                     f"is {fastest['backend']} ({fastest['name']}), at {ratios} {what}")
    return lines


def _roofline_lines(report: dict) -> list[str]:
    """Each ONNX model's measured latency against the roofline of this host and, labelled an
    estimate, its projection onto the profile's target device."""
    rows = [m for m in report["models"] if m.get("roofline")]
    if not rows:
        return []
    what = report["view"]["roofline_measure"]
    lines = [f"roofline (bench.roofline; operations and weight bytes from each ONNX graph, "
             f"activations assumed cached): measured {what} against this host's measured "
             f"peaks ({rows[0]['roofline']['host']['peaks_source']})"]
    for m in rows:
        r = m["roofline"]
        line = (f"{m['name']}: {r['flops'] / 1e9:.2f} GFLOP, {r['bytes'] / 1e6:.1f} MB read; "
                f"host bound {r['host']['bound_ms']:.2f} ms ({r['host']['limited_by']}-bound, "
                f"{r['host']['compute']}), measured {r['measured_ms']:.2f} ms = "
                f"{100 * r['host_efficiency']:.0f}% of the host's roofline")
        if r["target"]["peaks_source"] != r["host"]["peaks_source"]:
            line += (f"; ESTIMATE on the target: bound {r['target']['bound_ms']:.2f} ms "
                     f"({r['target']['limited_by']}-bound), {r['estimated_target_ms']:.1f} ms "
                     "at the host's efficiency")
        lines.append(line)
    target = rows[0]["roofline"]["target"]
    if target["peaks_source"] != rows[0]["roofline"]["host"]["peaks_source"]:
        lines.append(f"target peaks: {target['peaks_source']}")
    return lines


TUNING_HEADERS = ("trial", "setting", "kept fp32", "metric", "relative loss", "agreement",
                  "KL", "p50 ms (indicative)", "passed")


def _tuning(report: dict) -> tuple[str, list[list[str]]] | None:
    """Accuracy-aware tuning's verdict and one row per trial, or None without tuning."""
    tuning = report.get("quantization", {}).get("tuning")
    if not tuning:
        return None
    base = tuning["baseline"]
    if tuning["passed"]:
        verdict = (f"student-int8 is trial {tuning['chosen']}: {tuning['metric']} within "
                   f"{tuning['tolerable_loss']:.1%} of fp32 ({base['metric']:.4f}) on "
                   f"{tuning['texts']} validation texts")
    else:
        verdict = (f"NO setting kept {tuning['metric']} within {tuning['tolerable_loss']:.1%} "
                   f"of fp32 ({base['metric']:.4f}) in {len(tuning['trials'])} trials: "
                   "student-int8 is the untuned default and does not meet the tolerance")
    rows = [[str(t["index"]), t["setting"], str(len(t["kept_fp32"])), f"{t['metric']:.4f}",
             f"{t['relative_loss']:.2%}", f"{t['agreement']:.3f}", f"{t['kl']:.2e}",
             f"{t['p50_ms']:.2f}", "yes" if t["passed"] else "no"] for t in tuning["trials"]]
    return verdict, rows


def _generation_lines(report: dict) -> list[tuple[int, str]]:
    """(depth, text): each prompt, then every model's greedy continuation of it."""
    models = [m for m in report["models"] if m.get("generated_text")]
    lines = []
    for i, sample in enumerate(models[0]["generated_text"] if models else []):
        lines.append((0, f"prompt {i + 1}: {sample['prompt']!r}"))
        lines += [(1, f"{m['name']}: {m['generated_text'][i]['continuation']!r}")
                  for m in models]
    return lines


def _processes_text(env: dict) -> str:
    """'; distilled on 2 processes (gloo: cpu)' for a launched run, else nothing."""
    world = env.get("training_processes", {}).get("distill", {})
    if world.get("world_size", 1) <= 1:
        return ""
    devices = ", ".join(sorted(set(world["devices"])))
    return f"; distilled on {world['world_size']} processes ({world['backend']}: {devices})"


def _md_table(headers, rows) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
            *("| " + " | ".join(r) + " |" for r in rows)]


def _html_table(headers, rows) -> str:
    e = html.escape
    return ("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in headers) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows)
            + "</table>")


def to_markdown(report: dict) -> str:
    env = report["environment"]
    headers = _headers(report)
    lines = [f"# edgedistill report: {report['name']}", "",
             f"{report['created']} on {env['cpu']} ({env['cpu_count']} cores, {env['int8_isa']})"
             + _processes_text(env), "", _setting_line(report), "",
             *_md_table(headers, _table_rows(report))]
    if report.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in report["warnings"]]
    lines += ["", "## Targets", "", "| target | measured | goal | met |", "|---|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {t['goal']} | {'yes' if t['met'] else 'NO'} |"
              for t in report["targets"]]
    if _budget_lines(report):
        lines += ["", "## Profile", ""] + [f"- {line}" for line in _budget_lines(report)]
    if _tuning(report):
        verdict, rows = _tuning(report)
        lines += ["", "## Quantization tuning", "", verdict, "", *_md_table(TUNING_HEADERS, rows)]
    if report.get("search"):
        found = report["search"]
        lines += ["", "## Student search", "", report_search.verdict(found), "",
                  *_md_table(report_search.HEADERS, report_search.rows(found))]
    lines += ["", "## Training", ""] + [f"- {line}" for line in training_lines(report)]
    if _generation_lines(report):
        lines += ["", "## Generations", ""] + [f"{'  ' * depth}- {text}"
                                              for depth, text in _generation_lines(report)]
    lines += ["", "## Environment", "", "```json", json.dumps(env, indent=2), "```", ""]
    return "\n".join(lines)


def _plots(report: dict) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    view = report["view"]
    timing, better = view["timing"], "higher" if view["higher_is_better"] else "lower"
    models = [m for m in report["models"]
              if value_at(m, f"{timing}.p50_ms") and value_at(m, view["quality"])]
    pngs = {}
    if models:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        # A legend, not text labels: an ONNX model often sits on top of its PyTorch twin.
        markers = {"pytorch": "o", "onnxruntime": "s"}
        for m in models:
            x, y = value_at(m, f"{timing}.p50_ms"), value_at(m, view["quality"])
            filled = m["precision"] == "fp32"
            color = "tab:orange" if m["role"] == "teacher" else "tab:blue"
            marker = "D" if m["precision"] == "int4" else markers.get(m["backend"], "^")
            ax.scatter(x, y, s=70, marker=marker, label=m["name"],
                       color=color if filled else "white", edgecolors=color, linewidths=2)
        ax.legend(fontsize=8, loc="lower right" if view["higher_is_better"] else "upper right")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(ScalarFormatter())
        ax.set_xlabel(f"p50 {view['speed_label']} (log scale, lower is better)")
        ax.set_ylabel(f"{view['quality_label']} ({better} is better)")
        ax.set_title("Quality against latency")
        ax.grid(alpha=0.3)
        pngs["quality_vs_latency.png"] = _png(fig)
    timed = [m for m in report["models"] if value_at(m, f"{timing}.percentiles_ms")]
    if timed:
        # every model's whole latency distribution (as a cumulative curve): a p50 hides a long
        # tail or two modes, which a device's users would feel
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        fraction = [i / 100 for i in range(101)]
        for m in timed:
            ms = m[timing]["percentiles_ms"]
            style = {"int8": "--", "int4": ":"}.get(m["precision"],
                                                   "-" if m["backend"] == "pytorch" else "-.")
            ax.plot(ms, fraction, drawstyle="steps-post", lw=2, label=m["name"], ls=style,
                    color="tab:orange" if m["role"] == "teacher" else "tab:blue")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel(f"{view['speed_label']} (log scale)")
        ax.set_ylabel("fraction of runs at most this slow")
        ax.set_title(f"Latency distribution, profile {timed[0].get('profile')}")
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(alpha=0.3)
        pngs["latency_distribution.png"] = _png(fig)
    sized = [m for m in report["models"] if m.get("size_mb")]
    if sized:
        # size on disk beside peak memory: what a device must store and what it must hold
        fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.2), sharey=True)
        names = [m["name"] for m in sized]
        colors = ["tab:orange" if m["role"] == "teacher" else "tab:blue" for m in sized]
        for ax, key, label in ((axes[0], "size_mb", "size on disk, MB"),
                               (axes[1], "peak_rss_mb", "peak memory (RSS), MB")):
            values = [m.get(key) or 0 for m in sized]
            ax.barh(names, values, color=colors)
            ax.set_xlabel(label)
            ax.margins(x=0.18)  # room for the value labels right of the longest bar
            for i, (m, v) in enumerate(zip(sized, values)):
                text = f" {v:.1f}" if m.get(key) else " over budget" if m.get("over_budget") else ""
                ax.text(v, i, text, va="center", fontsize=9)
        axes[0].invert_yaxis()
        axes[0].set_title("Model size")
        axes[1].set_title("Peak memory while running")
        pngs["size.png"] = _png(fig)
    if report.get("search"):
        pngs["search.png"] = _png(report_search.plot(report["search"], plt))
    return pngs


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def to_html(report: dict, pngs: dict[str, bytes]) -> str:
    e = html.escape  # every string from a recipe, a model or the host is escaped
    targets = "".join(
        f"<tr class='{'ok' if t['met'] else 'miss'}'><td>{e(t['target'])}</td>"
        f"<td>{e(str(t['measured']))}</td><td>{e(t['goal'])}</td>"
        f"<td>{'met' if t['met'] else 'missed'}</td></tr>" for t in report["targets"])
    images = "".join(
        f"<img alt='{e(name)}' src='data:image/png;base64,{base64.b64encode(data).decode()}'>"
        for name, data in pngs.items())
    env = e(json.dumps(report["environment"], indent=2))
    host = report["environment"]
    training = "".join(f"<li>{e(line)}</li>" for line in training_lines(report))
    profile = "".join(f"<li>{e(line)}</li>" for line in _budget_lines(report))
    warnings = "".join(f"<li>{e(w)}</li>" for w in report.get("warnings", []))
    warnings = f"<h2>Warnings</h2><ul>{warnings}</ul>" if warnings else ""
    generations = "".join(f"<li style='margin-left:{2 * depth}em'>{e(text)}</li>"
                          for depth, text in _generation_lines(report))
    generations = f"<h2>Generations</h2><ul>{generations}</ul>" if generations else ""
    tuning = ""
    if _tuning(report):
        verdict, rows = _tuning(report)
        tuning = (f"<h2>Quantization tuning</h2><p>{e(verdict)}</p>"
                  + _html_table(TUNING_HEADERS, rows))
    search = ""
    if report.get("search"):
        found = report["search"]
        search = (f"<h2>Student search</h2><p>{e(report_search.verdict(found))}</p>"
                  + _html_table(report_search.HEADERS, report_search.rows(found)))
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>edgedistill report: {e(report['name'])}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:70em;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:.3em .6em;
text-align:right}}td:first-child,th:first-child{{text-align:left}}tr.ok td{{background:#eaf7ea}}
tr.miss td{{background:#fbeaea}}img{{max-width:48%;margin:.5em}}pre{{background:#f5f5f5;
padding:1em}}</style></head><body>
<h1>edgedistill report: {e(report['name'])}</h1>
<p>{e(report['created'])} &middot; {e(host['cpu'] + _processes_text(host))}</p>
<p>{e(_setting_line(report))}</p>
{_html_table(_headers(report), _table_rows(report))}
{warnings}
<h2>Targets</h2><table><tr><th>target</th><th>measured</th><th>goal</th><th></th></tr>
{targets}</table>
<h2>Profile</h2><ul>{profile}</ul>
{tuning}
{search}
<h2>Training</h2><ul>{training}</ul>
{generations}
<div>{images}</div>
<h2>Environment</h2><pre>{env}</pre></body></html>"""


def write_report(report: dict, out: str | Path, plots: bool = True) -> Path:
    out = Path(out)
    pngs = _plots(report) if plots else {}
    for name, data in pngs.items():
        (out / "plots").mkdir(exist_ok=True)
        write_atomic(out / "plots" / name, data)
    write_atomic(out / "report.md", to_markdown(report))
    write_atomic(out / "report.html", to_html(report, pngs))
    write_atomic(out / "report.json", json.dumps(report, indent=2, default=str))
    return out / "report.json"


def summary(report: dict) -> dict:
    """The printed summary as data, for scripts (``edgedistill run --json``): each model's
    precision, the task's summary columns (by header) and size; the targets and warnings."""
    paths = {c["header"]: c["path"] for c in report["view"]["columns"]}
    models = [{"model": m["name"], "precision": m["precision"],
               **{h: value_at(m, paths[h]) for h in report["view"]["summary"]},
               "size MB": m.get("size_mb")} for m in report["models"]]
    return {"name": report["name"], "task": report["task"], "models": models,
            "targets": report["targets"], "warnings": report.get("warnings", [])}


def print_summary(report: dict, console: Console | None = None) -> None:
    console = console or Console()
    # the summary's few columns (the task's choice, with model, precision and size): a full
    # row of eleven cut every cell to three letters in an 80-column terminal or log
    headers = _headers(report)
    keep = [headers.index(h) for h in ("model", "precision", *report["view"]["summary"],
                                       "size MB")]
    table = Table(title=f"edgedistill: {report['name']} (all columns: report.md)")
    rows = _table_rows(report)
    # every name whole, so that student-int4-ort and student-int4 never both read "student-int…"
    table.add_column(headers[keep[0]], no_wrap=True,
                     min_width=max((len(r[0]) for r in rows), default=0))
    for i in keep[1:]:
        table.add_column(headers[i], justify="right")
    for r in rows:
        table.add_row(*(r[i] for i in keep))
    console.print(table)
    # soft_wrap: a long line stays one line in a log file instead of breaking at column 80
    for w in report.get("warnings", []):
        console.print(f"  [yellow]warning[/yellow]  {w}", soft_wrap=True)
    for t in report["targets"]:
        mark = "[green]met[/green]" if t["met"] else "[red]missed[/red]"
        console.print(f"  {mark}  {t['target']}: {t['measured']} (goal {t['goal']})",
                      soft_wrap=True)
