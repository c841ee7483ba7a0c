"""The run report: report.json (machine-readable), report.md and report.html (with plots)."""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .environment import environment

# Goals of the default recipe (issue #2): (name, measured-from, comparison, goal)
TARGETS = (
    ("student int8 macro-F1 / teacher macro-F1", "f1_ratio", ">=", 0.97),
    ("speed-up of student int8 over teacher PyTorch fp32 (p50)", "speedup_torch", ">=", 10.0),
    ("speed-up of student int8 over teacher ONNX fp32 (p50)", "speedup_onnx", ">=", 4.0),
    ("student int8 size / student ONNX fp32 size", "size_ratio", "<=", 0.30),
)


# Goals of the causal-LM recipe (issue #4) that one run can check
LM_TARGETS = (
    ("student int4 perplexity / student fp32 perplexity", "int4_ppl_ratio", "<=", 1.05),
    ("student int4 decode tokens/s / teacher PyTorch fp32 decode tokens/s", "decode_speedup",
     ">=", 4.0),
)


def _by_name(models: list[dict]) -> dict:
    return {m["name"]: m for m in models}


def _judge(values: dict, targets) -> list[dict]:
    out = []
    for name, key, op, goal in targets:
        if key in values:
            v = values[key]
            out.append({"target": name, "measured": round(v, 4), "goal": f"{op} {goal}",
                        "met": v >= goal if op == ">=" else v <= goal})
    return out


def check_lm_targets(models: list[dict]) -> list[dict]:
    m = _by_name(models)
    ppl = lambda n: m[n].get("metrics", {}).get("perplexity") if n in m else None  # noqa: E731
    speed = lambda n: m[n].get("decode_tokens_per_s") if n in m else None  # noqa: E731
    values = {}
    if ppl("student-int4") and ppl("student"):
        values["int4_ppl_ratio"] = ppl("student-int4") / ppl("student")
    if speed("student-int4") and speed("teacher"):
        values["decode_speedup"] = speed("student-int4") / speed("teacher")
    return _judge(values, LM_TARGETS)


def check_targets(models: list[dict]) -> list[dict]:
    m = _by_name(models)
    p50 = lambda n: m[n]["latency"]["p50_ms"] if n in m and m[n].get("latency") else None  # noqa: E731
    f1 = lambda n: m[n]["metrics"]["macro_f1"] if n in m and m[n].get("metrics") else None  # noqa: E731
    values = {}
    if f1("student-int8") is not None and f1("teacher"):
        values["f1_ratio"] = f1("student-int8") / f1("teacher")
    if p50("student-int8"):
        if p50("teacher"):
            values["speedup_torch"] = p50("teacher") / p50("student-int8")
        if p50("teacher-onnx"):
            values["speedup_onnx"] = p50("teacher-onnx") / p50("student-int8")
    if "student-int8" in m and "student-onnx" in m:
        values["size_ratio"] = m["student-int8"]["size_mb"] / m["student-onnx"]["size_mb"]
    return _judge(values, TARGETS)


def build_report(recipe, models: list[dict], records: dict) -> dict:
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
    causal = recipe.task == "causal-lm"
    return {
        "name": recipe.name,
        "task": recipe.task,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "models": rows,
        "targets": check_lm_targets(rows) if causal else check_targets(rows),
        "training": training,
        "export_validation": records.get("export", {}),
        "quantization": records.get("quantize", {}),
        "test_rows": records.get("evaluate", {}).get("test_rows"),
        "test_tokens": records.get("evaluate", {}).get("test_tokens"),
        "environment": environment(),
        "recipe": recipe.to_dict(),
    }


# ------------------------------------------------------------------------------ writing

def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _columns(report: dict) -> list[tuple[str, object]]:
    """(header, cell(model row) -> str) of the results table, by task."""
    met = lambda key, digits=3: lambda m: _fmt(m.get("metrics", {}).get(key), digits)  # noqa: E731
    lat = lambda key, field="latency": lambda m: _fmt(m.get(field, {}).get(key), 2)  # noqa: E731
    first = [("model", lambda m: m["name"]), ("backend", lambda m: m["backend"]),
             ("precision", lambda m: m["precision"])]
    memory = [("peak RSS MB", lambda m: _fmt(m.get("peak_rss_mb"), 0)),
              ("size MB", lambda m: _fmt(m.get("size_mb"), 1))]
    if report.get("task") == "causal-lm":
        return first + [("perplexity", met("perplexity", 2)),
                        ("next-token agreement", met("next_token_agreement")),
                        ("first token p50 ms", lat("p50_ms", "ttft_ms")),
                        ("ms / token p50", lat("p50_ms", "tpot_ms")),
                        ("decode tokens/s", lambda m: _fmt(m.get("decode_tokens_per_s"), 1))
                        ] + memory
    return first + [("accuracy", met("accuracy")), ("macro-F1", met("macro_f1")),
                    ("agreement", met("agreement")), ("p50 ms", lat("p50_ms")),
                    ("p99 ms", lat("p99_ms")),
                    ("p50 ms real lengths", lat("p50_ms", "latency_real_lengths"))] + memory


def _headers(report: dict) -> list[str]:
    return [h for h, _ in _columns(report)]


def _table_rows(report: dict) -> list[list[str]]:
    columns = _columns(report)
    return [[cell(m) for _, cell in columns] for m in report["models"]]


def _setting_line(report: dict) -> str:
    """What was measured, in one sentence above the table."""
    if report.get("task") == "causal-lm":
        bench = next((m for m in report["models"] if m.get("tpot_ms")), {})
        return (f"Perplexity on {report.get('test_tokens')} held-out test tokens. Generation: "
                f"prompt of {bench.get('prompt_tokens')} tokens, then {bench.get('new_tokens')} "
                f"greedy tokens with a KV cache, batch 1, {bench.get('threads')} threads, "
                f"profile `{bench.get('profile')}`; each model in its own process.")
    bench = next((m for m in report["models"] if m.get("latency")), {})
    return (f"Test split: {report.get('test_rows')} rows. Latency: batch "
            f"{bench.get('batch_size')}, sequence {bench.get('sequence_length')}, "
            f"{bench.get('threads')} threads, profile `{bench.get('profile')}`; each model in "
            "its own process.")


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
    return lines + _roofline_lines(report)


def _roofline_lines(report: dict) -> list[str]:
    """Each ONNX model's measured latency against the roofline of this host and, labelled an
    estimate, its projection onto the profile's target device."""
    rows = [m for m in report["models"] if m.get("roofline")]
    if not rows:
        return []
    what = "first token (prefill)" if report.get("task") == "causal-lm" else "p50"
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


def to_markdown(report: dict) -> str:
    env = report["environment"]
    headers = _headers(report)
    lines = [f"# edgedistill report: {report['name']}", "",
             f"{report['created']} on {env['cpu']} ({env['cpu_count']} cores, {env['int8_isa']})",
             "", _setting_line(report), "",
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in _table_rows(report)]
    lines += ["", "## Targets", "", "| target | measured | goal | met |", "|---|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {t['goal']} | {'yes' if t['met'] else 'NO'} |"
              for t in report["targets"]]
    if _budget_lines(report):
        lines += ["", "## Profile", ""] + [f"- {line}" for line in _budget_lines(report)]
    if _tuning(report):
        verdict, rows = _tuning(report)
        lines += ["", "## Quantization tuning", "", verdict, "",
                  "| " + " | ".join(TUNING_HEADERS) + " |", "|" + "---|" * len(TUNING_HEADERS)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "## Training", ""] + [f"- {line}" for line in _training_lines(report)]
    if _generation_lines(report):
        lines += ["", "## Generations", ""] + [f"{'  ' * depth}- {text}"
                                              for depth, text in _generation_lines(report)]
    lines += ["", "## Environment", "", "```json", json.dumps(env, indent=2), "```", ""]
    return "\n".join(lines)


def _validation_score(report: dict, record: dict) -> str:
    validation = record.get("validation", {})
    if report.get("task") == "causal-lm":
        return f"validation perplexity {math.exp(validation.get('loss', float('nan'))):.2f}"
    return f"validation macro-F1 {validation.get('macro_f1', 0):.3f}"


def _training_lines(report: dict) -> list[str]:
    lines = []
    teacher, distill = report["training"].get("teacher", {}), report["training"].get("distill", {})
    if teacher.get("finetuned"):
        lines.append(f"teacher fine-tuned in {teacher['train_seconds']:.0f} s, "
                     f"{_validation_score(report, teacher)}")
    if distill:
        lines.append(f"student: teacher layers {distill.get('teacher_layers')}, "
                     f"{distill.get('parameters', 0) / 1e6:.1f}M of the teacher's "
                     f"{distill.get('teacher_parameters', 0) / 1e6:.1f}M parameters, distilled "
                     f"in {distill.get('train_seconds', 0):.0f} s, "
                     f"{_validation_score(report, distill)}")
    if distill.get("transfer"):
        lines.append(_transfer_line(distill["transfer"]))
    if distill.get("qat"):
        lines.append(_qat_line(distill["qat"], report.get("quantization", {}).get("qat_check")))
    if report.get("quantization", {}).get("mode"):
        lines.append(_int8_line(report["quantization"]))
    return lines


def _int8_line(q: dict) -> str:
    """How student-int8 was made: mode, calibration, preset, and the fusions it started from."""
    how = (f"static (ranges from {q['calibration']} calibration on {q['calibration_samples']} "
           "training texts)" if q["mode"] == "static" else "dynamic (ranges measured per call)")
    line = (f"int8: {how}, preset {q['preset']}, "
            f"{'per-channel' if q['per_channel'] else 'per-tensor'} weights")
    if q.get("fused"):
        line += "; graph fused first (" + ", ".join(f"{op} {n}" for op, n in q["fused"].items())
        line += ")"
    if q.get("dynamic_operators"):
        line += f"; {', '.join(q['dynamic_operators'])} quantized dynamically (no static form)"
    if q.get("nodes_to_exclude"):
        line += f"; {len(q['nodes_to_exclude'])} nodes kept fp32"
    return line


def _qat_line(qat: dict, check: dict | None) -> str:
    line = (f"int8-aware phase: {qat['epochs']:g} epochs through fake quantization at learning "
            f"rate {qat['learning_rate']:.1e}, {_validation_score({}, qat)} as int8")
    if "kept" in qat:
        before = next(iter(qat["before"].values()))
        line += (f" against {before:.3f} before it: "
                 + ("its model is shipped" if qat["kept"] else
                    "no better, so the float phase's model is shipped"))
    if check:
        line += (f"; against the onnxruntime int8 model on {check['texts']} validation texts, "
                 f"largest logit difference {check['fake_quant_max_abs_diff']:.2g} (float model: "
                 f"{check['fp32_max_abs_diff']:.2g}), same class {check['fake_quant_agreement']:.0%}")
    return line


def _transfer_line(t: dict) -> str:
    mix = ", ".join(f"{source} {n}" for source, n in t["sources"].items())
    methods = t.get("methods")
    how = f" (augmentation: {', '.join(f'{m} {n}' for m, n in methods.items())})" if methods else ""
    gen = t.get("generations")
    if gen:
        how += (f" (teacher generations: {gen['sequences']} continuations of "
                f"{gen['prompt_tokens']}-token prompts, {gen['mean_continuation_tokens']:.0f} "
                f"tokens on average{', from the cache' if gen['cached'] else ''})")
    if t.get("paraphrase_seconds"):
        how += f"; paraphrasing {t['paraphrase_seconds']:.0f} s"
    return (f"transfer set: {t['size']} teacher-labelled rows beside {t['training_rows']} "
            f"training rows; rows by source: {mix}{how}; teacher {t['teacher_seconds']:.0f} s")


def _plots(report: dict) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    causal = report.get("task") == "causal-lm"
    speed = (lambda m: m.get("tpot_ms", {}).get("p50_ms")) if causal else (  # noqa: E731
        lambda m: m.get("latency", {}).get("p50_ms"))
    quality = "perplexity" if causal else "macro_f1"
    models = [m for m in report["models"] if speed(m) and m.get("metrics", {}).get(quality)]
    pngs = {}
    if models:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        # A legend, not text labels: an ONNX model often sits on top of its PyTorch twin.
        markers = {"pytorch": "o", "onnxruntime": "s"}
        for m in models:
            x, y = speed(m), m["metrics"][quality]
            filled = m["precision"] == "fp32"
            color = "tab:orange" if m["role"] == "teacher" else "tab:blue"
            marker = "D" if m["precision"] == "int4" else markers.get(m["backend"], "^")
            ax.scatter(x, y, s=70, marker=marker, label=m["name"],
                       color=color if filled else "white", edgecolors=color, linewidths=2)
        ax.legend(fontsize=8, loc="upper right" if causal else "lower right")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(ScalarFormatter())
        ax.set_xlabel(("p50 time per generated token, ms" if causal else "p50 latency, ms")
                      + " (log scale, lower is better)")
        ax.set_ylabel("perplexity on held-out text (lower is better)" if causal
                      else "macro-F1 on the test split")
        ax.set_title("Quality against latency")
        ax.grid(alpha=0.3)
        pngs["quality_vs_latency.png"] = _png(fig)
    timed = [m for m in report["models"] if (m.get("tpot_ms" if causal else "latency") or {})
             .get("percentiles_ms")]
    if timed:
        # every model's whole latency distribution (as a cumulative curve): a p50 hides a long
        # tail or two modes, which a device's users would feel
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        fraction = [i / 100 for i in range(101)]
        for m in timed:
            ms = m["tpot_ms" if causal else "latency"]["percentiles_ms"]
            style = {"int8": "--", "int4": ":"}.get(m["precision"],
                                                   "-" if m["backend"] == "pytorch" else "-.")
            ax.plot(ms, fraction, drawstyle="steps-post", lw=2, label=m["name"], ls=style,
                    color="tab:orange" if m["role"] == "teacher" else "tab:blue")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel(("time per generated token, ms" if causal else "latency per inference, ms")
                      + " (log scale)")
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
    head = "".join(f"<th>{e(h)}</th>" for h in _headers(report))
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>"
                   for r in _table_rows(report))
    targets = "".join(
        f"<tr class='{'ok' if t['met'] else 'miss'}'><td>{e(t['target'])}</td>"
        f"<td>{e(str(t['measured']))}</td><td>{e(t['goal'])}</td>"
        f"<td>{'met' if t['met'] else 'missed'}</td></tr>" for t in report["targets"])
    images = "".join(
        f"<img alt='{e(name)}' src='data:image/png;base64,{base64.b64encode(data).decode()}'>"
        for name, data in pngs.items())
    env = e(json.dumps(report["environment"], indent=2))
    training = "".join(f"<li>{e(line)}</li>" for line in _training_lines(report))
    profile = "".join(f"<li>{e(line)}</li>" for line in _budget_lines(report))
    generations = "".join(f"<li style='margin-left:{2 * depth}em'>{e(text)}</li>"
                          for depth, text in _generation_lines(report))
    generations = f"<h2>Generations</h2><ul>{generations}</ul>" if generations else ""
    tuning = ""
    if _tuning(report):
        verdict, rows = _tuning(report)
        tuning = (f"<h2>Quantization tuning</h2><p>{e(verdict)}</p><table><tr>"
                  + "".join(f"<th>{e(h)}</th>" for h in TUNING_HEADERS) + "</tr>"
                  + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>"
                            for r in rows) + "</table>")
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>edgedistill report: {e(report['name'])}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:70em;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:.3em .6em;
text-align:right}}td:first-child,th:first-child{{text-align:left}}tr.ok td{{background:#eaf7ea}}
tr.miss td{{background:#fbeaea}}img{{max-width:48%;margin:.5em}}pre{{background:#f5f5f5;
padding:1em}}</style></head><body>
<h1>edgedistill report: {e(report['name'])}</h1>
<p>{e(report['created'])} &middot; {e(report['environment']['cpu'])}</p>
<p>{e(_setting_line(report))}</p>
<table><tr>{head}</tr>{body}</table>
<h2>Targets</h2><table><tr><th>target</th><th>measured</th><th>goal</th><th></th></tr>
{targets}</table>
<h2>Profile</h2><ul>{profile}</ul>
{tuning}
<h2>Training</h2><ul>{training}</ul>
{generations}
<div>{images}</div>
<h2>Environment</h2><pre>{env}</pre></body></html>"""


def _write(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    tmp.replace(path)


def write_report(report: dict, out: str | Path, plots: bool = True) -> Path:
    out = Path(out)
    pngs = _plots(report) if plots else {}
    for name, data in pngs.items():
        (out / "plots").mkdir(exist_ok=True)
        _write(out / "plots" / name, data)
    _write(out / "report.md", to_markdown(report))
    _write(out / "report.html", to_html(report, pngs))
    _write(out / "report.json", json.dumps(report, indent=2, default=str))
    return out / "report.json"


def print_summary(report: dict, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"edgedistill: {report['name']}")
    for h in _headers(report):
        table.add_column(h, justify="left" if h == "model" else "right")
    for r in _table_rows(report):
        table.add_row(*r)
    console.print(table)
    for t in report["targets"]:
        mark = "[green]met[/green]" if t["met"] else "[red]missed[/red]"
        console.print(f"  {mark}  {t['target']}: {t['measured']} (goal {t['goal']})")
