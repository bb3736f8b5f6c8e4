//! The `runtime` binary: the README's main command, and one clear line and a non-zero exit
//! for each kind of bad input.

mod common;
use common::{repo, runtime, stderr, stdout};

use std::process::{Command, Output};

fn sample() -> String {
    repo("models/samples/frame.jpg").display().to_string()
}

/// The README's first command classifies an image the default model knows; a newcomer can
/// check the answer by looking at it.
#[test]
fn the_readme_samples_get_the_answer_a_person_sees() {
    for (file, label) in [
        ("ankle-boot.png", "ankle_boot"),
        ("pullover.png", "pullover"),
        ("trouser.png", "trouser"),
    ] {
        let path = repo(&format!("models/samples/{file}"))
            .display()
            .to_string();
        let output = runtime(&["classify", &path, "--json"]);
        assert!(output.status.success(), "{}", stderr(&output));
        let result: serde_json::Value = serde_json::from_str(stdout(&output).trim()).unwrap();
        assert_eq!(result["top"][0]["label"], label, "{file}: {result}");
    }
}

#[test]
fn classifies_the_shipped_sample_with_the_embedded_model() {
    let first = runtime(&["classify", &sample(), "--json", "--top-k", "10"]);
    assert!(first.status.success(), "{}", stderr(&first));
    let result: serde_json::Value = serde_json::from_str(stdout(&first).trim()).unwrap();
    let top = result["top"].as_array().unwrap();
    assert_eq!(top.len(), 10, "the default model has 10 classes");
    let total: f64 = top.iter().map(|p| p["probability"].as_f64().unwrap()).sum();
    assert!((total - 1.0).abs() < 1e-4, "probabilities sum to {total}");
    let probabilities: Vec<f64> = top
        .iter()
        .map(|p| p["probability"].as_f64().unwrap())
        .collect();
    assert!(
        probabilities.windows(2).all(|w| w[0] >= w[1]),
        "sorted best first"
    );
    // Deterministic: the same answer on a second process.
    let second = runtime(&["classify", &sample(), "--json", "--top-k", "10"]);
    let again: serde_json::Value = serde_json::from_str(stdout(&second).trim()).unwrap();
    assert_eq!(result["top"], again["top"]);
}

#[test]
fn several_images_reuse_the_model_and_a_bad_one_does_not_stop_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let corrupt = dir.path().join("corrupt.jpg");
    std::fs::write(&corrupt, b"\xff\xd8\xff\xe0 definitely not a jpeg").unwrap();
    let coffee = repo("models/samples/coffee.jpg").display().to_string();
    let output = runtime(&["classify", &sample(), corrupt.to_str().unwrap(), &coffee]);
    assert_eq!(output.status.code(), Some(1));
    let out = stdout(&output);
    assert_eq!(out.lines().count(), 2, "both good images classified: {out}");
    let err = stderr(&output);
    assert_eq!(err.lines().count(), 1, "one line for the bad image: {err}");
    assert!(err.contains("corrupt.jpg"), "{err}");
}

#[test]
fn each_bad_input_gets_one_clear_line_and_a_non_zero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path.display().to_string()
    };
    let jpeg = std::fs::read(repo("models/samples/frame.jpg")).unwrap();
    let truncated = write("truncated.jpg", &jpeg[..jpeg.len() / 3]);
    let empty = write("empty.png", b"");
    let text = write("notes.png", b"just some text");
    let not_onnx = write("model.onnx", b"this is not a protobuf at all \x00\x01\x02");
    let labels = write("labels.txt", b"one\ntwo\nthree\n");
    let sample = sample();

    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["classify", &truncated], "truncated"),
        (vec!["classify", &empty], "not a supported image"),
        (vec!["classify", &text], "not a supported image"),
        (vec!["classify", "/no/such/file.jpg"], "cannot read"),
        (
            vec!["classify", &sample, "--model", &not_onnx],
            "not an ONNX model",
        ),
        (
            vec!["classify", &sample, "--model", "/no/such/model.onnx"],
            "cannot read model",
        ),
        (
            vec!["classify", &sample, "--labels", &labels],
            "3 labels for a model with 10 outputs",
        ),
        (vec!["classify", &sample, "--top-k", "0"], "top-k"),
    ];
    for (args, expected) in cases {
        let output = runtime(&args);
        let err = stderr(&output);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains(expected),
            "{args:?}: expected {expected:?} in {err:?}"
        );
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{args:?}: one line, got {err:?}"
        );
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        // The reason is said once: an error type that prints its source in its own message
        // must not also hand it on as the source, which the error line prints again.
        assert!(
            err.matches("(os error").count() <= 1,
            "{args:?}: the reason twice in {err:?}"
        );
    }
}

#[test]
fn decompression_bombs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // A PNG whose header claims 100000 x 100000 pixels.
    let mut png = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut png),
        &[0u8],
        1,
        1,
        image::ExtendedColorType::L8,
    )
    .unwrap();
    png[16..20].copy_from_slice(&100_000u32.to_be_bytes());
    png[20..24].copy_from_slice(&100_000u32.to_be_bytes());
    let path = dir.path().join("bomb.png");
    std::fs::write(&path, &png).unwrap();
    let output = runtime(&["classify", path.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    assert!(err.contains("limits") || err.contains("corrupt"), "{err}");
    assert_eq!(err.trim().lines().count(), 1);
}

#[test]
fn info_and_bench_report_the_model() {
    let info = runtime(&["info", "--json"]);
    assert!(info.status.success(), "{}", stderr(&info));
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["input"]["shape"], serde_json::json!([1, 1, 28, 28]));
    assert_eq!(info["labels"].as_array().unwrap().len(), 10);
    assert!(info["metadata"]["vit.labels"].is_string());
    // Where the runtime's own kernels beat tract's (x86-64), every product of the ViT is
    // theirs, its patch embedding included; elsewhere tract's kernels show.
    let kernels = info["tract"]["matmul_kernels"].as_object().unwrap();
    let own = info["operator_kernels"].as_object().unwrap();
    assert!(
        !kernels.is_empty() || (own.contains_key("DenseConv") && own.contains_key("DenseLinear")),
        "the ViT's matrix products have kernels: {info}"
    );
    assert!(info["tract"]["operators"].as_object().unwrap().len() > 3);
    #[cfg(target_arch = "x86_64")]
    assert!(
        !info["cpu"]["features"].as_array().unwrap().is_empty(),
        "x86-64 CPUs have SIMD extensions tract knows"
    );

    let bench = runtime(&["bench", "--runs", "5", "--warmup", "1", "--json"]);
    assert!(bench.status.success(), "{}", stderr(&bench));
    let bench: serde_json::Value = serde_json::from_slice(&bench.stdout).unwrap();
    for part in ["preprocess", "inference", "total"] {
        let s = &bench[part];
        let (min, median, p99) = (
            s["min_ms"].as_f64().unwrap(),
            s["median_ms"].as_f64().unwrap(),
            s["p99_ms"].as_f64().unwrap(),
        );
        assert!(min > 0.0 && min <= median && median <= p99, "{part}: {s}");
    }
}

#[test]
fn bench_profiles_by_operator_or_by_node() {
    let profile = |flag: &str| {
        let out = runtime(&["bench", "--runs", "3", "--warmup", "1", flag, "--json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let bench: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        bench["operators"].as_array().unwrap().clone()
    };
    let names = |entries: &[serde_json::Value], key: &str| -> Vec<String> {
        let names: Vec<String> = entries
            .iter()
            .map(|e| e[key].as_str().unwrap().to_string())
            .collect();
        let unique: std::collections::HashSet<_> = names.iter().collect();
        assert_eq!(unique.len(), names.len(), "one entry each: {names:?}");
        names
    };
    let operators = names(&profile("--profile"), "op");
    let nodes = names(&profile("--profile-nodes"), "node");
    // The shipped ViT's six blocks have several nodes of the same operator each.
    assert!(
        nodes.len() > operators.len() + 12,
        "{nodes:?} vs {operators:?}"
    );
    for operator in &operators {
        assert!(
            nodes
                .iter()
                .any(|node| node.contains(&format!("({operator}"))),
            "{operator} among {nodes:?}"
        );
    }
}

#[test]
fn threads_change_speed_not_answers() {
    let one = runtime(&["classify", &sample(), "--json", "--top-k", "10"]);
    let two = runtime(&[
        "classify",
        &sample(),
        "--json",
        "--top-k",
        "10",
        "--threads",
        "2",
    ]);
    assert!(two.status.success(), "{}", stderr(&two));
    let parse = |o: &Output| -> Vec<(String, f64)> {
        let v: serde_json::Value = serde_json::from_str(stdout(o).trim()).unwrap();
        v["top"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["label"].as_str().unwrap().to_string(),
                    p["probability"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    let (one, two) = (parse(&one), parse(&two));
    assert_eq!(one[0].0, two[0].0);
    for ((_, a), (_, b)) in one.iter().zip(&two) {
        assert!((a - b).abs() < 1e-5, "{one:?} vs {two:?}");
    }
    let info = runtime(&["info", "--json", "--threads", "2"]);
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["tract"]["threads"], 2);
}

#[test]
fn eval_refuses_a_class_folder_the_model_does_not_know() {
    let dir = tempfile::tempdir().unwrap();
    for class in ["bag", "giraffe"] {
        std::fs::create_dir(dir.path().join(class)).unwrap();
        std::fs::copy(
            repo("models/samples/frame.jpg"),
            dir.path().join(class).join("a.jpg"),
        )
        .unwrap();
    }
    let output = runtime(&["eval", "--data", dir.path().to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("\"giraffe\""), "{err}");
}

#[test]
fn a_reader_that_stops_early_ends_the_output_quietly() {
    use std::io::Read;
    use std::process::{Command, Stdio};
    // `runtime classify --json … | head -c 16`, with more output than a pipe holds.
    let sample = sample();
    let mut child = Command::new(env!("CARGO_BIN_EXE_runtime"))
        .arg("classify")
        .arg("--json")
        .args(std::iter::repeat_n(&sample, 2000))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 16];
    child.stdout.take().unwrap().read_exact(&mut first).unwrap();
    let output = child.wait_with_output().unwrap();
    let message = stderr(&output);
    assert!(!message.contains("panicked"), "{message}");
}

/// `--isa` (and `RUNTIME_ISA`) choose the operators' kernels: `info` names them, a forced
/// lower kernel gives the best kernel's answer, and one the CPU lacks is one clear line.
#[test]
fn the_kernel_instruction_set_can_be_forced_and_is_reported() {
    let kernels = |output: &Output| -> serde_json::Value {
        assert!(output.status.success(), "{}", stderr(output));
        let info: serde_json::Value = serde_json::from_str(&stdout(output)).unwrap();
        info["operator_kernels"].clone()
    };
    let forced = kernels(&runtime(&["info", "--json", "--isa", "portable"]));
    assert_eq!(forced["DenseLinear"], "portable", "{forced}");
    assert_eq!(forced["TokenMajorAttention"], "portable", "{forced}");
    let best = kernels(&runtime(&["info", "--json"]));
    assert!(best["TokenMajorAttention"].is_string(), "{best}");

    let logits = |isa: &str| -> Vec<f64> {
        let output = runtime(&["classify", &sample(), "--json", "--logits", "--isa", isa]);
        assert!(output.status.success(), "{}", stderr(&output));
        let result: serde_json::Value = serde_json::from_str(stdout(&output).trim()).unwrap();
        let logits = result["logits"].as_array().unwrap();
        logits.iter().map(|l| l.as_f64().unwrap()).collect()
    };
    let best_isa = best["TokenMajorAttention"].as_str().unwrap();
    for (a, b) in logits("portable").iter().zip(logits(best_isa)) {
        assert!((a - b).abs() <= 1e-4, "portable {a} against {best_isa} {b}");
    }

    let unknown = runtime(&["info", "--isa", "sse9"]);
    assert_eq!(unknown.status.code(), Some(2), "{}", stderr(&unknown));
    let absent = if cfg!(target_arch = "x86_64") {
        "neon"
    } else {
        "avx2"
    };
    let refused = Command::new(env!("CARGO_BIN_EXE_runtime"))
        .args(["info"])
        .env("RUNTIME_ISA", absent)
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(1));
    let message = stderr(&refused);
    assert_eq!(message.lines().count(), 1, "{message}");
    assert!(
        message.contains(&format!("cannot run the {absent} kernels")),
        "{message}"
    );
}

#[test]
fn absurd_frame_sizes_are_errors_not_overflows() {
    // width × height × 3 overflowed 64 bits before the size check ran.
    let output = runtime(&[
        "stream",
        "--format",
        "rgb24",
        "--size",
        "4294967295x4294967295",
    ]);
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{err}");
    assert!(err.contains("exceeds 16384 px"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
