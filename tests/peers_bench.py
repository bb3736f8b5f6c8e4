"""Time onnxruntime and OpenVINO (f32, batch 1) on an ONNX image classifier, and count its
multiply-adds, for tests/speed_table.sh.

    .venv-peers/bin/python tests/peers_bench.py MODEL.onnx THREADS RUNS

Prints one JSON object: {"macs", "onnxruntime": {"version", "median_ms"}, "openvino": {...}}.
The input is a fixed pseudo-random tensor of the model's input shape with batch 1 (the same
values for both peers); 5 warm-up runs precede the timed ones.
Set-up: python3 -m venv .venv-peers && .venv-peers/bin/pip install onnx onnxruntime openvino numpy
"""
import json
import sys
import time

import numpy as np
import onnx
from onnx import shape_inference

path, threads, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])


def multiply_adds(model):
    """Multiply-adds of the MatMul, Gemm and Conv nodes at batch 1."""
    graph = model.graph
    graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    inferred = shape_inference.infer_shapes(model, data_prop=True).graph
    shapes = {}
    for info in list(inferred.value_info) + list(inferred.input) + list(inferred.output):
        shapes[info.name] = [d.dim_value for d in info.type.tensor_type.shape.dim]
    for init in inferred.initializer:
        shapes[init.name] = list(init.dims)
    total = 0
    for node in inferred.node:
        out = shapes.get(node.output[0])
        if not out or 0 in out:
            continue
        if node.op_type in ("MatMul", "Gemm"):
            a = shapes[node.input[0]]
            trans_a = any(x.name == "transA" and x.i for x in node.attribute)
            total += int(np.prod(out)) * (a[-2] if trans_a else a[-1])
        elif node.op_type == "Conv":
            w = shapes[node.input[1]]
            total += int(np.prod(out)) * int(np.prod(w[1:]))
    return total


def median_ms(run):
    for _ in range(5):
        run()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


model = onnx.load(path)
dims = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
dims[0] = 1
x = np.random.default_rng(0).standard_normal(dims).astype(np.float32)
report = {"macs": multiply_adds(onnx.load(path))}

import onnxruntime as ort

options = ort.SessionOptions()
options.intra_op_num_threads = threads
options.inter_op_num_threads = 1
session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
name = session.get_inputs()[0].name
report["onnxruntime"] = {
    "version": ort.__version__,
    "median_ms": median_ms(lambda: session.run(None, {name: x})),
}

try:
    import openvino as ov

    compiled = ov.Core().compile_model(
        path,
        "CPU",
        {
            "INFERENCE_PRECISION_HINT": "f32",
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
        },
    )
    request = compiled.create_infer_request()
    report["openvino"] = {
        "version": ov.__version__,
        "median_ms": median_ms(lambda: request.infer({0: x})),
    }
except Exception as error:  # OpenVINO is optional: say why it is missing
    report["openvino"] = {"error": str(error).splitlines()[0]}

print(json.dumps(report))
