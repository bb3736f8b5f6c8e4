//! `exporter train` killed with SIGKILL at random moments and resumed each time ends with the
//! weights, figures and files of a run that was never interrupted.
//!
//! Set `KILL_SEED` to replay a failing sequence of kill delays (the test prints its seed).

use burn::module::{ModuleVisitor, Param};
use burn::prelude::*;
use exporter::run_folder::{self, RunState};
use exporter::training::{self, EpochMetrics, TrainingConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::ffi::OsString;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

const KILLS: usize = 5;

/// A new run of the tiny preset with everything a resume must restore exactly: dropout masks,
/// the optimizer's moments, the weight average and the best epoch so far.
fn new_run(data: &Path, run: &Path) -> Vec<OsString> {
    let mut args: Vec<OsString> = ["train", "--data"].map(OsString::from).into();
    args.push(data.into());
    args.push("--out".into());
    args.push(run.into());
    args.extend(
        [
            "--preset",
            "tiny",
            "--epochs",
            "10",
            "--batch-size",
            "4",
            "--lr",
            "5e-3",
            "--seed",
            "7",
            "--dropout",
            "0.2",
            "--ema",
            "0.9",
            "--json",
        ]
        .map(OsString::from),
    );
    args
}

fn exporter(args: &[OsString]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_exporter"));
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command
}

fn resume_args(run: &Path) -> Vec<OsString> {
    vec!["train".into(), "--resume".into(), run.into()]
}

/// Every parameter's bits, in visiting order.
fn weights(config: &TrainingConfig, path: &Path) -> Vec<u32> {
    struct Collect(Vec<u32>);
    impl ModuleVisitor for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let data = param.val().into_data().convert::<f32>();
            self.0.extend(data.iter::<f32>().map(f32::to_bits));
        }
    }
    let device = exporter::backend::device();
    let model = training::load_model(&config.model, path, &device).unwrap();
    let mut collect = Collect(Vec::new());
    model.visit(&mut collect);
    collect.0
}

/// The metrics without the timings, which differ from run to run.
fn figures(run: &Path) -> Vec<EpochMetrics> {
    let mut metrics = training::read_metrics(&run.join("metrics.jsonl")).unwrap();
    for m in &mut metrics {
        (m.images_per_second, m.epoch_seconds) = (0.0, 0.0);
    }
    metrics
}

fn files(run: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(run)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

fn state(run: &Path) -> RunState {
    run_folder::read_state(run)
        .unwrap()
        .expect("a committed epoch")
}

/// What a kill may leave: no commit yet, or a committed epoch whose files are all there and
/// readable, with at most one metrics line ahead of it.
fn check_after_kill(run: &Path, moment: &str) {
    let Some(state) = run_folder::read_state(run).unwrap() else {
        return;
    };
    let config: TrainingConfig =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    for name in [&state.model, &state.best_weights]
        .into_iter()
        .chain(&state.ema)
    {
        assert!(
            !weights(&config, &run.join(name)).is_empty(),
            "{moment}: {name}"
        );
    }
    assert!(run.join(&state.optimizer).is_file(), "{moment}");
    let lines = training::read_metrics(&run.join("metrics.jsonl"))
        .unwrap()
        .len();
    assert!(
        lines == state.epoch || lines == state.epoch + 1,
        "{moment}: {lines} metrics lines for epoch {}",
        state.epoch
    );
}

#[test]
fn a_run_killed_at_random_moments_ends_as_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    exporter::synthetic::write_dataset(&data, 3, 30, 20, 24, 1).unwrap();

    let reference = dir.path().join("reference");
    let started = Instant::now();
    let status = exporter(&new_run(&data, &reference)).status().unwrap();
    assert!(status.success());
    let duration = started.elapsed();

    let seed = std::env::var("KILL_SEED")
        .ok()
        .map(|s| s.parse().expect("KILL_SEED is a number"))
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("KILL_SEED={seed}; an uninterrupted run took {duration:?}");
    let mut rng = StdRng::seed_from_u64(seed);

    // Each process lives a random share of the whole run's time; the shares add up to less
    // than the run on average, so the kills spread over it and it rarely finishes early.
    let run = dir.path().join("killed");
    let mut kills = Vec::new();
    let mut finished = false;
    while kills.len() < KILLS {
        let args = match run.join("config.json").exists() {
            true => resume_args(&run),
            false => new_run(&data, &run),
        };
        let mut child = exporter(&args).spawn().unwrap();
        let delay = duration.mul_f64(rng.random_range(0.0..1.5 / KILLS as f64));
        std::thread::sleep(delay);
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{args:?} failed: {status}");
            finished = true;
            break;
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let committed = run_folder::read_state(&run).unwrap().map(|s| s.epoch);
        kills.push((delay, committed));
        check_after_kill(&run, &format!("kill {} after {delay:?}", kills.len()));
    }
    eprintln!("kills (delay, committed epoch): {kills:?}");
    if !finished {
        let args = match run.join("config.json").exists() {
            true => resume_args(&run),
            false => new_run(&data, &run),
        };
        assert!(exporter(&args).status().unwrap().success());
    }

    let (expected, got) = (state(&reference), state(&run));
    assert_eq!(got, expected, "the committed state");
    assert_eq!(figures(&run), figures(&reference), "the metrics");
    assert_eq!(files(&run), files(&reference), "the run folder's files");
    let config_text = std::fs::read_to_string(reference.join("config.json")).unwrap();
    let config: TrainingConfig = serde_json::from_str(&config_text).unwrap();
    for name in [&expected.model, &expected.best_weights]
        .into_iter()
        .chain(&expected.ema)
    {
        assert!(
            weights(&config, &run.join(name)) == weights(&config, &reference.join(name)),
            "{name} differs from the uninterrupted run's"
        );
    }
}
