"""torchvision's Swin-T as ONNX, random weights, for checking the runtime on a third-party Swin.

torchvision's `swin_t` (Liu et al. 2021: 224 px, patch 4, windows of 7, widths 96-768, depths
2-2-6-2, heads 3-6-12-24), seeded random weights, exported with torch.onnx at opset 17 with the
input named `pixel_values` (batch symbolic) and the output `logits`.

torch 1.13 keeps torchvision's functional dropouts as Dropout nodes with a training-mode input,
which OpenVINO refuses; at inference they are identities, so they are bypassed and removed.

Set-up once:  apt-get install python3-torch python3-torchvision python3-onnx
Usage:        /usr/bin/python3 exporter/compare/torch_swin.py swin_t.onnx
Then compare with the peers (tests/onnx_peers.py) and classify with the runtime, giving the
preprocessing the file lacks:
              runtime classify IMAGE --model swin_t.onnx --mean 0.485,0.456,0.406 \\
                  --std 0.229,0.224,0.225 --resize center-crop
"""
import sys
import torch
import torchvision

path = sys.argv[1]
torch.manual_seed(0)
model = torchvision.models.swin_t(weights=None).eval()
example = torch.randn(1, 3, 224, 224)
torch.onnx.export(
    model,
    example,
    path,
    input_names=["pixel_values"],
    output_names=["logits"],
    dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
    opset_version=17,
    # torchvision's functional dropout calls would otherwise stay as Dropout nodes.
    training=torch.onnx.TrainingMode.EVAL,
)
import onnx

onnx_model = onnx.load(path)
graph = onnx_model.graph
dropouts = [n for n in graph.node if n.op_type == "Dropout"]
for dropout in dropouts:
    for node in graph.node:
        node.input[:] = [dropout.input[0] if i == dropout.output[0] else i for i in node.input]
    graph.node.remove(dropout)
onnx.checker.check_model(onnx_model)
onnx.save(onnx_model, path)
print(f"wrote {path}: torchvision {torchvision.__version__} swin_t, random weights (seed 0), "
      f"{len(dropouts)} Dropout nodes removed")
