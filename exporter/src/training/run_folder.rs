//! A training run's folder on disk: which files hold which epoch, and the one write that
//! commits an epoch.
//!
//! An epoch is saved in two steps. First every file it needs is written under a name carrying
//! the epoch (`model-epoch-0007.bpk`, `optimizer-epoch-0007.bpk`, with a weight average
//! `ema-epoch-0007.bpk`, and `best-epoch-0007.bpk` when the epoch is the new best), and
//! `metrics.jsonl` is rewritten with the epoch's line. Then `state.json`, which names those files
//! and carries the best epoch's figures, replaces the previous one: that rename is the commit.
//! Readers (resume, eval, export, fine-tuning) read `state.json` first and then the files it
//! names, so whatever moment a crash hits, they see one epoch's weights with that epoch's
//! figures. Files the committed state no longer names are deleted after the commit.
//!
//! A crash between the metrics and the commit leaves `metrics.jsonl` one line ahead of
//! `state.json`; resume cuts it back before training on.
//!
//! Runs written before `state.json` existed (`best.bpk` + `best.json`, `checkpoint.json` +
//! `model-<epoch>.bpk`) can still be evaluated, exported and fine-tuned from, but not resumed.

use crate::training::{BestCheckpoint, EpochMetrics, TrainError};
use serde::{Deserialize, Serialize};
use std::io::ErrorKind;
use std::path::{Component, Path, PathBuf};

pub const CONFIG_FILE: &str = "config.json";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const STATE_FILE: &str = "state.json";
pub const CURVES_FILE: &str = "curves.png";
const LEGACY_BEST_WEIGHTS: &str = "best.bpk";
const LEGACY_BEST_FILE: &str = "best.json";
const LEGACY_CHECKPOINT_FILE: &str = "checkpoint.json";

/// The files saved per epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EpochFile {
    Model,
    Optimizer,
    /// The weight average, with `--ema`.
    Average,
    /// A copy of the weights chosen as the run's result (the average's, with `--ema`).
    Best,
}

impl EpochFile {
    const ALL: [EpochFile; 4] = [
        EpochFile::Model,
        EpochFile::Optimizer,
        EpochFile::Average,
        EpochFile::Best,
    ];

    fn prefix(self) -> &'static str {
        match self {
            EpochFile::Model => "model-epoch-",
            EpochFile::Optimizer => "optimizer-epoch-",
            EpochFile::Average => "ema-epoch-",
            EpochFile::Best => "best-epoch-",
        }
    }

    /// `model-epoch-0007.bpk` and the like; `epoch` counts from 1.
    pub fn name(self, epoch: usize) -> String {
        format!("{}{epoch:04}.bpk", self.prefix())
    }

    /// Whether `name` is a file of this kind, for any epoch.
    fn matches(self, name: &str) -> bool {
        name.strip_prefix(self.prefix())
            .and_then(|rest| rest.strip_suffix(".bpk"))
            .is_some_and(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
    }
}

/// `state.json`: the last committed epoch and the files that hold it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    /// Epochs finished so far (counting from 1).
    pub epoch: usize,
    pub step: usize,
    /// The latest epoch's weights and optimizer state, which resume continues from.
    pub model: String,
    pub optimizer: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema: Option<String>,
    /// The best epoch's weights so far, and its figures.
    pub best_weights: String,
    pub best: BestCheckpoint,
}

impl RunState {
    fn files(&self) -> impl Iterator<Item = &str> {
        [&self.model, &self.optimizer, &self.best_weights]
            .into_iter()
            .chain(&self.ema)
            .map(String::as_str)
    }
}

/// Everything one epoch writes: its files (name, content), the metrics of every epoch so far,
/// and the state that commits them.
pub(crate) struct EpochSave<'a> {
    pub files: Vec<(String, Vec<u8>)>,
    pub metrics: &'a [EpochMetrics],
    pub state: RunState,
}

/// Write `save` into `run_dir`, `state.json` last, then delete what it superseded.
pub(crate) fn commit(run_dir: &Path, save: &EpochSave) -> Result<(), TrainError> {
    commit_with(run_dir, save, write_file)
}

/// [`commit`] through `write`, which tests replace to stop the sequence at any write.
fn commit_with(
    run_dir: &Path,
    save: &EpochSave,
    mut write: impl FnMut(&Path, &[u8]) -> Result<(), TrainError>,
) -> Result<(), TrainError> {
    for (name, bytes) in &save.files {
        write(&run_dir.join(name), bytes)?;
    }
    write(
        &run_dir.join(METRICS_FILE),
        metrics_text(save.metrics).as_bytes(),
    )?;
    write(&run_dir.join(STATE_FILE), json_text(&save.state).as_bytes())?;
    tidy(run_dir, Some(&save.state));
    Ok(())
}

/// Delete the epoch files `state` does not name (all of them without a state), and temporary
/// files a killed write left behind. Other files (exports, evaluations) are left alone.
pub(crate) fn tidy(run_dir: &Path, state: Option<&RunState>) {
    let Ok(entries) = std::fs::read_dir(run_dir) else {
        return;
    };
    let named: Vec<&str> = state.map(|s| s.files().collect()).unwrap_or_default();
    let ours = |name: &str| {
        [CONFIG_FILE, METRICS_FILE, STATE_FILE, CURVES_FILE].contains(&name)
            || EpochFile::ALL.iter().any(|kind| kind.matches(name))
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(name) = file_name.to_str() else {
            continue;
        };
        // `runtime::write_atomic`'s temporary files are `.NAME.RANDOM.tmp`.
        let stale_temp = name
            .strip_prefix('.')
            .and_then(|rest| rest.strip_suffix(".tmp"))
            .and_then(|rest| rest.rsplit_once('.'))
            .is_some_and(|(target, _)| ours(target));
        let superseded =
            EpochFile::ALL.iter().any(|kind| kind.matches(name)) && !named.contains(&name);
        if stale_temp || superseded {
            let path = entry.path();
            if let Err(e) = std::fs::remove_file(&path)
                && e.kind() != ErrorKind::NotFound
            {
                log::warn!("could not delete {}: {e}", path.display());
            }
        }
    }
}

/// The committed state of the run in `run_dir`, `None` before its first epoch is committed.
pub fn read_state(run_dir: &Path) -> Result<Option<RunState>, TrainError> {
    let path = run_dir.join(STATE_FILE);
    let Some(state) = read_json_if_present::<RunState>(&path)? else {
        return Ok(None);
    };
    // The names are joined to the run folder: a hand-edited state must not reach outside it.
    for name in state.files() {
        let mut components = Path::new(name).components();
        if !matches!(
            (components.next(), components.next()),
            (Some(Component::Normal(_)), None)
        ) {
            return Err(TrainError::run(
                &path,
                format!("names {name:?}, which is not a file of the run folder"),
            ));
        }
    }
    Ok(Some(state))
}

/// The state to resume the run in `run_dir` from; refuses runs written by older versions,
/// whose files cannot be committed over safely.
pub(crate) fn resumable_state(run_dir: &Path) -> Result<Option<RunState>, TrainError> {
    let state = read_state(run_dir)?;
    let legacy = [
        LEGACY_CHECKPOINT_FILE,
        LEGACY_BEST_WEIGHTS,
        LEGACY_BEST_FILE,
    ]
    .iter()
    .any(|name| run_dir.join(name).exists());
    if state.is_none() && legacy {
        return Err(TrainError::run(
            run_dir,
            "was written by an older version of the exporter (best.bpk and checkpoint.json, no \
             state.json) and cannot be resumed; it can still be evaluated, exported, or \
             fine-tuned from with --init-from",
        ));
    }
    Ok(state)
}

/// The weights a run's readers use (its best) with their figures, read in one go.
pub struct CommittedBest {
    pub path: PathBuf,
    pub bytes: Vec<u8>,
    /// Absent only in old runs that have no `best.json`.
    pub figures: Option<BestCheckpoint>,
}

/// The best weights and figures of the state committed in `run_dir` (in runs of older
/// versions, `best.bpk` and `best.json`, or the latest checkpoint without them).
pub fn read_best(run_dir: &Path) -> Result<CommittedBest, TrainError> {
    // A training process may commit a new best and delete the file named by the state this
    // reader just read. The new state then names the new file; an epoch takes far longer than
    // a read, so a couple of tries suffice.
    let mut tries = 0;
    loop {
        let Some(state) = read_state(run_dir)? else {
            return read_legacy_best(run_dir);
        };
        let path = run_dir.join(&state.best_weights);
        match std::fs::read(&path) {
            Ok(bytes) => {
                return Ok(CommittedBest {
                    path,
                    bytes,
                    figures: Some(state.best),
                });
            }
            Err(e)
                if e.kind() == ErrorKind::NotFound
                    && tries < 3
                    && read_state(run_dir)?.is_some_and(|now| now != state) =>
            {
                tries += 1;
            }
            Err(e) => return Err(TrainError::run(&path, e)),
        }
    }
}

/// `checkpoint.json` of older versions.
#[derive(Deserialize)]
struct LegacyCheckpoint {
    epoch: usize,
}

fn read_legacy_best(run_dir: &Path) -> Result<CommittedBest, TrainError> {
    let weights = run_dir.join(LEGACY_BEST_WEIGHTS);
    let (path, figures) = if weights.is_file() {
        let figures = read_json_if_present(&run_dir.join(LEGACY_BEST_FILE))?;
        (weights, figures)
    } else if let Some(checkpoint) =
        read_json_if_present::<LegacyCheckpoint>(&run_dir.join(LEGACY_CHECKPOINT_FILE))?
    {
        (
            run_dir.join(format!("model-{}.bpk", checkpoint.epoch)),
            None,
        )
    } else {
        return Err(TrainError::run(
            run_dir,
            format!("has no finished epoch yet (no {STATE_FILE})"),
        ));
    };
    let bytes = std::fs::read(&path).map_err(|e| TrainError::run(&path, e))?;
    Ok(CommittedBest {
        path,
        bytes,
        figures,
    })
}

/// The metrics of the first `epochs` epochs from `metrics.jsonl`, and whether the file holds
/// more (lines of an epoch whose commit a crash prevented), so that the caller rewrites it.
pub(crate) fn committed_metrics(
    run_dir: &Path,
    epochs: usize,
) -> Result<(Vec<EpochMetrics>, bool), TrainError> {
    let path = run_dir.join(METRICS_FILE);
    // A crash in the first epoch, before the metrics were first written, leaves no file.
    let mut metrics = match epochs == 0 && !path.exists() {
        true => Vec::new(),
        false => read_metrics(&path)?,
    };
    let stale = metrics.len() > epochs;
    metrics.truncate(epochs);
    let numbered = metrics.iter().enumerate().all(|(i, m)| m.epoch == i + 1);
    if metrics.len() < epochs || !numbered {
        return Err(TrainError::run(
            &path,
            format!(
                "does not hold epochs 1 to {epochs}, which {STATE_FILE} commits; was it edited?"
            ),
        ));
    }
    Ok((metrics, stale))
}

pub(crate) fn write_metrics(run_dir: &Path, metrics: &[EpochMetrics]) -> Result<(), TrainError> {
    write_file(
        &run_dir.join(METRICS_FILE),
        metrics_text(metrics).as_bytes(),
    )
}

pub fn read_metrics(path: &Path) -> Result<Vec<EpochMetrics>, TrainError> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::run(path, e))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| TrainError::run(path, e)))
        .collect()
}

fn metrics_text(metrics: &[EpochMetrics]) -> String {
    let mut lines = String::new();
    for m in metrics {
        lines.push_str(&serde_json::to_string(m).expect("metrics serialise"));
        lines.push('\n');
    }
    lines
}

fn json_text<T: Serialize>(value: &T) -> String {
    serde_json::to_string_pretty(value).expect("run files serialise")
}

pub(crate) fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), TrainError> {
    write_file(path, json_text(value).as_bytes())
}

pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, TrainError> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::run(path, e))?;
    parse_json(path, &text)
}

/// `None` when `path` does not exist; an error naming it when it cannot be read or parsed.
fn read_json_if_present<T: serde::de::DeserializeOwned>(
    path: &Path,
) -> Result<Option<T>, TrainError> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_json(path, &text).map(Some),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(TrainError::run(path, e)),
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T, TrainError> {
    serde_json::from_str(text).map_err(|e| TrainError::run(path, format!("unreadable ({e})")))
}

/// Every file of a run folder is written through here: a temporary file, synced, renamed over
/// the target, and the folder synced, so a crash leaves the old content or the new.
pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    runtime::write_atomic(path, bytes).map_err(|e| TrainError::run(path, e))
}

/// Create `run_dir` (and missing parents), making each new entry durable in its parent.
pub(crate) fn create(run_dir: &Path) -> Result<(), TrainError> {
    let missing: Vec<&Path> = run_dir
        .ancestors()
        .take_while(|dir| !dir.as_os_str().is_empty() && !dir.exists())
        .collect();
    std::fs::create_dir_all(run_dir).map_err(|e| TrainError::run(run_dir, e))?;
    for dir in missing {
        let parent = match dir.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        runtime::sync_dir(parent).map_err(|e| TrainError::run(parent, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(epochs: usize) -> Vec<EpochMetrics> {
        (1..=epochs)
            .map(|epoch| EpochMetrics {
                epoch,
                step: 10 * epoch,
                learning_rate: 1e-3,
                train_loss: 1.0 / epoch as f64,
                train_accuracy: 0.5,
                val_loss: Some(1.0 / epoch as f64),
                val_accuracy: Some(0.1 * epoch as f64),
                images_per_second: 100.0,
                epoch_seconds: 1.0,
                ema_val_loss: None,
                ema_val_accuracy: None,
                teacher_seconds: None,
            })
            .collect()
    }

    /// What epoch `epoch` of a run with a weight average, a new best every epoch, saves: each
    /// file's content says which epoch and kind it is.
    fn save(epoch: usize, metrics: &[EpochMetrics]) -> EpochSave<'_> {
        let state = RunState {
            epoch,
            step: 10 * epoch,
            model: EpochFile::Model.name(epoch),
            optimizer: EpochFile::Optimizer.name(epoch),
            ema: Some(EpochFile::Average.name(epoch)),
            best_weights: EpochFile::Best.name(epoch),
            best: BestCheckpoint {
                epoch,
                val_accuracy: Some(0.1 * epoch as f64),
                val_loss: Some(1.0 / epoch as f64),
            },
        };
        let files = state
            .files()
            .map(|name| (name.to_string(), content(name)))
            .collect();
        EpochSave {
            files,
            metrics: &metrics[..epoch],
            state,
        }
    }

    fn content(name: &str) -> Vec<u8> {
        format!("content of {name}").into_bytes()
    }

    #[test]
    fn a_crash_at_any_write_leaves_one_epochs_weights_with_that_epochs_figures() {
        let metrics = metrics(2);
        let writes = save(2, &metrics).files.len() + 2;
        for crash_after in 0..=writes {
            let dir = tempfile::tempdir().unwrap();
            let run = dir.path();
            commit(run, &save(1, &metrics)).unwrap();
            let mut written = 0;
            let result = commit_with(run, &save(2, &metrics), |path, bytes| {
                if written == crash_after {
                    return Err(TrainError::Invalid("killed".into()));
                }
                written += 1;
                write_file(path, bytes)
            });
            assert_eq!(result.is_ok(), crash_after == writes);

            // Readers see epoch 1 whole until the commit, epoch 2 whole after it.
            let expected = if crash_after == writes { 2 } else { 1 };
            let state = read_state(run).unwrap().unwrap();
            assert_eq!(
                state,
                save(expected, &metrics).state,
                "crash after {crash_after}"
            );
            let best = read_best(run).unwrap();
            let figures = best.figures.unwrap();
            assert_eq!(figures.epoch, expected);
            assert_eq!(best.bytes, content(&EpochFile::Best.name(figures.epoch)));
            for name in state.files() {
                assert_eq!(std::fs::read(run.join(name)).unwrap(), content(name));
            }
            // The metrics may run ahead by the uncommitted epoch; resume cuts that line.
            let (committed, stale) = committed_metrics(run, state.epoch).unwrap();
            assert_eq!(committed, metrics[..expected]);
            assert_eq!(stale, crash_after > writes - 2 && crash_after < writes);
        }
    }

    #[test]
    fn tidying_deletes_superseded_epochs_and_killed_writes_only() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path();
        let metrics = metrics(3);
        commit(run, &save(1, &metrics)).unwrap();
        // A run killed between epoch 2's commit and its tidying, and inside writes of epoch 3.
        let two = save(2, &metrics);
        for (name, bytes) in &two.files {
            write_file(&run.join(name), bytes).unwrap();
        }
        write_json(&run.join(STATE_FILE), &two.state).unwrap();
        let killed = [
            ".model-epoch-0003.bpk.a8Xk2P.tmp",
            ".state.json.Qw3rTy.tmp",
            ".metrics.jsonl.zzzzzz.tmp",
        ];
        let kept = [
            "model.onnx",
            "confusion.png",
            ".confusion.png.abcdef.tmp",
            "notes.txt",
            "model-epoch-12a.bpk",
        ];
        for name in killed.iter().chain(&kept) {
            std::fs::write(run.join(name), b"x").unwrap();
        }
        tidy(run, read_state(run).unwrap().as_ref());
        let mut left: Vec<String> = std::fs::read_dir(run)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        let mut expected: Vec<String> = two.state.files().map(String::from).collect();
        expected.extend(kept.iter().map(|n| n.to_string()));
        expected.extend([METRICS_FILE.to_string(), STATE_FILE.to_string()]);
        expected.sort();
        assert_eq!(left, expected);
    }

    #[test]
    fn a_state_naming_a_path_outside_the_run_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = metrics(1);
        let mut state = save(1, &metrics).state;
        state.best_weights = "../elsewhere.bpk".into();
        write_json(&dir.path().join(STATE_FILE), &state).unwrap();
        let err = read_best(dir.path()).err().unwrap().to_string();
        assert!(err.contains("not a file of the run folder"), "{err}");
    }
}
