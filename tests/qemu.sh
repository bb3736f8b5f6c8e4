#!/usr/bin/env bash
# The runtime on ARM, checked under qemu-user against this machine's build: the same top-1 and
# logits within 1e-4 on sample images, and the matmul kernels tract picks per emulated CPU. On
# the Cortex-A76 also f16 (native fp16 there, f16 storage on x86), and on every core the int8
# model: the same top-1 as x86 at that precision, and their kernels.
#
#   tests/qemu.sh [aarch64] [armv7]        (default: both)
#
# Needs the rust targets (aarch64-unknown-linux-gnu, armv7-unknown-linux-gnueabihf) and Debian's
# gcc-aarch64-linux-gnu libc6-dev-arm64-cross gcc-arm-linux-gnueabihf libc6-dev-armhf-cross
# qemu-user; .ci/run installs the aarch64 part and runs it. PROFILE=release checks the release
# build; the default, dev, optimises the dependencies like release and builds faster.
#
# Under qemu-user tract reads the host's /proc/cpuinfo, so TRACT_CPU_AARCH64_KIND (and
# TRACT_CPU_ARM32_NEON) tell it which core it runs on, as the real board's cpuinfo would.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=${PROFILE:-dev}
[ "$profile" = dev ] && out=debug || out=$profile
archs=("$@")
[ ${#archs[@]} -gt 0 ] || archs=(aarch64 armv7)
images=(models/samples/frame.jpg models/samples/coffee.jpg models/fashion-vit/test-images/*/00*.png)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The x86 reference: for dev, the workspace build the tests already made (building `-p runtime`
# alone would unify features differently and rebuild tract).
if [ "$profile" = dev ]; then
    cargo build --quiet --workspace
else
    cargo build --quiet --profile "$profile" -p runtime
fi
for precision in f32 f16 int8; do
    "target/$out/runtime" classify --json --logits --precision $precision "${images[@]}" \
        > "$work/x86_64-$precision.jsonl"
done

# Same top-1, image by image, as the x86 run at the same precision, and logits within the
# tolerance (1e-4 for f32; f16 and int8 arithmetic differ between the ISAs' kernels).
compare() { # name precision tolerance
    python3 - "$work/x86_64-$2.jsonl" "$work/$1.jsonl" "$1" "$3" <<'PY'
import json, sys
reference, emulated, name, tolerance = sys.argv[1:]
load = lambda path: [json.loads(line) for line in open(path)]
worst = 0.0
pairs = list(zip(load(reference), load(emulated)))
assert pairs and len(pairs) == len(load(reference)), f"{name}: missing results"
for a, b in pairs:
    assert a["image"] == b["image"]
    if a["top"][0]["label"] != b["top"][0]["label"]:
        sys.exit(f"{name}: {a['image']}: top-1 {b['top'][0]['label']} != x86 {a['top'][0]['label']}")
    worst = max(worst, max(abs(x - y) for x, y in zip(a["logits"], b["logits"])))
if worst > float(tolerance):
    sys.exit(f"{name}: logits differ from x86 by {worst:.2e} (> {tolerance})")
print(f"{name:<24} {len(pairs)} images: same top-1, max |logit - x86| = {worst:.1e}", end="")
PY
}

kernels() { # precision, then the command that runs the binary
    local precision=$1
    shift
    "$@" info --json --precision "$precision" | python3 -c '
import json, sys
info = json.load(sys.stdin)
print("  kernels:", ", ".join(f"{k} x{n}" for k, n in info["tract"]["matmul_kernels"].items()),
      "| own:", ", ".join(f"{op} {isa}" for op, isa in info["operator_kernels"].items()))'
}

check() { # name, then the command that runs the binary
    check_at f32 1e-4 "$@"
}

check_at() { # precision, tolerance, name, then the command that runs the binary
    local precision=$1 tolerance=$2 name=$3
    shift 3
    "$@" classify --json --logits --precision "$precision" "${images[@]}" > "$work/$name.jsonl"
    compare "$name" "$precision" "$tolerance"
    kernels "$precision" "$@"
}

cross_build() { # rust target triple; prints the binary's path
    cargo build --quiet --profile "$profile" -p runtime --target "$1"
    echo "target/$1/$out/runtime"
}

for arch in "${archs[@]}"; do
    case $arch in
    aarch64)
        # The operators' kernel tests (NEON against the portable reference) on the emulated CPU.
        cargo test --quiet --profile "$profile" -p runtime --lib --target aarch64-unknown-linux-gnu \
            ops:: > "$work/ops-tests.txt" 2>&1 || { cat "$work/ops-tests.txt"; exit 1; }
        echo "aarch64 operator tests: $(grep '^test result' "$work/ops-tests.txt")"
        bin=$(cross_build aarch64-unknown-linux-gnu)
        qemu="qemu-aarch64 -L /usr/aarch64-linux-gnu"
        # Pi 3 / Zero 2 (A53, tract's tuned kernels), Pi 4 (A72), Pi 5 (A76). tract has no A76
        # kind; its A75 kind is the one that knows the fp16 and dot-product extensions A76 has.
        a53="env TRACT_CPU_AARCH64_KIND=a53 $qemu -cpu cortex-a53 $bin"
        a72="env TRACT_CPU_AARCH64_KIND=a72 $qemu -cpu cortex-a72 $bin"
        a76="env TRACT_CPU_AARCH64_KIND=a75 $qemu -cpu cortex-a76 $bin"
        check aarch64-cortex-a53 $a53
        check aarch64-cortex-a72 $a72
        check aarch64-cortex-a76 $a76
        check_at f16 0.05 aarch64-cortex-a76-f16 $a76
        # int8: the runtime's NEON kernel on the A53 and A72, its SDOT kernel on the A76. The
        # logits may differ from x86's by more than f32's: an x86 host with AVX2 and no VNNI
        # quantizes activations to 7 bits (0.09 from the 8 bits of the others, measured).
        check_at int8 0.15 aarch64-cortex-a53-int8 $a53
        check_at int8 0.15 aarch64-cortex-a72-int8 $a72
        check_at int8 0.15 aarch64-cortex-a76-int8 $a76
        ;;
    armv7)
        bin=$(cross_build armv7-unknown-linux-gnueabihf)
        qemu="qemu-arm -L /usr/arm-linux-gnueabihf"
        # 32-bit Raspberry Pi OS: Pi 2 (A7); A15 stands for the larger 32-bit cores.
        check armv7-cortex-a7 env TRACT_CPU_ARM32_NEON=true $qemu -cpu cortex-a7 $bin
        check armv7-cortex-a15 env TRACT_CPU_ARM32_NEON=true $qemu -cpu cortex-a15 $bin
        ;;
    *)
        echo "unknown architecture $arch (aarch64 or armv7)" >&2
        exit 2
        ;;
    esac
done
