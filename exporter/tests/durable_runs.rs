//! Run folders that survive interruptions: what resume refuses before it changes anything, how
//! it brings `metrics.jsonl` back in line with the committed state, and how runs written by
//! older versions (`best.bpk` + `best.json`) are read.

use exporter::Preset;
use exporter::run_folder::{self, RunState};
use exporter::training::{self, NewRun, Recipe, TrainSummary};
use std::path::{Path, PathBuf};

fn dataset(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    exporter::synthetic::write_dataset(&data, 3, 12, 20, 24, 2).unwrap();
    data
}

/// The first `stop_after` epochs of a 3-epoch schedule of the tiny preset.
fn partial_run(data: &Path, run: &Path, stop_after: usize) -> TrainSummary {
    let mut new = NewRun::new(
        data.to_path_buf(),
        Preset::Tiny,
        Recipe {
            epochs: 3,
            batch_size: 8,
            learning_rate: 3e-3,
            ..Recipe::default()
        },
    );
    new.stop_after = Some(stop_after);
    training::train(new, run, &mut ()).unwrap()
}

fn state(run: &Path) -> RunState {
    run_folder::read_state(run)
        .unwrap()
        .expect("a committed epoch")
}

#[test]
fn a_refused_resume_leaves_the_run_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let run = dir.path().join("run");
    partial_run(&data, &run, 2);
    let config = std::fs::read(run.join("config.json")).unwrap();

    // No epochs, and fewer epochs than the run has trained: refused, config.json untouched.
    let err = training::resume(&run, Some(0), None, &mut ()).unwrap_err();
    assert!(err.to_string().contains("epochs must be positive"), "{err}");
    assert_eq!(std::fs::read(run.join("config.json")).unwrap(), config);
    let err = training::resume(&run, Some(1), None, &mut ()).unwrap_err();
    assert!(
        err.to_string().contains("already trained 2 epochs"),
        "{err}"
    );
    assert_eq!(std::fs::read(run.join("config.json")).unwrap(), config);

    // A committed file that cannot be read stops the resume before config.json changes too.
    let optimizer = run.join(state(&run).optimizer);
    let saved = std::fs::read(&optimizer).unwrap();
    std::fs::write(&optimizer, b"garbage").unwrap();
    let err = training::resume(&run, Some(4), None, &mut ()).unwrap_err();
    assert!(
        err.to_string().contains("optimizer-epoch-0002.bpk"),
        "{err}"
    );
    assert_eq!(std::fs::read(run.join("config.json")).unwrap(), config);

    // A valid one is written, and used.
    std::fs::write(&optimizer, saved).unwrap();
    let summary = training::resume(&run, Some(4), None, &mut ()).unwrap();
    assert_eq!(summary.epochs.len(), 4);
    let config: training::TrainingConfig =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!(config.epochs, 4);
}

#[test]
fn resume_cuts_metrics_back_to_the_committed_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let run = dir.path().join("run");
    let first = partial_run(&data, &run, 1);
    // A crash after epoch 2's metrics line was written but before its commit leaves a line
    // that state.json does not back.
    let metrics = run.join("metrics.jsonl");
    let mut ahead = first.epochs[0].clone();
    ahead.epoch = 2;
    ahead.train_loss = 123.0;
    let mut text = std::fs::read_to_string(&metrics).unwrap();
    text.push_str(&serde_json::to_string(&ahead).unwrap());
    text.push('\n');
    std::fs::write(&metrics, text).unwrap();

    // Even a resume that trains nothing brings the file back in line with the state.
    let summary = training::resume(&run, None, Some(0), &mut ()).unwrap();
    assert_eq!(summary.epochs, first.epochs);
    assert_eq!(training::read_metrics(&metrics).unwrap(), first.epochs);

    // And one that trains numbers its epochs from the state.
    let summary = training::resume(&run, None, Some(1), &mut ()).unwrap();
    let numbers: Vec<usize> = summary.epochs.iter().map(|m| m.epoch).collect();
    assert_eq!(numbers, [1, 2]);
    assert!(summary.epochs[1].train_loss < 100.0);
    assert_eq!(state(&run).epoch, 2);
    assert_eq!(state(&run).model, "model-epoch-0002.bpk");
}

#[test]
fn resume_refuses_metrics_behind_the_committed_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let run = dir.path().join("run");
    partial_run(&data, &run, 2);
    // Epoch numbers used to come from the length of metrics.jsonl: a file cut short made a
    // resumed run save its epochs under old numbers and never get past them.
    let metrics = run.join("metrics.jsonl");
    let text = std::fs::read_to_string(&metrics).unwrap();
    std::fs::write(&metrics, text.lines().next().unwrap()).unwrap();
    let err = training::resume(&run, None, Some(1), &mut ()).unwrap_err();
    assert!(
        err.to_string().contains("metrics.jsonl") && err.to_string().contains("1 to 2"),
        "{err}"
    );
    assert_eq!(state(&run).epoch, 2);
}

/// `run` rewritten in the layout of older versions: `best.bpk` + `best.json`, and
/// `checkpoint.json` + `model-<epoch>.bpk` + `optimizer-<epoch>.bpk`.
fn make_legacy(run: &Path) -> RunState {
    let state = state(run);
    std::fs::copy(run.join(&state.best_weights), run.join("best.bpk")).unwrap();
    std::fs::write(
        run.join("best.json"),
        serde_json::to_string(&state.best).unwrap(),
    )
    .unwrap();
    std::fs::write(
        run.join("checkpoint.json"),
        serde_json::json!({
            "epoch": state.epoch,
            "step": state.step,
            "best_val_accuracy": state.best.val_accuracy,
        })
        .to_string(),
    )
    .unwrap();
    let epoch = state.epoch;
    std::fs::rename(
        run.join(&state.model),
        run.join(format!("model-{epoch}.bpk")),
    )
    .unwrap();
    std::fs::rename(
        run.join(&state.optimizer),
        run.join(format!("optimizer-{epoch}.bpk")),
    )
    .unwrap();
    std::fs::remove_file(run.join(&state.best_weights)).unwrap();
    std::fs::remove_file(run.join("state.json")).unwrap();
    state
}

#[test]
fn runs_of_older_versions_export_but_do_not_resume() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let run = dir.path().join("run");
    partial_run(&data, &run, 2);
    let state = make_legacy(&run);

    let out = dir.path().join("model.onnx");
    exporter::export::export(&run, &out, &Default::default()).unwrap();
    let metadata = exporter::export::inspect(&out).unwrap().metadata;
    let accuracy: f64 = metadata[runtime::metadata::VAL_ACCURACY].parse().unwrap();
    assert!((accuracy - state.best.val_accuracy.unwrap()).abs() < 1e-6);
    exporter::eval::eval_run(&run, &data, 64).unwrap();
    let mut tuned = NewRun::new(
        data.clone(),
        Preset::Tiny,
        Recipe {
            epochs: 1,
            batch_size: 8,
            ..Recipe::default()
        },
    );
    tuned.init_from = Some(run.clone());
    training::train(tuned, &dir.path().join("tuned"), &mut ()).unwrap();
    let tuned: training::TrainingConfig = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("tuned/config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(tuned.init_from, Some(run.join("best.bpk")));

    let err = training::resume(&run, None, None, &mut ()).unwrap_err();
    assert!(err.to_string().contains("older version"), "{err}");
    assert!(run.join("best.bpk").is_file() && run.join("model-2.bpk").is_file());
    assert!(!run.join("state.json").exists());
}

#[test]
fn export_refuses_an_unreadable_best_json() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let run = dir.path().join("run");
    partial_run(&data, &run, 1);
    make_legacy(&run);
    // It used to be dropped silently: an export without the accuracy in its metadata.
    std::fs::write(run.join("best.json"), b"{ \"epoch\": 1, \"val_acc").unwrap();
    let out = dir.path().join("model.onnx");
    let err = exporter::export::export(&run, &out, &Default::default()).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(&run.join("best.json").display().to_string()) && text.contains("unreadable"),
        "{text}"
    );
    assert!(!out.exists());
}
