//! How many cores tract's matrix products use. One executor for the whole process: tract reads
//! it on every run, so set it once at start-up, before classifying.

use std::sync::Arc;
use tract_linalg::multithread::{Executor, set_default_executor};

#[derive(Debug, thiserror::Error)]
#[error("cannot start {threads} inference threads: {reason}")]
pub struct ThreadsError {
    threads: usize,
    reason: String,
}

/// Run tract's matrix products on `threads` cores; 0 means every core, 1 the calling thread
/// only (no pool: a one-thread pool only adds hand-offs). Returns the count in effect.
pub fn set_threads(threads: usize) -> Result<usize, ThreadsError> {
    let threads = match threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let executor = if threads == 1 {
        Executor::SingleThread
    } else {
        let pool = rayon::ThreadPoolBuilder::new()
            .thread_name(|i| format!("runtime-mm-{i}"))
            .num_threads(threads)
            .build()
            .map_err(|e| ThreadsError {
                threads,
                reason: e.to_string(),
            })?;
        Executor::MultiThread(Arc::new(pool))
    };
    set_default_executor(executor);
    Ok(threads)
}
