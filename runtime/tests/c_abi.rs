//! The C ABI from C: `tests/c/classify.c`, compiled with `cc` against libruntime.so, gives the
//! CLI's answer on the same frame and fails cleanly on each bad call.

mod common;
use common::repo;

use std::path::Path;
use std::process::Command;

#[test]
fn a_c_program_gets_the_clis_answer_and_clear_errors() {
    // `cargo build` puts the cdylib next to the binary; `cargo test` leaves it in deps/. Both
    // may exist: the newer is the one built from this source.
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_runtime")).parent().unwrap();
    let target_dir = [bin_dir.join("deps"), bin_dir.to_path_buf()]
        .into_iter()
        .filter_map(|dir| {
            let modified = dir.join("libruntime.so").metadata().ok()?.modified().ok()?;
            Some((modified, dir))
        })
        .max()
        .map(|(_, dir)| dir)
        .expect("cargo builds libruntime.so with the runtime crate");
    let target_dir = target_dir.as_path();
    let dir = tempfile::tempdir().unwrap();
    let program = dir.path().join("classify");
    let status = Command::new("cc")
        .arg("-Wall")
        .arg("-Werror")
        .arg("-I")
        .arg(repo("runtime/include"))
        .arg(repo("runtime/tests/c/classify.c"))
        .arg("-L")
        .arg(target_dir)
        .arg(format!("-Wl,-rpath,{}", target_dir.display()))
        .arg("-lruntime")
        .arg("-o")
        .arg(&program)
        .status()
        .expect("a C compiler (cc) is installed");
    assert!(
        status.success(),
        "the C program compiles against the header"
    );

    let sample = repo("models/samples/frame.jpg");
    let image = runtime::decode_file(&sample).unwrap();
    assert_eq!(image.format, runtime::PixelFormat::Rgb8, "a colour sample");
    let raw = dir.path().join("frame.rgb");
    std::fs::write(&raw, &image.pixels).unwrap();
    // cargo's LD_LIBRARY_PATH names both folders, and would win over the rpath.
    let output = Command::new(&program)
        .env("LD_LIBRARY_PATH", target_dir)
        .arg(&raw)
        .arg(image.width.to_string())
        .arg(image.height.to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();

    let cli = Command::new(env!("CARGO_BIN_EXE_runtime"))
        .args(["classify", "--json", "--top-k", "3"])
        .arg(&sample)
        .output()
        .unwrap();
    let cli: serde_json::Value = serde_json::from_slice(&cli.stdout).unwrap();
    for (line, expected) in lines.iter().zip(cli["top"].as_array().unwrap()) {
        let fields: Vec<&str> = line.split(' ').collect();
        assert_eq!(fields[0], expected["label"].as_str().unwrap());
        assert_eq!(fields[1], expected["class"].to_string());
        let probability: f64 = fields[2].parse().unwrap();
        assert!((probability - expected["probability"].as_f64().unwrap()).abs() < 1e-6);
    }

    let errors: Vec<&str> = lines[3..9].to_vec();
    for (error, expected) in errors.iter().zip([
        "cannot read model /nonexistent/model.onnx",
        "stride 1 is shorter than a row",
        "unknown pixel format 7",
        "frame is empty (0x",
        "spans more bytes than memory holds",
        "not aligned",
    ]) {
        assert!(
            error.contains(expected),
            "{error:?} should say {expected:?}"
        );
    }
    assert_eq!(lines[9], "capacity SIZE_MAX: 3 written");
    assert_eq!(lines[10], "classes 10, label 99 NULL");
}
