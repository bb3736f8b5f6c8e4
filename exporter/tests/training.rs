//! Training end to end on a tiny synthetic dataset: learning, resume, bad images, and pixel
//! identity with the runtime's preprocessing.

use exporter::Preset;
use exporter::data::{Batcher, ImageFolder, ImageSet, PreparedSet, Source};
use exporter::run_folder::{self, RunState};
use exporter::training::{self, ModelOverrides, NewRun, Recipe, TrainSummary};
use rand::SeedableRng;
use std::path::Path;

/// burn seeds one random generator for the whole process, and model initialisation draws from
/// it: a test that trains while another one does would draw some of the other's numbers, and
/// the tests that compare two runs would see them differ. Every test here holds this lock.
fn one_training_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn new_run(data: &Path, epochs: usize) -> NewRun {
    NewRun::new(
        data.to_path_buf(),
        Preset::Tiny,
        Recipe {
            epochs,
            batch_size: 4,
            learning_rate: 5e-3,
            min_learning_rate: 1e-4,
            weight_decay: 0.01,
            seed: 7,
            ..Recipe::default()
        },
    )
}

fn dataset(dir: &Path) -> std::path::PathBuf {
    let data = dir.join("data");
    // Non-square 20x24 frames so the resize to the tiny preset's 16 px is exercised.
    exporter::synthetic::write_dataset(&data, 3, 30, 20, 24, 1).unwrap();
    data
}

fn train(data: &Path, run: &Path, epochs: usize) -> TrainSummary {
    training::train(new_run(data, epochs), run, &mut ()).unwrap()
}

/// The run's committed `state.json`.
fn state(run: &Path) -> RunState {
    run_folder::read_state(run)
        .unwrap()
        .expect("a committed epoch")
}

/// The first epoch of `new`'s schedule, as a call interrupted there leaves it for `resume`.
fn train_first_epoch(new: NewRun, run: &Path) -> TrainSummary {
    let first = NewRun {
        stop_after: Some(1),
        ..new
    };
    training::train(first, run, &mut ()).unwrap()
}

#[test]
fn tiny_model_learns_and_beats_chance() {
    let _exclusive = one_training_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let summary = train(&data, &dir.path().join("run"), 5);
    assert_eq!((summary.train_images, summary.val_images), (72, 18));
    assert_eq!(summary.steps, 5 * 18, "18 batches of 4 per epoch");
    let first = &summary.epochs[0];
    let last = summary.epochs.last().unwrap();
    assert!(
        last.train_loss < 0.5 * first.train_loss,
        "loss did not drop clearly: {} → {}",
        first.train_loss,
        last.train_loss
    );
    let best = summary.best.expect("a best checkpoint");
    assert!(
        best.val_accuracy.unwrap() > 0.8,
        "validation accuracy {:?} is near chance (0.33)",
        best.val_accuracy
    );
    let run = dir.path().join("run");
    let state = state(&run);
    assert_eq!((state.epoch, state.step), (5, 5 * 18));
    assert_eq!(state.best, best);
    assert_eq!(
        state.best_weights,
        format!("best-epoch-{:04}.bpk", best.epoch)
    );
    assert_eq!(
        (state.model.as_str(), state.optimizer.as_str(), &state.ema),
        ("model-epoch-0005.bpk", "optimizer-epoch-0005.bpk", &None)
    );
    // Exactly the files the state names, and the run's own: superseded epochs are deleted.
    let mut files: Vec<String> = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    let mut expected = vec![
        "config.json".to_string(),
        "curves.png".into(),
        "metrics.jsonl".into(),
        "state.json".into(),
        state.model.clone(),
        state.optimizer.clone(),
        state.best_weights.clone(),
    ];
    expected.sort();
    assert_eq!(files, expected);
}

#[test]
fn resume_continues_the_step_count_and_the_loss() {
    let _exclusive = one_training_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    // With dropout: each part of a batch draws its own mask on whichever thread runs it, and
    // a resumed epoch must draw the same ones.
    let with_dropout = || NewRun {
        overrides: ModelOverrides {
            dropout: Some(0.2),
            ..ModelOverrides::default()
        },
        ..new_run(&data, 3)
    };
    let straight = training::train(with_dropout(), &dir.path().join("straight"), &mut ()).unwrap();

    // The same 3-epoch schedule, interrupted after epoch 1 and resumed in a new call.
    let run = dir.path().join("resumed");
    let first = train_first_epoch(with_dropout(), &run);
    assert_eq!((first.steps, first.epochs.len()), (18, 1));
    let resumed = training::resume(&run, None, None, &mut ()).unwrap();
    assert_eq!(resumed.steps, straight.steps);
    assert_eq!(resumed.epochs.len(), 3);
    assert_eq!(
        resumed.epochs[0], first.epochs[0],
        "epoch 1 metrics kept from the first process"
    );
    for (a, b) in resumed.epochs.iter().zip(&straight.epochs) {
        assert!(
            (a.train_loss - b.train_loss).abs() < 1e-5
                && (a.val_loss.unwrap() - b.val_loss.unwrap()).abs() < 1e-5,
            "resumed epoch {} differs: {} vs {}",
            a.epoch,
            a.train_loss,
            b.train_loss
        );
    }
    // A run folder is never silently overwritten.
    let again = training::train(new_run(&data, 1), &run, &mut ());
    assert!(again.unwrap_err().to_string().contains("--resume"));
}

#[test]
fn the_weight_average_resumes_exactly_and_chooses_the_best_epoch() {
    let _exclusive = one_training_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let with_average = || {
        let mut run = new_run(&data, 3);
        run.recipe.ema = Some(0.9);
        run
    };
    let straight = training::train(with_average(), &dir.path().join("straight"), &mut ()).unwrap();
    for epoch in &straight.epochs {
        let average_loss = epoch
            .ema_val_loss
            .expect("the average is validated every epoch");
        assert!(
            (average_loss - epoch.val_loss.unwrap()).abs() > 1e-6,
            "epoch {}: the average scores exactly as the trained weights",
            epoch.epoch
        );
    }
    let best_average = straight
        .epochs
        .iter()
        .filter_map(|m| m.ema_val_accuracy)
        .fold(f64::NEG_INFINITY, f64::max);
    assert_eq!(straight.best.unwrap().val_accuracy, Some(best_average));

    let run = dir.path().join("resumed");
    let first = train_first_epoch(with_average(), &run);
    assert_eq!(first.epochs.len(), 1);
    assert_eq!(state(&run).ema.as_deref(), Some("ema-epoch-0001.bpk"));
    assert!(run.join("ema-epoch-0001.bpk").is_file());
    let resumed = training::resume(&run, None, None, &mut ()).unwrap();
    for (a, b) in resumed.epochs.iter().zip(&straight.epochs) {
        let (a_loss, b_loss) = (a.ema_val_loss.unwrap(), b.ema_val_loss.unwrap());
        assert!(
            (a_loss - b_loss).abs() < 1e-5,
            "resumed epoch {}: the average's loss {a_loss} vs {b_loss}",
            a.epoch
        );
    }
    assert_eq!(state(&run).ema.as_deref(), Some("ema-epoch-0003.bpk"));
    assert!(run.join("ema-epoch-0003.bpk").is_file() && !run.join("ema-epoch-0002.bpk").exists());
}

#[test]
fn a_cnn_learns_resumes_exactly_and_keeps_its_running_statistics() {
    let _exclusive = one_training_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    // The CNN pools over positions: its classes differ by texture, not place.
    let data = dir.path().join("stripes");
    exporter::synthetic::write_stripes(&data, 3, 30, 20, 24, 1).unwrap();
    let cnn = || NewRun {
        preset: Preset::CnnTiny,
        ..new_run(&data, 3)
    };
    let straight = training::train(cnn(), &dir.path().join("straight"), &mut ()).unwrap();
    let last = straight.epochs.last().unwrap();
    assert!(
        last.val_accuracy.unwrap() > 0.5,
        "3 classes, 3 epochs: {last:?}"
    );
    // Validation runs on the running statistics: had they stayed at their initial 0 and 1,
    // the stem's BatchNorm would leave its inputs unnormalised and the accuracy at chance.
    let run = dir.path().join("resumed");
    train_first_epoch(cnn(), &run);
    let resumed = training::resume(&run, None, None, &mut ()).unwrap();
    for (a, b) in resumed.epochs.iter().zip(&straight.epochs) {
        let (a_loss, b_loss) = (a.val_loss.unwrap(), b.val_loss.unwrap());
        assert!(
            (a_loss - b_loss).abs() < 1e-5,
            "resumed epoch {}: validation loss {a_loss} vs {b_loss}",
            a.epoch
        );
    }
    let model_overrides = ModelOverrides {
        dim: Some(32),
        ..ModelOverrides::default()
    };
    let refused = training::train(
        NewRun {
            overrides: model_overrides,
            ..cnn()
        },
        &dir.path().join("refused"),
        &mut (),
    )
    .unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("--dim does not apply to a CNN"),
        "{refused}"
    );
}

#[test]
fn a_vit_distils_from_a_cnn_run_resumes_exactly_and_refuses_a_foreign_teacher() {
    let _exclusive = one_training_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("stripes");
    exporter::synthetic::write_stripes(&data, 3, 30, 16, 16, 1).unwrap();
    let teacher = dir.path().join("teacher");
    let cnn = NewRun {
        preset: Preset::CnnTiny,
        ..new_run(&data, 2)
    };
    training::train(cnn, &teacher, &mut ()).unwrap();
    let student = || NewRun {
        distill_from: Some(teacher.clone()),
        ..new_run(&data, 2)
    };
    let straight = training::train(student(), &dir.path().join("straight"), &mut ()).unwrap();
    assert!(straight.epochs.iter().all(|m| m.teacher_seconds.is_some()));
    each_image_gets_its_own_teacher_logits(&straight.run_dir);
    let run = dir.path().join("resumed");
    train_first_epoch(student(), &run);
    let config: training::TrainingConfig =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    let distillation = config.distillation.expect("a distilled run says so");
    let copy = std::fs::read(run.join(training::distill::TEACHER_FILE)).unwrap();
    assert_eq!(
        distillation.teacher_fingerprint,
        training::distill::fingerprint(&copy)
    );
    assert_eq!(distillation.teacher_architecture.as_deref(), Some("resnet"));
    let resumed = training::resume(&run, None, None, &mut ()).unwrap();
    for (a, b) in resumed.epochs.iter().zip(&straight.epochs) {
        assert_eq!(a.train_loss, b.train_loss, "epoch {}", a.epoch);
        assert_eq!(a.val_loss, b.val_loss, "epoch {}", a.epoch);
    }

    // A teacher whose file changed under the run is noticed on resume.
    std::fs::write(
        run.join(training::distill::TEACHER_FILE),
        b"not the teacher",
    )
    .unwrap();
    let error = training::resume(&run, Some(3), None, &mut ()).unwrap_err();
    assert!(error.to_string().contains("not the teacher"), "{error}");

    // A teacher of other classes is refused before anything is written.
    let other = dir.path().join("other");
    exporter::synthetic::write_stripes(&other, 2, 10, 16, 16, 2).unwrap();
    let other_teacher = dir.path().join("other-teacher");
    let cnn = NewRun {
        preset: Preset::CnnTiny,
        ..new_run(&other, 1)
    };
    training::train(cnn, &other_teacher, &mut ()).unwrap();
    let refused = dir.path().join("refused");
    let error = training::train(
        NewRun {
            distill_from: Some(other_teacher),
            ..new_run(&data, 1)
        },
        &refused,
        &mut (),
    )
    .unwrap_err();
    assert!(error.to_string().contains("names the classes"), "{error}");
    assert!(!refused.exists());
}

/// The teacher runs a batch in short runs spread over the cores: a batch that is not a multiple
/// of the run length gives each image the logits it gets alone, in the batch's order.
fn each_image_gets_its_own_teacher_logits(run: &Path) {
    use burn::tensor::{Distribution, Tensor};
    let config: training::TrainingConfig =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    let file = run.join(training::distill::TEACHER_FILE);
    let mut teacher = training::distill::Teacher::new(
        std::fs::read(&file).unwrap(),
        &file,
        &config.preprocess,
        &config.classes,
    )
    .unwrap();
    let images = 11;
    let batch = Tensor::<4>::random(
        [images, 1, 16, 16],
        Distribution::Normal(0.0, 1.0),
        &exporter::backend::device(),
    );
    let together = teacher
        .logits(&batch)
        .unwrap()
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    let classes = together.len() / images;
    for i in 0..images {
        let alone = teacher.logits(&batch.clone().narrow(0, i, 1)).unwrap();
        let alone = alone.into_data().try_to_vec::<f32>().unwrap();
        let in_batch = &together[i * classes..(i + 1) * classes];
        for (a, b) in alone.iter().zip(in_batch) {
            assert!(
                (a - b).abs() <= 1e-5 * (1.0 + a.abs()),
                "image {i}: {alone:?} against {in_batch:?}"
            );
        }
    }
}

#[test]
fn a_zero_validation_fraction_trains_on_every_image_and_keeps_the_last_epoch() {
    let _exclusive = one_training_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let run = dir.path().join("run");
    let mut everything = new_run(&data, 2);
    everything.recipe.val_fraction = 0.0;
    everything.recipe.ema = Some(0.9);
    train_first_epoch(everything, &run);
    let summary = training::resume(&run, None, None, &mut ()).unwrap();
    assert_eq!((summary.train_images, summary.val_images), (90, 0));
    assert!(
        summary.epochs.iter().all(|m| m.val_accuracy.is_none()
            && m.val_loss.is_none()
            && m.ema_val_accuracy.is_none())
    );
    let best = summary.best.unwrap();
    assert_eq!((best.epoch, best.val_accuracy), (2, None));
    // The result is the last epoch's weight average, byte for byte.
    let state = state(&run);
    assert_eq!(state.best_weights, "best-epoch-0002.bpk");
    assert_eq!(
        std::fs::read(run.join(&state.best_weights)).unwrap(),
        std::fs::read(run.join(state.ema.unwrap())).unwrap()
    );
    assert!(run.join("curves.png").is_file());

    // It exports, verified on training images, without a validation accuracy in its metadata.
    let onnx = dir.path().join("model.onnx");
    exporter::export::export(&run, &onnx, &Default::default()).unwrap();
    let metadata = exporter::export::inspect(&onnx).unwrap().metadata;
    assert!(metadata.contains_key(runtime::metadata::LABELS));
    assert!(!metadata.contains_key(runtime::metadata::VAL_ACCURACY));

    // A fraction of 1 (or more) would leave nothing to train on.
    let mut nothing = new_run(&data, 1);
    nothing.recipe.val_fraction = 1.0;
    let refused = training::train(nothing, &dir.path().join("none"), &mut ());
    assert!(refused.unwrap_err().to_string().contains("[0, 1)"));
}

#[test]
fn fine_tuning_starts_from_the_source_runs_best_weights() {
    let _exclusive = one_training_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let source = dir.path().join("source");
    let trained = train(&data, &source, 4);
    let best = trained.best.unwrap();

    // A learning rate too small to move the weights: the fine-tuned model scores what the
    // source's best did, which a fresh initialisation (near ln 3 loss) would not.
    let still = Recipe {
        epochs: 1,
        learning_rate: 1e-12,
        min_learning_rate: 1e-12,
        ..new_run(&data, 1).recipe
    };
    let tuned = training::train(
        NewRun {
            init_from: Some(source.clone()),
            erase: Some(0.5),
            augment: Some(true),
            recipe: still.clone(),
            ..new_run(&data, 1)
        },
        &dir.path().join("tuned"),
        &mut (),
    )
    .unwrap();
    let (tuned_loss, best_loss) = (tuned.epochs[0].val_loss.unwrap(), best.val_loss.unwrap());
    assert!(
        (tuned_loss - best_loss).abs() < 1e-4,
        "fine-tuned validation loss {tuned_loss} vs the source's best {best_loss}"
    );
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("tuned/config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["augmentation"]["erase"], 0.5);
    // The source's best weights by the file its committed state names.
    let source_best = source.join(state(&source).best_weights);
    assert_eq!(
        config["init_from"].as_str().unwrap(),
        source_best.to_str().unwrap()
    );

    // The data must have the source's classes.
    let other = dir.path().join("other");
    exporter::synthetic::write_dataset(&other, 4, 10, 20, 24, 1).unwrap();
    let refused = training::train(
        NewRun {
            init_from: Some(source),
            recipe: still,
            ..new_run(&other, 1)
        },
        &dir.path().join("refused"),
        &mut (),
    );
    assert!(
        refused
            .unwrap_err()
            .to_string()
            .contains("fine-tuning needs the same"),
        "a class mismatch was accepted"
    );
}

#[test]
fn corrupt_images_are_skipped_and_counted() {
    let _exclusive = one_training_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    std::fs::write(
        data.join("class_0/zz_corrupt.png"),
        b"\x89PNG\r\n\x1a\nnot really",
    )
    .unwrap();
    let truncated = std::fs::read(data.join("class_1/000.png")).unwrap();
    std::fs::write(
        data.join("class_1/zz_truncated.png"),
        &truncated[..truncated.len() / 2],
    )
    .unwrap();
    let summary = train(&data, &dir.path().join("run"), 1);
    assert_eq!(summary.skipped_images, 2);
    assert_eq!(summary.train_images + summary.val_images, 90);
}

#[test]
fn loader_pixels_equal_the_runtime_preprocessing() {
    let _exclusive = one_training_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let folder = ImageFolder::scan(&data).unwrap();
    let items = &folder.items[..5];
    let set = ImageSet::load(items, &|_| {});
    let config = runtime::PreprocessConfig::new(16, 1);
    let prepared = PreparedSet::new(&set, &config).unwrap();
    let mut batcher = Batcher::new(&config).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let device = exporter::backend::device();
    let (batch, _) = batcher
        .batch(
            &Source::Prepared(&prepared),
            &[0, 1, 2, 3, 4],
            &mut rng,
            &device,
        )
        .unwrap();
    let batch = batch.into_data().try_to_vec::<f32>().unwrap();

    // The serving side: decode the file and run the runtime's pipeline, nothing shared but code.
    let mut pipeline = runtime::PatchPipeline::new(config.clone()).unwrap();
    let mut served = vec![0.0; config.tensor_len()];
    for (i, item) in items.iter().enumerate() {
        let image = runtime::decode_file(&item.path).unwrap();
        pipeline.run(&image.frame(), &mut served).unwrap();
        assert_eq!(
            &batch[i * served.len()..(i + 1) * served.len()],
            &served[..],
            "{}",
            item.path.display()
        );
    }
}

#[test]
fn a_dataset_with_one_class_or_none_is_refused() {
    let _exclusive = one_training_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let err =
        training::train(new_run(dir.path(), 1), &dir.path().join("run"), &mut ()).unwrap_err();
    assert!(err.to_string().contains("no class sub-folders"), "{err}");
    exporter::synthetic::write_dataset(&dir.path().join("one"), 1, 4, 8, 8, 0).unwrap();
    let err = training::train(
        new_run(&dir.path().join("one"), 1),
        &dir.path().join("run"),
        &mut (),
    )
    .unwrap_err();
    assert!(err.to_string().contains("single class"), "{err}");
}
