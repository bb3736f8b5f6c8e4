//! Helpers shared by the integration tests that drive the `runtime` binary.
#![allow(dead_code)] // each test file uses its own subset

use prost::Message;
use runtime::tract_onnx::pb;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Run the `runtime` binary with `args` and collect its output.
pub fn runtime(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_runtime"))
        .args(args)
        .output()
        .expect("runtime runs")
}

/// A path inside the repository.
pub fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A graph input or output: f32 of fixed `dims`.
pub fn float_value_info(name: &str, dims: &[i64]) -> pb::ValueInfoProto {
    let dim = dims
        .iter()
        .map(|&d| pb::tensor_shape_proto::Dimension {
            value: Some(pb::tensor_shape_proto::dimension::Value::DimValue(d)),
            ..Default::default()
        })
        .collect();
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: pb::tensor_proto::DataType::Float as i32,
                shape: Some(pb::TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `graph` as an opset-17 ONNX file.
pub fn onnx_file(graph: pb::GraphProto) -> Vec<u8> {
    pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        graph: Some(graph),
        ..Default::default()
    }
    .encode_to_vec()
}

/// Whether the external `tool` (ffmpeg, gst-launch-1.0, …) is installed. A test that needs
/// one it lacks says so and is skipped, so `cargo test` passes on a machine with only Rust;
/// with `REQUIRE_ALL_TESTS` set (CI sets it) a missing tool fails the test instead.
pub fn has_tool(tool: &str, package: &str) -> bool {
    // Only whether it starts: the version flag differs between tools.
    let found = Command::new(tool)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok();
    if !found {
        let why = format!("needs `{tool}` (apt-get install {package})");
        assert!(
            std::env::var_os("REQUIRE_ALL_TESTS").is_none(),
            "REQUIRE_ALL_TESTS is set and this test {why}"
        );
        // Past libtest's capture, so the skip shows in a normal `cargo test` run.
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "skipped: a test {why}");
    }
    found
}
