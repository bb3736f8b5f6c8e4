"""The tutorial's last chapter in one table: for each trained run, its exported model's size and
cost, its test accuracy in f32 and int8, inference at 1 thread (ours, and onnxruntime's on the
same file, in alternating rounds), and what its training cost.

    cargo build -p exporter && cargo build --release -p runtime
    python3 tests/chapter_table.py --test TEST_DATA --out WORK_DIR NAME=RUN_DIR [NAME=RUN_DIR ...]

Each run's best weights are exported (verified against burn) and quantized into WORK_DIR, then
evaluated on TEST_DATA, which no run chose anything by. `--accuracy-only` skips the timing, for
the runs on a fraction of the data (a "training data" column then says which). The timing needs a quiet machine: no training run meanwhile.
onnxruntime comes from .venv-peers (see tests/peers_bench.py); without it that column is empty.
Prints a Markdown table, and writes every figure to WORK_DIR/table.json.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPORTER = os.environ.get("EXPORTER", os.path.join(ROOT, "target/debug/exporter"))
RUNTIME = os.environ.get("RUNTIME", os.path.join(ROOT, "target/release/runtime"))


def run_json(*command):
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout)


def peers_python():
    for folder in (ROOT, os.path.dirname(ROOT)):
        python = os.path.join(folder, ".venv-peers/bin/python")
        if os.path.exists(python):
            return python
    return None


def training_cost(run_dir):
    """Wall time of the epochs (training steps, teacher included, and validation) and the median
    training speed, from the run's metrics.jsonl; the best validation accuracy from state.json."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as lines:
        epochs = [json.loads(line) for line in lines if line.strip()]
    with open(os.path.join(run_dir, "state.json")) as state:
        best = json.load(state).get("best") or {}
    with open(os.path.join(run_dir, "config.json")) as config:
        train_fraction = json.load(config).get("train_fraction", 1.0)
    return {
        "train_fraction": train_fraction,
        "epochs": len(epochs),
        "seconds": sum(epoch["epoch_seconds"] for epoch in epochs),
        "teacher_seconds": sum(epoch.get("teacher_seconds", 0.0) for epoch in epochs),
        "images_per_second": statistics.median(epoch["images_per_second"] for epoch in epochs),
        "best_epoch": best.get("epoch"),
        "val_accuracy": best.get("val_accuracy"),
    }


def measure_model(name, run_dir, test_data, work):
    f32 = os.path.join(work, f"{name}.onnx")
    int8 = os.path.join(work, f"{name}.int8.onnx")
    exported = run_json(EXPORTER, "export", "--checkpoint", run_dir, "--out", f32, "--json")
    subprocess.run([RUNTIME, "quantize", f32, "--out", int8], check=True, capture_output=True)
    accuracy = {
        precision: run_json(RUNTIME, "eval", path, "--data", test_data, "--json")["report"]["accuracy"]
        for precision, path in (("f32", f32), ("int8", int8))
    }
    return {
        "name": name,
        "run": run_dir,
        "files": {"f32": f32, "int8": int8},
        "parameters": exported["parameters"],
        "multiply_adds": exported["multiply_adds"],
        "bytes": {"f32": os.path.getsize(f32), "int8": os.path.getsize(int8)},
        "test_accuracy": accuracy,
        "training": training_cost(run_dir),
    }


def time_models(models, rounds, runs):
    """Median over `rounds` alternating rounds of each round's median per frame, 1 thread."""
    python = peers_python()
    times = {model["name"]: {"ours_f32": [], "ours_int8": [], "onnxruntime_f32": []} for model in models}
    for _ in range(rounds):
        for model in models:
            mine = times[model["name"]]
            for precision in ("f32", "int8"):
                report = run_json(RUNTIME, "bench", "--model", model["files"][precision],
                                  "--threads", "1", "--runs", str(runs), "--json")
                mine[f"ours_{precision}"].append(report["inference"]["median_ms"])
            if python:
                peers = run_json(python, os.path.join(ROOT, "tests/peers_bench.py"),
                                 model["files"]["f32"], "1", str(runs))
                mine["onnxruntime_f32"].append(peers["onnxruntime"]["median_ms"])
    for model in models:
        model["latency_ms"] = {
            kind: statistics.median(values) if values else None
            for kind, values in times[model["name"]].items()
        }


def wall_time(seconds):
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def markdown(models, timed):
    fractions = any(model["training"]["train_fraction"] < 1 for model in models)
    header = ["model"] + (["training data"] if fractions else [])
    header += ["parameters", "multiply-adds", "test f32", "test int8", "val (best epoch)",
               "file f32 / int8"]
    if timed:
        header += ["ours f32", "onnxruntime f32", "ours int8"]
    header += ["training", "images/s"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model in models:
        training = model["training"]
        cells = [model["name"]]
        if fractions:
            cells.append(f"{100 * training['train_fraction']:.0f} %")
        cells += [
            f"{model['parameters']:,}",
            f"{model['multiply_adds'] / 1e6:.1f} M",
            f"{100 * model['test_accuracy']['f32']:.2f} %",
            f"{100 * model['test_accuracy']['int8']:.2f} %",
            f"{100 * (training['val_accuracy'] or 0):.2f} % ({training['best_epoch']})",
            f"{model['bytes']['f32'] / 1e3:.0f} / {model['bytes']['int8'] / 1e3:.0f} kB",
        ]
        if timed:
            latency = model["latency_ms"]
            cells += [f"{latency[kind]:.3f} ms" if latency[kind] is not None else ""
                      for kind in ("ours_f32", "onnxruntime_f32", "ours_int8")]
        cells += [
            f"{training['epochs']} epochs, {wall_time(training['seconds'])}",
            f"{training['images_per_second']:.0f}",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def host():
    """The CPU's model name and the ISA extensions the runtime's kernels choose from."""
    name, flags, family = platform.processor() or platform.machine(), set(), {}
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() in ("cpu family", "model"):
                    family[key.strip()] = value.strip()
                elif key.strip() in ("flags", "Features"):
                    flags = set(value.split())
    except OSError:
        pass
    wanted = ["avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "asimddp", "fphp"]
    if family:
        name += f" family {family.get('cpu family')} model {family.get('model')}"
    return f"{name} ({', '.join(flag for flag in wanted if flag in flags)}), {os.cpu_count()} CPUs"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--test", required=True, help="folder-per-class test images")
    parser.add_argument("--out", required=True, help="work folder for the exported files")
    parser.add_argument("--accuracy-only", action="store_true", help="skip the timing")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=500, help="frames timed per round")
    parser.add_argument("runs_to_compare", nargs="+", metavar="NAME=RUN_DIR")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    models = []
    for pair in args.runs_to_compare:
        name, sep, run_dir = pair.partition("=")
        if not sep or not os.path.isdir(run_dir):
            sys.exit(f"{pair}: expected NAME=RUN_DIR with an existing run folder")
        models.append(measure_model(name, run_dir, args.test, args.out))
    if not args.accuracy_only:
        time_models(models, args.rounds, args.runs)
    measured = {"host": host(), "date": datetime.date.today().isoformat(), "models": models}
    with open(os.path.join(args.out, "table.json"), "w") as table:
        json.dump(measured, table, indent=2)
    print(f"{measured['host']}, {measured['date']}\n")
    print(markdown(models, not args.accuracy_only))


if __name__ == "__main__":
    main()
