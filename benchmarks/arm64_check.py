"""The phone artifacts on arm64, checked rather than assumed: the same inputs through the same
files on this x86 host and on arm64 under emulation (qemu-user), and their outputs compared.

- a classifier's ``.ort`` int8 model (``quantize/student-int8-mobile`` of a run on profile
  mobile-arm64): the logits of ``--texts`` test texts must agree within int8 tolerance, and
  give the same predicted class for every text. The tolerance is measured, not chosen: the
  int8 model's own largest logit error against its fp32 model (``--classifier-fp32``, the
  run's ``export/student``) on x86. Each side's agreement with fp32 is reported too: int8
  kernels round differently on each ISA (x86 without VNNI saturates u8 x s8 products), so
  when the two sides differ, fp32 says which is closer;
- a causal LM's onnxruntime-genai package (``quantize/student-int4``), named
  ``llm-<its folder>``: its greedy tokens after ``--prompts`` test prompts (3) must be
  identical for ``--tokens`` tokens. Two of its MatMulNBits also run alone (its first 4-bit
  one and the output head), as they are in the package, on seeded random inputs: whether the
  kernels themselves compute the same on both ISAs (a float model's tolerance, 1e-4 of the
  largest output). ``--float-compute`` also checks a copy whose MatMulNBits all run in float
  (accuracy level unset), which tells a kernel's rounding from a wrong graph when tokens
  differ; where the package's tokens part, the x86 logits of both choices at that step are
  read back (as built and in float): a gap smaller than int8 activations move the logits is a
  near-tie. ``--more-llm FOLDER`` checks another package's tokens the same way (e.g. a
  variant built by genai_package.py).

The arm64 side is Debian 12's arm64 Python 3.11 (debootstrap's first stage into
``work/arm64/root``, packages unpacked, no chroot needed) running under qemu-aarch64-static,
with onnxruntime, onnxruntime-genai and numpy installed from PyPI's aarch64 wheels at the
host's versions (``work/arm64/site``). Set up once by this script (root, for apt and the mount
namespace). onnxruntime's CPU detection (PyTorch's cpuinfo) reads /sys and /proc/cpuinfo, which
under qemu-user describe the x86 host, and crashes on them; the device side therefore runs in
its own mount namespace with an arm64 /proc/cpuinfo (a Neoverse-N1's features) and an empty
/sys/devices/system/cpu. Emulated time means nothing for a phone: no latency is measured.

    python benchmarks/arm64_check.py --classifier RUN/quantize/student-int8-mobile \\
        --llm RUN2/quantize/student-int4

Writes results/arm64_check.{json,md}; exits 1 when an artifact differs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
DEVICE = HERE / "arm64_device.py"
PACKAGES = ("python3.11-minimal", "libpython3.11-stdlib")
MIRROR = "http://deb.debian.org/debian"
CPUINFO = "".join(
    f"processor\t: {i}\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 "
    "crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\n"
    "CPU architecture: 8\nCPU variant\t: 0x3\nCPU part\t: 0xd0c\nCPU revision\t: 1\n\n"
    for i in range(2))


def sh(*command: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=True, **kwargs)


def setup(work: Path) -> Path:
    """The arm64 Python and its wheels under ``work`` (made once); returns ``work``."""
    root, site = work / "root", work / "site"
    if not shutil.which("qemu-aarch64-static") or not shutil.which("debootstrap"):
        sh("apt-get", "install", "-y", "-q", "qemu-user-static", "debootstrap",
           stdout=subprocess.DEVNULL)
    if not (root / "usr/bin/python3.11").is_file():
        shutil.rmtree(root, ignore_errors=True)
        print("debootstrap: Debian 12 arm64 with Python 3.11 ...", flush=True)
        sh("debootstrap", "--foreign", "--arch=arm64", "--variant=minbase",
           f"--include={','.join(PACKAGES)}", "bookworm", str(root), MIRROR,
           stdout=subprocess.DEVNULL)
        # the first stage downloads the included packages without unpacking them all; the
        # second would run arm64 maintainer scripts, which nothing here needs
        for deb in sorted((root / "var/cache/apt/archives").glob("*.deb")):
            sh("dpkg", "-x", str(deb), str(root))
    if not (site / "onnxruntime_genai").is_dir():
        from importlib.metadata import version

        wanted = [f"{p}=={version(p)}" for p in ("onnxruntime", "onnxruntime-genai", "numpy")]
        print(f"aarch64 wheels: {', '.join(wanted)} ...", flush=True)
        sh(sys.executable, "-m", "pip", "install", "-q", "--target", str(site),
           "--platform", "manylinux_2_28_aarch64", "--platform", "manylinux2014_aarch64",
           "--python-version", "3.11", "--implementation", "cp", "--only-binary=:all:",
           *wanted)
    (work / "cpuinfo").write_text(CPUINFO)
    (work / "empty").mkdir(exist_ok=True)
    return work


def on_arm64(work: Path, spec: Path, out: Path) -> dict:
    """The device script under qemu-aarch64 in its own mount namespace (see the docstring)."""
    script = (f"mount --bind {work / 'cpuinfo'} /proc/cpuinfo && "
              f"mount --bind {work / 'empty'} /sys/devices/system/cpu && "
              f"PYTHONPATH={work / 'site'} exec qemu-aarch64-static -L {work / 'root'} "
              f"{work / 'root/usr/bin/python3.11'} {DEVICE} {spec} {out}")
    sh("unshare", "-m", "bash", "-c", script)
    return json.loads(out.read_text())


def on_host(spec: Path, out: Path) -> dict:
    sh(sys.executable, str(DEVICE), str(spec), str(out))
    return json.loads(out.read_text())


def compare(reference: dict, other: dict, fp32: dict | None = None) -> dict:
    """Each artifact's verdict: ``other`` (arm64) against ``reference`` (x86); ``fp32``: the
    classifiers' fp32 logits on x86 (by artifact name), which set the tolerance."""
    verdicts = {}
    for name, ref in reference["results"].items():
        got = other["results"][name]
        if "logits" in ref:
            a, b = np.asarray(ref["logits"]), np.asarray(got["logits"])
            if a.shape != b.shape:
                verdicts[name] = {"rows": len(a), "passed": False,
                                  "error": f"shapes differ: {a.shape} and {b.shape}"}
                continue
            diff = float(np.abs(a - b).max())
            same = float(np.mean(a.argmax(-1) == b.argmax(-1)))
            verdict = {"rows": len(a), "max_logit_difference": diff, "same_prediction": same}
            if fp32 and name in fp32:
                f = np.asarray(fp32[name])
                verdict.update(
                    tolerance=float(np.abs(a - f).max()),
                    x86_same_prediction_as_fp32=float(np.mean(a.argmax(-1) == f.argmax(-1))),
                    arm64_same_prediction_as_fp32=float(np.mean(b.argmax(-1) == f.argmax(-1))),
                    x86_mean_error=float(np.abs(a - f).mean()),
                    arm64_mean_error=float(np.abs(b - f).mean()))
            else:  # no fp32 reference (a float model, one operator): summation order only
                verdict["tolerance"] = 1e-4 * float(np.abs(a).max())
            verdict["passed"] = diff <= verdict["tolerance"] and same == 1.0
            verdicts[name] = verdict
        else:
            equal = [r == g for r, g in zip(ref["tokens"], got["tokens"])]
            verdicts[name] = {"prompts": len(ref["tokens"]),
                              "tokens_per_prompt": len(ref["tokens"][0]),
                              "identical_prompts": sum(equal),
                              "passed": len(equal) == len(got["tokens"]) and all(equal)}
    return verdicts


def divergences(package: Path, float_copy: Path, prompts: list[list[int]],
                 x86: list[list[int]], arm: list[list[int]]) -> list[dict]:
    """Where the x86 and arm64 greedy tokens of ``package`` part, the x86 logits of both choices
    at that step, with the package's int8 activations and with float compute (``float_copy``),
    the earlier tokens fed one at a time as in generation. A gap between the two choices smaller
    than what int8 activations move the logits by is a near-tie that rounding on another
    instruction set can flip; a larger one points at a wrong graph or kernel."""
    from edgedistill.runtime.causal_lm import load_causal_lm

    models = {"int8": load_causal_lm(package), "float": load_causal_lm(float_copy)}
    found = []
    for index, (prompt, ours, theirs) in enumerate(zip(prompts, x86, arm)):
        step = next((k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        if step is None:
            continue
        row, logits = {"prompt": index, "step": step, "x86_token": ours[step],
                       "arm64_token": theirs[step]}, {}
        for name, model in models.items():
            last, state = model.prefill(np.array([prompt]))
            for token in ours[:step]:
                last, state = model.step(token, state)
            logits[name] = last
            second, first = np.sort(last)[-2:]
            row[name] = {"argmax": int(last.argmax()), "top2_margin": float(first - second),
                         "x86_over_arm64_choice": float(last[ours[step]] - last[theirs[step]])}
        row["int8_vs_float_max_difference"] = float(np.abs(logits["int8"] - logits["float"]).max())
        found.append(row)
    return found


def classifier_spec(folder: Path, texts: list[str], max_length: int, work: Path) -> dict:
    from transformers import AutoTokenizer

    ort_file = next(folder.glob("*.ort"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length,
                        return_tensors="np")
    inputs = work / "classifier_inputs.npz"
    np.savez(inputs, **{k: v.astype(np.int64) for k, v in encoded.items()})
    return {"kind": "classifier", "model": str(ort_file), "inputs": str(inputs)}


def generator_spec(folder: Path, texts: list[str], new_tokens: int, prompts: int = 3) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:16] for t in texts[:prompts]]
    return {"kind": "generator", "model": str(folder), "prompts": ids,
            "new_tokens": new_tokens}


OPERATOR = "op-"  # how the artifacts of one cut-out operator are named


def operator_specs(package: Path, work: Path, rows: int = 4) -> dict:
    """The package's first 4-bit MatMulNBits and its output head (the last MatMulNBits), each
    alone in a graph of its own with its weights and attributes, and seeded random inputs."""
    import onnx
    from onnx import TensorProto, helper

    from edgedistill.artifacts import onnx_file
    from edgedistill.quantization.int4 import matmul_bits

    model = onnx.load(str(onnx_file(package)))
    weights = {t.name: t for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    chosen = {f"{OPERATOR}matmulnbits-4bit": next(n for n in nodes if matmul_bits(n) == 4),
              f"{OPERATOR}matmulnbits-head-{matmul_bits(nodes[-1])}bit": nodes[-1]}
    rng, specs = np.random.default_rng(0), {}
    for name, node in chosen.items():
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        alone = helper.make_node("MatMulNBits", ["A", *node.input[1:]], ["Y"],
                                 domain="com.microsoft", **attrs)
        graph = helper.make_graph(
            [alone], name,
            [helper.make_tensor_value_info("A", TensorProto.FLOAT, [rows, attrs["K"]])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [rows, attrs["N"]])],
            [weights[i] for i in node.input[1:] if i])
        op_model = helper.make_model(graph, opset_imports=list(model.opset_import))
        op_model.ir_version = model.ir_version
        onnx.save(op_model, str(work / f"{name}.onnx"))
        np.savez(work / f"{name}.npz",
                 A=(rng.standard_normal((rows, attrs["K"])) * 2).astype(np.float32))
        specs[name] = {"kind": "classifier", "model": str(work / f"{name}.onnx"),
                       "inputs": str(work / f"{name}.npz")}
    return specs


def divergence_lines(found: list[dict]) -> list[str]:
    lines = ["", "Where the int4 package's tokens part (x86 logits at that step, earlier tokens "
             "as on x86; computed on this host after the emulated run):", "",
             "| prompt | step | x86 / arm64 token | int8: x86's choice over arm64's, top-2 margin "
             "| float compute: the same | int8 vs float, largest logit difference |",
             "|---|---|---|---|---|---|"]
    for d in found:
        i, f = d["int8"], d["float"]
        lines.append(f"| {d['prompt']} | {d['step']} | {d['x86_token']} / {d['arm64_token']} | "
                     f"{i['x86_over_arm64_choice']:+.3f}, {i['top2_margin']:.3f} | "
                     f"{f['x86_over_arm64_choice']:+.3f}, {f['top2_margin']:.3f} "
                     f"(argmax {f['argmax']}) | {d['int8_vs_float_max_difference']:.3f} |")
    return lines


def markdown(verdicts: dict, arm: dict, host: dict, found: list[dict] | None = None) -> str:
    lines = ["# Phone artifacts on arm64 (qemu-user) against x86", "",
             f"Device side: Python on `{arm['machine']}` under qemu-aarch64-static against "
             f"`{host['machine']}` natively, same files and inputs (emulated time is not "
             "latency and none is reported).", "", "| artifact | check | result | passed |",
             "|---|---|---|---|"]
    for name, v in verdicts.items():
        if "rows" in v and "error" in v:
            lines.append(f"| {name} | logits of {v['rows']} test texts | {v['error']} | False |")
        elif "rows" in v:
            fp32 = (f"; same prediction as fp32: x86 {v['x86_same_prediction_as_fp32']:.1%}, "
                    f"arm64 {v['arm64_same_prediction_as_fp32']:.1%}; mean error against fp32: "
                    f"x86 {v['x86_mean_error']:.4f}, arm64 {v['arm64_mean_error']:.4f}"
                    if "x86_mean_error" in v else "")
            what = (f"outputs for {v['rows']} random inputs" if name.startswith(OPERATOR) else
                    f"logits of {v['rows']} test texts")
            lines.append(f"| {name} | {what} | max difference "
                         f"{v['max_logit_difference']:.4g} (tolerance {v['tolerance']:.4g}), "
                         f"same prediction {v['same_prediction']:.1%}{fp32} | {v['passed']} |")
        else:
            lines.append(f"| {name} | greedy tokens after {v['prompts']} prompts | "
                         f"{v['identical_prompts']} of {v['prompts']} identical for "
                         f"{v['tokens_per_prompt']} tokens | {v['passed']} |")
    if found:
        lines += divergence_lines(found)
    return "\n".join(lines) + "\n"


def without_operator_outputs(side: dict) -> dict:
    """A side's results for the JSON record, less the cut-out operators' raw outputs (the
    head's are 4 x vocabulary floats, megabytes; their verdicts keep the differences)."""
    return {**side, "results": {name: r for name, r in side["results"].items()
                                if not name.startswith(OPERATOR)}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classifier", type=Path, help="a folder with the .ort int8 model")
    parser.add_argument("--classifier-fp32", type=Path,
                        help="its fp32 ONNX model's folder (the run's export/student): sets the "
                             "int8 tolerance")
    parser.add_argument("--llm", type=Path, help="an onnxruntime-genai package folder")
    parser.add_argument("--more-llm", type=Path, action="append", default=[],
                        help="another package to check the same way (repeatable)")
    parser.add_argument("--float-compute", action="store_true",
                        help="also the package with MatMulNBits in float (see the docstring)")
    parser.add_argument("--texts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=3, help="test texts whose first 16 "
                        "tokens prompt the LLM")
    parser.add_argument("--work", type=Path, default=HERE / "work" / "arm64")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if not (args.classifier or args.llm):
        parser.error("give --classifier and/or --llm")
    from edgedistill.data import load_task_data
    from edgedistill.quantization.int4 import float_compute_copy
    from edgedistill.recipe import load_recipe

    work = setup(args.work.resolve())
    recipe = load_recipe()  # the drug reviews' held-out texts feed both artifacts
    texts = list(load_task_data(recipe.data, recipe.seed).test["text"])[:args.texts]
    artifacts = {}
    if args.classifier:
        artifacts["classifier-int8-ort"] = classifier_spec(args.classifier.resolve(), texts,
                                                           recipe.data.max_length, work)
    first = f"llm-{args.llm.name}" if args.llm else None
    if args.llm:
        artifacts[first] = generator_spec(args.llm.resolve(), texts, args.tokens, args.prompts)
        # its int8 kernels alone, outside the decoder
        artifacts.update(operator_specs(args.llm.resolve(), work))
    if args.llm and args.float_compute:
        copy = float_compute_copy(args.llm.resolve(), work / "float-compute")
        artifacts[f"{first}-float-compute"] = generator_spec(copy, texts, args.tokens,
                                                             args.prompts)
    for folder in args.more_llm:
        artifacts[f"llm-{folder.name}"] = generator_spec(folder.resolve(), texts, args.tokens,
                                                         args.prompts)
    spec = work / "spec.json"
    spec.write_text(json.dumps({"artifacts": artifacts}))
    host = on_host(spec, work / "x86.json")
    fp32 = None
    if args.classifier and args.classifier_fp32:  # the same inputs through the fp32 model
        reference = dict(artifacts["classifier-int8-ort"],
                         model=str(next(args.classifier_fp32.resolve().glob("*.onnx"))))
        fp32_spec = work / "fp32-spec.json"
        fp32_spec.write_text(json.dumps({"artifacts": {"classifier-int8-ort": reference}}))
        fp32 = {k: v["logits"] for k, v in
                on_host(fp32_spec, work / "fp32.json")["results"].items()}
    print("x86 done; arm64 under emulation ...", flush=True)
    arm = on_arm64(work, spec, work / "arm64.json")
    verdicts = compare(host, arm, fp32)
    found = None
    if args.llm and args.float_compute:  # where the tokens part, what x86 saw there
        llm = artifacts[first]
        found = divergences(Path(llm["model"]), copy, llm["prompts"],
                            host["results"][first]["tokens"], arm["results"][first]["tokens"])
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "arm64_check.json").write_text(json.dumps(
        {"verdicts": verdicts, "artifacts": {k: v["model"] for k, v in artifacts.items()},
         "x86": without_operator_outputs(host), "arm64": without_operator_outputs(arm),
         "divergences": found}, indent=1) + "\n")
    (args.results / "arm64_check.md").write_text(markdown(verdicts, arm, host, found))
    print(markdown(verdicts, arm, host, found))
    return 0 if all(v["passed"] for v in verdicts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
