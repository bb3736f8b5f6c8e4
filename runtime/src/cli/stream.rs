//! `runtime stream`: classify a pipe of raw or MJPEG frames, one event per line.

use super::{Loaded, ModelArgs, ms};
use anyhow::{Context, Result};
use runtime::{Classifier, StreamConfig, StreamError, StreamEvent, StreamSummary};
use serde_json::json;
use std::io::Write;
use std::path::Path;

/// `WIDTHxHEIGHT` of raw stream frames.
#[derive(Clone, Copy, Default)]
pub(super) struct FrameSize {
    pub(super) width: u32,
    pub(super) height: u32,
}

impl std::str::FromStr for FrameSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parsed = s
            .split_once(['x', 'X'])
            .and_then(|(w, h)| Some((w.parse().ok()?, h.parse().ok()?)));
        match parsed {
            Some((width, height)) if width > 0 && height > 0 => Ok(FrameSize { width, height }),
            _ => Err(format!("expected WIDTHxHEIGHT such as 640x480, got {s:?}")),
        }
    }
}

pub(super) fn run(
    input: Option<&Path>,
    config: &StreamConfig,
    args: &ModelArgs,
    top_k: usize,
    json: bool,
) -> Result<bool> {
    let reader: Box<dyn std::io::Read + Send> = match input {
        None => Box::new(std::io::stdin()),
        Some(path) if path == Path::new("-") => Box::new(std::io::stdin()),
        Some(path) => Box::new(
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?,
        ),
    };
    let Loaded { model, .. } = args.load()?;
    let mut classifier = Classifier::new(model, top_k)?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let result = runtime::run_stream(&mut classifier, reader, config, |event, classifier| {
        if json {
            write_event_json(&mut out, event, classifier)?;
        } else {
            write_event_text(&mut out, event, classifier)?;
        }
        // Each record leaves at once: the reader of a pipe wants it now, not when 8 KB fill.
        out.flush()
    });
    let summary = match result {
        Ok(summary) => summary,
        // The reader of our output went away (`| head`): a normal way to end a stream.
        Err(StreamError::Stopped(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            return Ok(true);
        }
        Err(e) => return Err(e.into()),
    };
    if json {
        writeln!(out, "{}", json!({ "summary": summary }))?;
        out.flush()?;
    } else {
        eprintln!("{}", summary_text(&summary));
    }
    Ok(summary.errors == 0)
}

/// One JSON line per event, written without building a `serde_json::Value` per frame.
fn write_event_json(
    out: &mut impl Write,
    event: &StreamEvent<'_>,
    classifier: &Classifier,
) -> std::io::Result<()> {
    match *event {
        StreamEvent::Classified {
            index,
            arrival,
            top,
            latency,
            decode,
            timings,
        } => {
            let record = FrameRecord {
                frame: index,
                t_ms: ms(arrival),
                top: TopRecord { top, classifier },
                latency_ms: ms(latency),
                decode_ms: ms(decode),
                preprocess_ms: ms(timings.preprocess),
                inference_ms: ms(timings.inference),
            };
            serde_json::to_writer(&mut *out, &record)?;
        }
        StreamEvent::Failed {
            index,
            arrival,
            error,
        } => {
            let record = json!({"frame": index, "t_ms": ms(arrival), "error": error.to_string()});
            serde_json::to_writer(&mut *out, &record)?;
        }
    }
    out.write_all(b"\n")
}

#[derive(serde::Serialize)]
struct FrameRecord<'a> {
    frame: u64,
    t_ms: f64,
    top: TopRecord<'a>,
    latency_ms: f64,
    decode_ms: f64,
    preprocess_ms: f64,
    inference_ms: f64,
}

struct TopRecord<'a> {
    top: &'a runtime::TopK,
    classifier: &'a Classifier,
}

impl serde::Serialize for TopRecord<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        #[derive(serde::Serialize)]
        struct Entry<'a> {
            label: &'a str,
            class: usize,
            probability: f32,
        }
        let mut seq = serializer.serialize_seq(Some(self.top.len()))?;
        for p in self.top {
            seq.serialize_element(&Entry {
                label: self.classifier.label(p.class),
                class: p.class,
                probability: p.probability,
            })?;
        }
        seq.end()
    }
}

fn write_event_text(
    out: &mut impl Write,
    event: &StreamEvent<'_>,
    classifier: &Classifier,
) -> std::io::Result<()> {
    match *event {
        StreamEvent::Classified {
            index,
            arrival,
            top,
            latency,
            ..
        } => {
            write!(out, "frame {index} @ {:.1} ms:", ms(arrival))?;
            for p in top {
                write!(
                    out,
                    " {} {:.1}%",
                    classifier.label(p.class),
                    p.probability * 100.0
                )?;
            }
            writeln!(out, "  [{:.2} ms]", ms(latency))
        }
        StreamEvent::Failed {
            index,
            arrival,
            error,
        } => writeln!(out, "frame {index} @ {:.1} ms: error: {error}", ms(arrival)),
    }
}

fn summary_text(s: &StreamSummary) -> String {
    let quantile = |q: Option<f64>| q.map_or("-".to_string(), |v| format!("{v:.2} ms"));
    format!(
        "{} frames read: {} classified, {} dropped, {} skipped, {} errors in {:.2} s ({:.1} frames/s)\n\
         latency median {} (p99 {}), inference median {}; per frame: decode {:.2} ms, preprocess {:.2} ms, inference {:.2} ms",
        s.frames_read,
        s.classified,
        s.dropped,
        s.skipped,
        s.errors,
        s.seconds,
        s.classified_per_second,
        quantile(s.latency_ms.median),
        quantile(s.latency_ms.p99),
        quantile(s.inference_ms.median),
        s.mean_stage_ms.decode,
        s.mean_stage_ms.preprocess,
        s.mean_stage_ms.inference,
    )
}
