//! `runtime stream` end to end: records, error records and the summary for piped frames, and
//! the ffmpeg/GStreamer recipes of docs/pipelines.md run as written (`.ci/run` installs the tools).

mod common;
use common::{has_tool, repo, stderr};

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Run `runtime stream ARGS` with `input` on stdin.
fn stream(args: &[&str], input: Vec<u8>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_runtime"))
        .arg("stream")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runtime runs");
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        // The stream may end early on bad arguments; a closed pipe is then expected.
        let _ = stdin.write_all(&input);
    });
    let output = child.wait_with_output().unwrap();
    writer.join().unwrap();
    output
}

/// The JSON records of a `--json` run: frames first, the summary last.
fn records(output: &Output) -> (Vec<serde_json::Value>, serde_json::Value) {
    let mut lines: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("each line is JSON"))
        .collect();
    let summary = lines.pop().expect("a summary line")["summary"].clone();
    assert!(summary.is_object(), "the last line is the summary");
    (lines, summary)
}

/// The committed Fashion-MNIST test PNGs, upscaled and encoded as JPEG like a camera would.
fn jpegs(n: usize) -> Vec<(PathBuf, Vec<u8>)> {
    let mut pngs: Vec<PathBuf> = std::fs::read_dir(repo("models/fashion-vit/test-images"))
        .unwrap()
        .flat_map(|class| {
            std::fs::read_dir(class.unwrap().path())
                .into_iter()
                .flatten()
        })
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "png"))
        .collect();
    pngs.sort();
    pngs.into_iter()
        .step_by(3)
        .take(n)
        .map(|path| {
            let image = image::open(&path).unwrap().resize_exact(
                112,
                112,
                image::imageops::FilterType::Triangle,
            );
            let mut jpeg = Vec::new();
            image
                .to_rgb8()
                .write_to(
                    &mut std::io::Cursor::new(&mut jpeg),
                    image::ImageFormat::Jpeg,
                )
                .unwrap();
            (path, jpeg)
        })
        .collect()
}

/// The JPEG with its frame header's height set to 0: complete, but undecodable.
fn corrupt(jpeg: &[u8]) -> Vec<u8> {
    let mut bad = jpeg.to_vec();
    let sof = bad
        .windows(2)
        .position(|w| w == [0xFF, 0xC0])
        .expect("a baseline JPEG");
    bad[sof + 5..sof + 7].copy_from_slice(&[0, 0]);
    bad
}

#[test]
fn a_pipe_with_a_corrupt_frame_and_a_truncated_tail_gives_a_record_per_frame() {
    let images = jpegs(6);
    let mut input = Vec::new();
    for (i, (_, jpeg)) in images.iter().enumerate() {
        match i {
            2 => input.extend_from_slice(&corrupt(jpeg)),
            5 => input.extend_from_slice(&jpeg[..jpeg.len() / 2]),
            _ => input.extend_from_slice(jpeg),
        }
    }
    let output = stream(
        &[
            "--format", "mjpeg", "--keep", "all", "--json", "--top-k", "2",
        ],
        input,
    );
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let (frames, summary) = records(&output);
    let indices: Vec<u64> = frames
        .iter()
        .map(|r| r["frame"].as_u64().unwrap())
        .collect();
    assert_eq!(
        indices,
        [0, 1, 2, 3, 4, 5],
        "one record per frame, in order"
    );
    for (i, record) in frames.iter().enumerate() {
        let failed = record.get("error").is_some();
        assert_eq!(failed, i == 2 || i == 5, "frame {i}: {record}");
    }
    assert!(frames[5]["error"].as_str().unwrap().contains("truncated"));
    assert_eq!(summary["frames_read"], 5, "{summary}");
    assert_eq!(summary["classified"], 4);
    assert_eq!(summary["errors"], 2);
    assert_eq!(summary["dropped"], 0);

    // Each classified frame got the answer `runtime classify` gives for the same JPEG.
    let dir = tempfile::tempdir().unwrap();
    for i in [0, 1, 3, 4] {
        let path = dir.path().join(format!("{i}.jpg"));
        std::fs::write(&path, &images[i].1).unwrap();
        let classify = Command::new(env!("CARGO_BIN_EXE_runtime"))
            .args(["classify", "--json", "--top-k", "2"])
            .arg(&path)
            .output()
            .unwrap();
        let expected: serde_json::Value = serde_json::from_slice(&classify.stdout).unwrap();
        let answer = |top: &serde_json::Value| -> Vec<(String, f32)> {
            let entries = top.as_array().unwrap();
            entries
                .iter()
                .map(|p| {
                    (
                        p["label"].to_string(),
                        p["probability"].as_f64().unwrap() as f32,
                    )
                })
                .collect()
        };
        assert_eq!(
            answer(&frames[i]["top"]),
            answer(&expected["top"]),
            "frame {i}"
        );
    }
}

#[test]
fn raw_frames_with_a_truncated_tail() {
    let frame: Vec<u8> = (0..64 * 48 * 3).map(|i| (i * 7 % 256) as u8).collect();
    let mut input = frame.repeat(4);
    input.extend_from_slice(&frame[..1000]);
    let output = stream(
        &[
            "--format", "bgr24", "--size", "64x48", "--keep", "all", "--json",
        ],
        input,
    );
    assert_eq!(output.status.code(), Some(1));
    let (frames, summary) = records(&output);
    assert_eq!(frames.len(), 5);
    assert!(frames[..4].iter().all(|r| r["top"].is_array()));
    // Identical frames, identical answers.
    assert!(frames[..4].iter().all(|r| r["top"] == frames[0]["top"]));
    let error = frames[4]["error"].as_str().unwrap();
    assert!(error.contains("after 1000 of its 9216 bytes"), "{error}");
    assert_eq!(
        (summary["frames_read"].as_u64(), summary["errors"].as_u64()),
        (Some(4), Some(1))
    );
}

#[test]
fn every_nth_frame_is_classified_and_the_rest_counted_as_skipped() {
    let input: Vec<u8> = (0..10u8).flat_map(|i| vec![i * 20; 32 * 32]).collect();
    let output = stream(
        &[
            "--format", "gray8", "--size", "32x32", "--keep", "all", "--every", "3", "--json",
        ],
        input,
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let (frames, summary) = records(&output);
    let indices: Vec<u64> = frames
        .iter()
        .map(|r| r["frame"].as_u64().unwrap())
        .collect();
    assert_eq!(indices, [0, 3, 6, 9]);
    assert_eq!(summary["skipped"], 6);
    assert_eq!(summary["frames_read"], 10);
}

#[test]
fn an_empty_input_is_a_clean_empty_summary() {
    let output = stream(
        &["--format", "rgb24", "--size", "8x8", "--json"],
        Vec::new(),
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let (frames, summary) = records(&output);
    assert!(frames.is_empty());
    assert_eq!(summary["frames_read"], 0);
}

#[test]
fn bad_stream_arguments_get_one_clear_line() {
    for (args, expected) in [
        (&["--format", "rgb24"][..], "need a size"),
        (&["--format", "rgb24", "--size", "640"], "WIDTHxHEIGHT"),
        (
            &["--format", "rgb32", "--size", "8x8"],
            "unknown frame format",
        ),
        (
            &["--format", "mjpeg", "--slots", "1"],
            "slots must be in 2..=16",
        ),
        (
            &["--format", "gray8", "--size", "99999x2"],
            "exceeds 16384 px",
        ),
        (&["--format", "mjpeg", "--keep", "oldest"], "latest or all"),
        // Sizes from the command line that used to panic (capacity overflow) or abort (12.9 GB).
        (
            &[
                "--format",
                "mjpeg",
                "--max-jpeg-bytes",
                "18446744073709551615",
            ],
            "exceed the ring's limit of 1024 MiB",
        ),
        (
            &[
                "--format",
                "rgb24",
                "--size",
                "16384x16384",
                "--slots",
                "16",
            ],
            "exceed the ring's limit of 1024 MiB",
        ),
    ] {
        let output = stream(args, Vec::new());
        let err = stderr(&output);
        assert!(output.status.code().is_some_and(|c| c != 0), "{args:?}");
        assert!(err.contains(expected), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        let errors = err.lines().filter(|l| l.starts_with("error")).count();
        assert_eq!(errors, 1, "{args:?}: {err}");
    }
}

#[test]
fn a_panic_in_the_frame_reader_ends_the_stream_with_an_error() {
    struct BrokenCamera;
    impl std::io::Read for BrokenCamera {
        fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
            panic!("driver bug")
        }
    }
    let model = runtime::embedded::DEFAULT_MODEL.unwrap();
    let model = runtime::Model::from_bytes(model, &Default::default()).unwrap();
    let mut classifier = runtime::Classifier::new(model, 1).unwrap();
    let config = runtime::StreamConfig::new(runtime::StreamFormat::Gray8, 28, 28);
    // The consumer used to wait forever for the reader's frames: fail instead of hanging.
    let (done, result) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let outcome = runtime::run_stream(&mut classifier, BrokenCamera, &config, |_, _| Ok(()));
        let _ = done.send(outcome.map(|_| ()).map_err(|e| e.to_string()));
    });
    let outcome = result
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("the stream ends");
    let error = outcome.unwrap_err();
    assert!(
        error.contains("panic") && error.contains("driver bug"),
        "{error}"
    );
}

#[test]
fn yuv_and_rgb_of_the_same_video_agree() {
    if !has_tool("ffmpeg", "ffmpeg") {
        return;
    }
    // ffmpeg converts its test pattern once to each format; the classifier must see the same.
    let frames = |pix_fmt: &str| {
        let output = Command::new("ffmpeg")
            .args([
                "-loglevel",
                "error",
                "-f",
                "lavfi",
                "-i",
                "testsrc=size=320x240:rate=10",
            ])
            .args(["-frames:v", "5", "-f", "rawvideo", "-pix_fmt", pix_fmt, "-"])
            .output()
            .expect("ffmpeg is installed (apt-get install ffmpeg; .ci/run does)");
        assert!(output.status.success());
        output.stdout
    };
    let classify = |format: &str, input: Vec<u8>| {
        let output = stream(
            &[
                "--format", format, "--size", "320x240", "--keep", "all", "--json",
            ],
            input,
        );
        assert!(output.status.success(), "{}", stderr(&output));
        records(&output).0
    };
    let rgb = classify("rgb24", frames("rgb24"));
    assert_eq!(rgb.len(), 5);
    for format in ["yuv420p", "nv12", "gray"] {
        let name = if format == "gray" { "gray8" } else { format };
        let other = classify(name, frames(format));
        for (a, b) in rgb.iter().zip(&other) {
            let (a, b) = (&a["top"][0], &b["top"][0]);
            assert_eq!(a["label"], b["label"], "{format}");
            let gap =
                (a["probability"].as_f64().unwrap() - b["probability"].as_f64().unwrap()).abs();
            // Chroma subsampling and 8-bit rounding move the pixels a little, not the answer.
            assert!(gap < 0.05, "{format}: {a} vs {b}");
        }
    }
}

/// The lines of the stream recipe block in docs/pipelines.md.
fn documented_recipes() -> Vec<String> {
    let page = std::fs::read_to_string(repo("docs/pipelines.md")).unwrap();
    let block = page
        .split("<!-- stream recipes:")
        .nth(1)
        .expect("docs/pipelines.md has the stream recipes")
        .split("```sh\n")
        .nth(1)
        .unwrap()
        .split("```")
        .next()
        .unwrap();
    block
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(String::from)
        .collect()
}

#[test]
fn the_documented_pipeline_recipes_run() {
    if !has_tool("ffmpeg", "ffmpeg") || !has_tool("gst-launch-1.0", "gstreamer1.0-tools") {
        return;
    }
    let recipes = documented_recipes();
    assert!(recipes.len() >= 4, "{recipes:?}");
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_runtime")).parent().unwrap();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap());
    for recipe in &recipes {
        let output = Command::new("bash")
            .args(["-o", "pipefail", "-c", recipe])
            .current_dir(repo(""))
            .env("PATH", &path)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let (out, err) = (String::from_utf8_lossy(&output.stdout), stderr(&output));
        assert!(output.status.success(), "{recipe}\n{err}");
        // The summary: on stderr, or the last JSON line.
        let summary = err
            .lines()
            .find(|l| l.contains("frames read"))
            .map(String::from)
            .or_else(|| {
                out.lines()
                    .last()
                    .filter(|l| l.contains("summary"))
                    .map(String::from)
            })
            .unwrap_or_else(|| panic!("{recipe}: no summary in\n{out}\n{err}"));
        assert!(
            out.lines().count() >= 5,
            "{recipe}: too few frames classified: {summary}"
        );
    }
}
