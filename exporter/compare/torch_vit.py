"""Training speed of the exporter's ViT in PyTorch, for a side-by-side images/s ratio with burn.

The same architecture as exporter/src/model/mod.rs (linear patch embedding, CLS token, learnable
position embedding, pre-norm blocks with fused-QKV attention and a GELU MLP, LayerNorm + linear
head on CLS) and the same step (AdamW, label smoothing, global grad-norm clipping), on the first
N Fashion-MNIST training images from Debian's dataset-fashion-mnist, normalised as the runtime
does ((x/255 - 0.5) / 0.5), without augmentation.

Set-up once:  apt-get install python3-torch dataset-fashion-mnist
Usage:        /usr/bin/python3 exporter/compare/torch_vit.py [--images 3000] [--threads 2] \
                  [--patch-size 7] [--dim 64] [--depth 6] [--heads 4] [--mlp-dim 128] [--batch-size 64]
Compare with, in the same sitting:
              exporter train --data <those images as a folder> --no-augment --epochs 1 ...
(images_per_second in the run's metrics.jsonl counts training steps only, as this script does).

It also writes torch.onnx exports of the same architecture (random weights) for the runtime's
speed comparisons (tests/speed_table.sh), at a preset's shape, without training:
              /usr/bin/python3 exporter/compare/torch_vit.py --export-onnx seed.onnx --shape seed
Shapes: seed (144 px, patch 4, dim 32, 6 blocks, 2 heads, MLP 32), video (144 px, patch 8,
dim 128, 4 blocks, 4 heads, MLP 512), deit-tiny (224 px, patch 16, dim 192, 12 blocks, 3 heads,
MLP 768, a Conv patch embedding as timm's ViT-Ti/16), fashion (28 px grey, patch 4, dim 64,
6 blocks, 4 heads, MLP 128). --opset 13 writes LayerNorm decomposed (ReduceMean, Sub, Pow, ...),
as older exporters do.
"""
import argparse, gzip, json, struct, time
import torch
from torch import nn

IDX = "/usr/share/datasets/fashion-mnist/train-{}-idx{}-ubyte.gz"


def load(count):
    with gzip.open(IDX.format("images", 3)) as f:
        _, n, rows, cols = struct.unpack(">IIII", f.read(16))
        pixels = torch.frombuffer(bytearray(f.read(count * rows * cols)), dtype=torch.uint8)
    with gzip.open(IDX.format("labels", 1)) as f:
        f.read(8)
        labels = torch.frombuffer(bytearray(f.read(count)), dtype=torch.uint8).long()
    images = pixels.float().div(255).sub(0.5).div(0.5).reshape(count, 1, rows, cols)
    return images, labels


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_dim, dropout):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_dim, dim), nn.Dropout(dropout))
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attention = (q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5).softmax(-1)
        x = x + self.drop(self.proj((attention @ v).transpose(1, 2).reshape(b, t, d)))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, image_size, channels, patch, dim, depth, heads, mlp_dim, classes, dropout,
                 conv_embedding=False):
        super().__init__()
        self.patch = patch
        tokens = (image_size // patch) ** 2
        self.embed = nn.Linear(channels * patch * patch, dim)
        self.conv = nn.Conv2d(channels, dim, patch, stride=patch) if conv_embedding else None
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.position = nn.Parameter(torch.randn(1, tokens + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_dim, dropout) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, images):
        b, c, h, w = images.shape
        p = self.patch
        if self.conv is not None:  # timm's PatchEmbed
            embedded = self.conv(images).flatten(2).transpose(1, 2)
        else:
            # b c (h p1) (w p2) -> b (h w) (p1 p2 c), as the burn model
            patches = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, p * p * c)
            embedded = self.embed(patches)
        x = torch.cat([self.cls.expand(b, -1, -1), embedded], 1) + self.position
        return self.head(self.norm(self.blocks(x))[:, 0])


# (image size, channels, patch, dim, depth, heads, MLP, classes, Conv patch embedding)
SHAPES = {
    "seed": (144, 3, 4, 32, 6, 2, 32, 37, False),
    "video": (144, 3, 8, 128, 4, 4, 512, 37, False),
    "deit-tiny": (224, 3, 16, 192, 12, 3, 768, 1000, True),
    "fashion": (28, 1, 4, 64, 6, 4, 128, 10, False),
}


def export(path, shape, opset):
    size, channels, *rest = SHAPES[shape]
    model = ViT(size, channels, *rest[:-1], 0.0, conv_embedding=rest[-1]).eval()
    torch.onnx.export(model, torch.randn(1, channels, size, size), path, opset_version=opset,
                      input_names=["pixel_values"], output_names=["logits"],
                      dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in [("images", 3000), ("threads", 2), ("patch-size", 7), ("dim", 64), ("depth", 6),
                          ("heads", 4), ("mlp-dim", 128), ("batch-size", 64), ("warmup-steps", 5)]:
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--export-onnx", metavar="PATH", help="write a torch.onnx export and stop")
    parser.add_argument("--shape", choices=SHAPES, default="seed", help="the export's shape")
    parser.add_argument("--opset", type=int, default=17, help="the export's opset")
    args = parser.parse_args()
    torch.manual_seed(42)
    if args.export_onnx:
        export(args.export_onnx, args.shape, args.opset)
        return
    torch.set_num_threads(args.threads)
    images, labels = load(args.images)
    model = ViT(28, 1, args.patch_size, args.dim, args.depth, args.heads, args.mlp_dim, 10, 0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    order = torch.randperm(args.images)
    steps = args.images // args.batch_size
    seen, started = 0, None
    for step in range(steps):
        if step == args.warmup_steps:
            seen, started = 0, time.perf_counter()
        index = order[step * args.batch_size:(step + 1) * args.batch_size]
        loss = loss_fn(model(images[index]), labels[index])
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        seen += len(index)
    seconds = time.perf_counter() - started
    print(json.dumps({"framework": f"torch {torch.__version__}", "threads": args.threads,
                      "images_per_second": seen / seconds, "steps": steps - args.warmup_steps,
                      "loss": loss.item()}))


if __name__ == "__main__":
    main()
