"""Check an exported model with the ONNX peers: onnx.checker, onnxruntime and OpenVINO must
accept it and agree with tract (through `runtime`) on the logits of the same input.

Optional to run (needs PyPI packages):
    python3 -m venv .venv-peers && .venv-peers/bin/pip install onnx onnxruntime openvino numpy
    .venv-peers/bin/python tests/onnx_peers.py MODEL.onnx [RUNTIME_BINARY]

The input is a deterministic pseudo-random tensor of the model's shape; tract's logits come from
`runtime` via a raw-tensor dump (`RUNTIME_BINARY` defaults to target/release/runtime, then
target/debug/runtime). Prints the max |peer - tract| per peer and exits non-zero above 1e-4."""
import json, os, subprocess, sys, tempfile
import numpy as np

path = sys.argv[1]
import onnx
model = onnx.load(path)
onnx.checker.check_model(model, full_check=True)
meta = {p.key: p.value for p in model.metadata_props}
dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
c, s = dims[1], dims[2]
print(f"onnx.checker: ok (opset {model.opset_import[0].version}, input [batch, {c}, {s}, {s}], "
      f"{len(meta)} metadata keys)")

rng = np.random.default_rng(0)
x = rng.standard_normal((3, c, s, s)).astype(np.float32)

binary = sys.argv[2] if len(sys.argv) > 2 else next(
    (b for b in ("target/release/runtime", "target/debug/runtime") if os.path.exists(b)), None)
if binary is None:
    sys.exit("build the runtime first (cargo build -p runtime)")
with tempfile.TemporaryDirectory() as tmp:
    raw = os.path.join(tmp, "input.f32")
    x.tofile(raw)
    out = subprocess.run([binary, "logits", "--model", path, "--input", raw, "--batch", "3", "--json"],
                         check=True, capture_output=True, text=True).stdout
tract = np.array(json.loads(out)["logits"], dtype=np.float32).reshape(3, -1)

worst = 0.0
import onnxruntime as ort
ours = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x})[0]
d = float(np.abs(ours - tract).max()); worst = max(worst, d)
print(f"onnxruntime {ort.__version__}: max |ort - tract| = {d:.2e}")
try:
    import openvino as ov
    compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    ov_out = compiled({0: x})[compiled.output(0)]
    d = float(np.abs(ov_out - tract).max()); worst = max(worst, d)
    print(f"openvino {ov.__version__}: max |openvino - tract| = {d:.2e}")
except ImportError:
    print("openvino: not installed, skipped")
sys.exit(0 if worst <= 1e-4 else 1)
