"""Command line: ``edgedistill run|distill|export|quantize|bench|report|profiles|settings``."""

from __future__ import annotations

import argparse
import errno
import json
import sys
from pathlib import Path

from .errors import EdgeDistillError
from .recipe import default_recipe_path, packaged_recipes

DISK_ERRORS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system", errno.EACCES: "permission denied"}


def _add_recipe_args(p: argparse.ArgumentParser, nproc: bool = True) -> None:
    # the packaged recipes listed from their folder, so the help cannot fall behind it
    p.add_argument("recipe", nargs="?", help="recipe YAML or the name of a packaged recipe "
                   f"({', '.join(packaged_recipes())}; default: {default_recipe_path().stem})")
    p.add_argument("--output", "-o", help="output folder (default: the recipe's output_dir)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe setting, e.g. --set distill.temperature=4 (repeatable)")
    if nproc:
        p.add_argument("--nproc", type=int, metavar="N", help="train on N processes of this "
                       "machine (one per GPU, or CPU processes sharing the cores) through "
                       "torchrun's launcher; the stages after training run on one (see "
                       "docs/scale-out.md)")


def _add_output_modes(p: argparse.ArgumentParser, default) -> None:
    modes = p.add_mutually_exclusive_group()
    modes.add_argument("--debug", action="store_true", default=default,
                       help="show tracebacks and library logs")
    modes.add_argument("--quiet", "-q", action="store_true", default=default,
                       help="print only errors and the final summary")


def read_lines(path: str | None) -> list[str] | None:
    """The non-empty lines of a text file (calibration texts), or None without one."""
    if not path:
        return None
    return [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgedistill", description="Distil, export, quantize, evaluate and benchmark "
        "Hugging Face models for edge devices.")
    _add_output_modes(parser, False)
    # the modes are accepted after the command too (`edgedistill run r.yaml --quiet`);
    # SUPPRESS there keeps a flag given before the command
    modes = argparse.ArgumentParser(add_help=False)
    _add_output_modes(modes, argparse.SUPPRESS)
    sub = _Commands(parser.add_subparsers(dest="command", required=True), modes)

    p = sub.add_parser("run", help="run every stage of a recipe and write the report")
    _add_recipe_args(p)
    p.add_argument("--json", action="store_true", help="also print the summary (models, "
                   "targets, warnings) as JSON on stdout, for scripts; the rest goes to stderr")
    p = sub.add_parser("distill", help="run a recipe up to the distilled student")
    _add_recipe_args(p)
    p.add_argument("--cache-teacher", action="store_true", help="causal LMs: run the teacher "
                   "once and train from its stored top-k (same as distill.cache_teacher: true)")

    p = sub.add_parser("search", help="find the best student whose int8 model meets a latency "
                       "budget on a profile, then run every stage on it")
    _add_recipe_args(p, nproc=False)  # trials train in one process
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-ms", type=float, help="most p50 latency of the int8 "
                        "student on the profile, ms (search.budget_ms)")
    budget.add_argument("--budget-model", metavar="DIR", help="or: as fast as this saved model "
                        "(e.g. the int8 model you ship), timed beside the candidates "
                        "(search.budget_model)")
    p.add_argument("--budget-mb", type=float, help="most peak memory while it runs, MB "
                   "(search.budget_mb)")
    p.add_argument("--profile", help="hardware profile (bench.profile; default: the recipe's)")
    p.add_argument("--trials", type=int, help="short distillations tried (search.trials)")
    p.add_argument("--json", action="store_true", help="also print the summary as JSON on "
                   "stdout, as run does")

    p = sub.add_parser("export", help="export a saved PyTorch model to ONNX and validate it")
    p.add_argument("model_dir")
    p.add_argument("output")
    p.add_argument("--opset", type=int, help="default: the exporter's recommendation for the "
                   "architecture")
    p.add_argument("--atol", type=float, default=1e-4)

    p = sub.add_parser("quantize", help="quantize an exported ONNX model: int8 for a profile, "
                       "or 4-bit weights; or package a causal LM for onnxruntime-genai")
    p.add_argument("onnx_dir", metavar="MODEL_DIR", help="an exported ONNX folder (with "
                   "--genai: the causal LM's transformers folder)")
    p.add_argument("output")
    written = p.add_mutually_exclusive_group()  # one kind of model per call
    written.add_argument("--int4", action="store_true", help="4-bit weight-only (MatMulNBits) "
                         "instead of int8; for decoders")
    written.add_argument("--genai", action="store_true", help="an int4 onnxruntime-genai "
                         "package (its model builder; the 8-bit head shared with the "
                         "embedding) from a transformers causal LM folder")
    # their defaults are the recipe's (quantize.int4_block_size, int4_algorithm,
    # int4_accuracy_level): `edgedistill settings` lists them
    p.add_argument("--block-size", type=int, help="--int4/--genai: weights per scale")
    p.add_argument("--algorithm", help="--int4/--genai: rtn (round to nearest) or gptq "
                   "(calibrated on --calibration-texts)")
    p.add_argument("--accuracy-level", type=int, help="--int4/--genai: the 4-bit weights' "
                   "compute type: 4 (int8 activations) or 0 (float)")
    p.add_argument("--profile", default="cpu")
    p.add_argument("--preset", default="auto", help="auto, avx512_vnni, avx512, avx2, arm64")
    p.add_argument("--mode", default="dynamic", choices=["dynamic", "static"])
    p.add_argument("--calibration-texts", help="static mode, --openvino and gptq: a text "
                   "file, one training text a line")
    written.add_argument("--openvino", action="store_true", help="int8 for OpenVINO (NNCF, "
                         "calibrated on --calibration-texts) instead of onnxruntime; computes "
                         "in the profile's openvino_precision")
    p.add_argument("--calibration", default="percentile",
                   choices=["minmax", "entropy", "percentile"])
    p.add_argument("--no-fuse", dest="fuse", action="store_false", default=None,
                   help="quantize the graph as exported, without onnxruntime's transformer fusions")

    p = sub.add_parser("bench", help="benchmark saved models, each in its own process")
    p.add_argument("models", nargs="+", help="model folders (PyTorch or ONNX)")
    p.add_argument("--profile", default="cpu")
    p.add_argument("--rounds", type=int, default=3, help="turns each model takes, interleaved")
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--sequence-length", type=int, help="default: the profile's input shape")
    p.add_argument("--batch-size", type=int, help="default: the profile's input shape")
    p.add_argument("--json", help="also write the results to this file")

    p = sub.add_parser("report", help="rewrite report.md, report.html and the model cards from a "
                       "run's report.json")
    p.add_argument("run_dir")

    p = sub.add_parser("push", help="upload a run's model with its model card to the "
                       "Hugging Face Hub (needs a token: huggingface-cli login)")
    p.add_argument("run_dir")
    p.add_argument("--repo-id", required=True, help="e.g. your-name/drug-reviews-student-int8")
    p.add_argument("--model", default="student-int8", help="which of the run's ONNX models")
    p.add_argument("--private", action="store_true", help="create the repository as private")

    sub.add_parser("profiles", help="list the hardware profiles")
    sub.add_parser("settings", help="list every recipe setting with its default and help")
    return parser


class _Commands:
    """add_parser that gives every command the output-mode flags."""

    def __init__(self, subparsers, modes: argparse.ArgumentParser):
        self.subparsers, self.modes = subparsers, modes

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        return self.subparsers.add_parser(name, parents=[self.modes], **kwargs)


def _without_nproc(argv: list[str]) -> list[str]:
    """The command line a launched process runs: this one without ``--nproc N``."""
    out, skip = [], False
    for item in argv:
        if skip or item.startswith("--nproc="):
            skip = False
            continue
        skip = item == "--nproc"
        if not skip:
            out.append(item)
    return out


def _dispatch(args, argv: list[str]) -> int:
    from rich.console import Console

    console = Console()
    if args.command in ("run", "distill") and args.nproc is not None:
        from .distributed import launch

        return launch(args.nproc, _without_nproc(argv))
    if args.command in ("run", "distill", "search"):
        from .pipeline import run
        from .report import print_summary, summary

        if getattr(args, "cache_teacher", False):
            args.overrides.append("distill.cache_teacher=true")
        if args.command == "search":  # the flags are recipe settings
            # the budget flag given replaces a budget of either kind in the recipe
            # (a folder's name as a quoted YAML string: "2024" or "yes" stays a name)
            given = lambda v: "null" if v is None else json.dumps(v)  # noqa: E731
            flags = {"search.budget_ms": given(args.budget_ms),
                     "search.budget_model": given(args.budget_model),
                     "search.budget_mb": args.budget_mb,
                     "bench.profile": args.profile, "search.trials": args.trials}
            args.overrides += [f"{k}={v}" for k, v in flags.items() if v is not None]
        report = run(args.recipe, args.output, args.overrides,
                     until="distill" if args.command == "distill" else None)
        if report is not None:  # on stderr, even with --quiet: it is what a run is for
            print_summary(report, Console(stderr=True))
        if report is not None and getattr(args, "json", False):
            print(json.dumps(summary(report), indent=2))
        elif report is not None and not args.quiet:
            out = Path(args.output or report["recipe"]["output_dir"])
            console.print(f"report: {out / 'report.html'}")
    elif args.command == "export":
        from .export import export_onnx

        record = export_onnx(args.model_dir, args.output, args.opset, args.atol)
        console.print(f"exported to {args.output}: max |ONNX - PyTorch| "
                      f"{record['max_abs_diff']:.2e} (atol {args.atol})")
    elif args.command == "quantize" and (args.int4 or args.genai):
        from .quantization import quantize_int4
        from .quantization.genai import build_genai_package
        from .recipe import recipe_from_dict

        # the recipe's quantize block reads the flags: its defaults and its limits
        flags = {"int4_block_size": args.block_size, "int4_algorithm": args.algorithm,
                 "int4_accuracy_level": args.accuracy_level}
        q = recipe_from_dict({"quantize": {k: v for k, v in flags.items() if v is not None}},
                             "edgedistill quantize").quantize
        texts = read_lines(args.calibration_texts)
        if q.int4_algorithm == "gptq" and not texts:
            raise EdgeDistillError("--algorithm gptq: it calibrates on training texts; give "
                                   "--calibration-texts FILE (one text a line) or use rtn")
        build = build_genai_package if args.genai else quantize_int4
        settings = build(args.onnx_dir, args.output, q.int4_block_size, q.int4_accuracy_level,
                         algorithm=q.int4_algorithm, calibration_texts=texts or [],
                         calibration_samples=q.calibration_samples)
        console.print(f"quantized to {args.output} with {settings}")
    elif args.command == "quantize":
        from .profiles import resolve_target
        from .quantization import quantize, quantize_openvino
        from .recipe_blocks import QuantizeConfig

        texts = read_lines(args.calibration_texts)
        if args.openvino:
            target = resolve_target(args.profile)  # a profile OpenVINO cannot target is refused
            target.runtimes_for(QuantizeConfig(runtimes=["onnxruntime", "openvino"]))
            settings = quantize_openvino(args.onnx_dir, args.output, texts,
                                         precision=target.openvino_precision)
        else:
            settings = quantize(args.onnx_dir, args.output, profile=args.profile,
                                calibration_texts=texts, preset=args.preset, mode=args.mode,
                                calibration=args.calibration, fuse=args.fuse)
        console.print(f"quantized to {args.output} with {settings}")
    elif args.command == "bench":
        from .bench.runner import BenchSettings, benchmark
        from .profiles import resolve_target

        target = resolve_target(args.profile)
        s = BenchSettings(iterations=args.iterations, rounds=args.rounds,
                          sequence_length=args.sequence_length or target.sequence_length,
                          batch_size=args.batch_size or target.batch_size)
        results = benchmark(args.models, target, settings=s)
        for r in results:
            if "over_budget" in r:
                console.print(f"{r['path']}: [red]{r['over_budget']}[/red]")
                continue
            lat = r["latency"]
            console.print(f"{r['path']}: p50 {lat['p50_ms']:.2f} ms, p99 {lat['p99_ms']:.2f} ms, "
                          f"peak RSS {r['peak_rss_mb']:.0f} MB, size {r['size_mb']:.1f} MB")
        if args.json:
            from .artifacts import write_atomic

            write_atomic(args.json, json.dumps(results, indent=2))
    elif args.command == "report":
        from .model_card import write_model_cards
        from .report import print_summary, write_report

        path = Path(args.run_dir) / "report.json"
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise EdgeDistillError(f"{path}: cannot read the run's report ({e}); run the recipe first")
        if "summary" not in report.get("view", {}):  # written before reports carried a view
            from dataclasses import asdict

            from .tasks import get_task

            report["view"] = asdict(get_task(report["task"]).report)
        write_report(report, args.run_dir, plots=report["recipe"]["report"]["plots"])
        write_model_cards(report, args.run_dir)
        print_summary(report, console)
    elif args.command == "push":
        from .model_card import push

        url = push(args.run_dir, args.repo_id, model=args.model, private=args.private)
        console.print(f"uploaded {args.model} with its model card to {url}")
    elif args.command == "profiles":
        from .profiles import list_profiles, resolve_target

        for p in list_profiles():
            t = resolve_target(p)
            budget = f", memory budget {t.memory_budget_mb} MB" if t.memory_budget_mb else ""
            pinned = f", pinned to {t.cpu_affinity} cores" if t.cpu_affinity else ""
            console.print(f"[bold]{t.name}[/bold]: {p.description}\n  target: "
                          f"{t.device or 'this host'}; threads {t.threads}{pinned}{budget}; "
                          f"{', '.join(t.providers)}")
    elif args.command == "settings":
        from .recipe import field_help

        for key, default, help_text in field_help():
            console.print(f"[bold]{key}[/bold] = {default}  [dim]{help_text}[/dim]")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    from .progress import configure

    configure("debug" if args.debug else "quiet" if args.quiet else "normal")
    try:
        return _dispatch(args, argv)
    except EdgeDistillError as e:
        if args.debug:
            raise
        print(f"edgedistill: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgedistill: interrupted; rerun the same command to continue", file=sys.stderr)
        return 130
    except OSError as e:
        if args.debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        if e.errno in DISK_ERRORS:
            print(f"edgedistill: error: {where}{DISK_ERRORS[e.errno]}; free space or choose "
                  "another --output, then rerun (finished stages are kept)", file=sys.stderr)
            return 1
        # transformers raises OSError for a model folder without weights or tokenizer files
        print(f"edgedistill: error: {where}{str(e).splitlines()[0][:300]}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug, not a user mistake: say so, keep the traceback for --debug
        if args.debug:
            raise
        first = (str(e).splitlines() or [""])[0]  # an exception may carry no message
        print(f"edgedistill: internal error: {type(e).__name__}: {first[:200]} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
