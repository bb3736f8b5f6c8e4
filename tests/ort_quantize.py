"""The onnxruntime side of the precision table: quantize a model with onnxruntime's own
`quantize_dynamic` (its defaults: int8 weights per tensor, uint8 activations from their range at
each run) and `quantize_static` (QDQ, per-channel int8 weights, uint8 activations calibrated on
the images of CALIB_DIR), then time f32 and both int8 files under onnxruntime and, optionally,
measure the int8 files' accuracy on a folder-per-class test set. The runtime reads both files
too (tests/precision_table.sh times and scores them there).

Optional to run (needs PyPI packages):
    python3 -m venv .venv-peers && .venv-peers/bin/pip install onnx onnxruntime numpy pillow
    .venv-peers/bin/python tests/ort_quantize.py MODEL.onnx OUT_PREFIX CALIB_DIR \
        [--test TEST_DIR] [--runs N]

Writes OUT_PREFIX.dynamic.onnx and OUT_PREFIX.qdq.onnx. Prints one JSON object: file sizes,
median ms at 1 and 2 threads for each file, accuracies. Preprocessing follows the model's `vit.*`
metadata (squash resize, mean/std), as `runtime` does; the calibration images are at most
--max-images, sorted and evenly thinned."""
import argparse, json, os, time
import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                      quantize_dynamic, quantize_static)
from PIL import Image

EXTENSIONS = {"png", "jpg", "jpeg", "bmp", "gif", "webp", "tif", "tiff"}

args = argparse.ArgumentParser()
args.add_argument("model"); args.add_argument("out"); args.add_argument("calibrate")
args.add_argument("--test"); args.add_argument("--runs", type=int, default=200)
args.add_argument("--max-images", type=int, default=500)
args = args.parse_args()

meta = {p.key: p.value for p in onnx.load(args.model).metadata_props}
size, channels = int(meta["vit.image_size"]), int(meta["vit.channels"])
mean = np.array(json.loads(meta["vit.mean"]), np.float32).reshape(-1, 1, 1)
std = np.array(json.loads(meta["vit.std"]), np.float32).reshape(-1, 1, 1)


def images_under(root, limit):
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
                   if f.rsplit(".", 1)[-1].lower() in EXTENSIONS)
    if len(files) > limit:
        step = len(files) / limit
        files = [files[int(i * step)] for i in range(limit)]
    return files


def tensor(path):
    image = Image.open(path).convert("L" if channels == 1 else "RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    pixels = np.asarray(image, np.float32) / 255.0
    pixels = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
    return ((pixels - mean) / std)[None].astype(np.float32)


class Reader(CalibrationDataReader):
    def __init__(self, files):
        self.files = iter(files)

    def get_next(self):
        path = next(self.files, None)
        return None if path is None else {"pixel_values": tensor(path)}


files = {"f32": args.model, "dynamic": args.out + ".dynamic.onnx", "qdq": args.out + ".qdq.onnx"}
quantize_dynamic(args.model, files["dynamic"], weight_type=QuantType.QInt8)
quantize_static(args.model, files["qdq"], Reader(images_under(args.calibrate, args.max_images)),
                quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8)


def session(path, threads):
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def median_ms(s):
    x = {"pixel_values": np.zeros((1, channels, size, size), np.float32)}
    outputs = [s.get_outputs()[0].name]
    for _ in range(10):
        s.run(outputs, x)
    times = []
    for _ in range(args.runs):
        started = time.perf_counter(); s.run(outputs, x)
        times.append((time.perf_counter() - started) * 1e3)
    return sorted(times)[len(times) // 2]


report = {"onnxruntime": ort.__version__, "files": files,
          "bytes": {name: os.path.getsize(path) for name, path in files.items()},
          "median_ms": {f"{name} {threads}t": median_ms(session(path, threads))
                        for name, path in files.items() for threads in (1, 2)}}
if args.test:
    classes = sorted(d for d in os.listdir(args.test) if os.path.isdir(os.path.join(args.test, d)))
    labels = json.loads(meta["vit.labels"])
    report["accuracy"] = {}
    for variant in ("dynamic", "qdq"):
        s = session(files[variant], 2)
        right = total = 0
        for name in classes:
            for path in images_under(os.path.join(args.test, name), 10**9):
                logits = s.run([s.get_outputs()[0].name], {"pixel_values": tensor(path)})[0]
                right += labels[int(np.argmax(logits))] == name
                total += 1
        report["accuracy"][variant] = right / total
    report["test_images"] = total
print(json.dumps(report))
