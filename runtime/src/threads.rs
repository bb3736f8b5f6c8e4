//! How many cores tract's matrix products use. One executor for the whole process: tract reads
//! it on every run, so set it once at start-up, before classifying.

/// The thread pool could not be started, or this build cannot run the threads asked for
/// ([`set_threads`]).
#[derive(Debug, thiserror::Error)]
#[error("cannot start {threads} inference threads: {reason}")]
pub struct ThreadsError {
    threads: usize,
    reason: String,
}

/// Run tract's matrix products on `threads` cores; 0 means one per physical core, 1 the calling
/// thread only. More than the machine's logical CPUs is clamped to them, with a warning (65 535
/// used to start that many threads). Returns the count in effect.
///
/// One thread gets no pool at all: a one-thread rayon pool only adds hand-offs, and tract
/// issue #2894 has such a pool fall through to the global one.
#[cfg(feature = "threads")]
pub fn set_threads(threads: usize) -> Result<usize, ThreadsError> {
    use std::sync::Arc;
    use tract_linalg::multithread::{Executor, set_default_executor};
    let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = match threads {
        0 => physical_cores(),
        n if n > logical => {
            log::warn!(
                "{n} threads asked for on a machine with {logical} logical CPUs: using {logical}"
            );
            logical
        }
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

/// A build without the `threads` feature runs on the calling thread: 0 and 1 mean that, more
/// is an error rather than a silent single thread.
#[cfg(not(feature = "threads"))]
pub fn set_threads(threads: usize) -> Result<usize, ThreadsError> {
    match threads {
        0 | 1 => Ok(1),
        _ => Err(ThreadsError {
            threads,
            reason: "this build is single-threaded (built without the `threads` feature)".into(),
        }),
    }
}

/// Physical cores: distinct (package, core) pairs of `/proc/cpuinfo`, so SMT siblings count
/// once. ARM boards list no core ids and have no SMT: there every logical CPU is a core.
pub fn physical_cores() -> usize {
    let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
    let Ok(cpuinfo) = std::fs::read_to_string("/proc/cpuinfo") else {
        return logical;
    };
    cores_in_cpuinfo(&cpuinfo).map_or(logical, |cores| cores.min(logical))
}

fn cores_in_cpuinfo(cpuinfo: &str) -> Option<usize> {
    let mut cores = std::collections::BTreeSet::new();
    for processor in cpuinfo.split("\n\n") {
        let field = |name: &str| {
            processor.lines().find_map(|line| {
                let (key, value) = line.split_once(':')?;
                (key.trim() == name).then(|| value.trim().to_string())
            })
        };
        if let (Some(package), Some(core)) = (field("physical id"), field("core id")) {
            cores.insert((package, core));
        }
    }
    (!cores.is_empty()).then_some(cores.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(not(feature = "threads"))]
    fn a_single_threaded_build_refuses_more_threads() {
        assert_eq!(set_threads(0).unwrap(), 1);
        assert_eq!(set_threads(1).unwrap(), 1);
        let error = set_threads(4).unwrap_err().to_string();
        assert!(error.contains("single-threaded"), "{error}");
    }

    #[test]
    #[cfg(feature = "threads")]
    fn an_absurd_thread_count_is_clamped_to_the_machine() {
        let logical = std::thread::available_parallelism().unwrap().get();
        assert_eq!(set_threads(65_535).unwrap(), logical);
        assert_eq!(set_threads(1).unwrap(), 1);
    }

    #[test]
    fn smt_siblings_count_once() {
        let entry = |cpu: u32, package: u32, core: u32| {
            format!("processor\t: {cpu}\nphysical id\t: {package}\ncore id\t\t: {core}\n")
        };
        // Two packages of two cores, each with two hardware threads.
        let cpuinfo: Vec<String> = (0..8).map(|cpu| entry(cpu, cpu / 4, cpu % 2)).collect();
        assert_eq!(cores_in_cpuinfo(&cpuinfo.join("\n")), Some(4));
        // An ARM board's cpuinfo has no core ids.
        assert_eq!(
            cores_in_cpuinfo("processor\t: 0\nBogoMIPS\t: 108.00\n\n"),
            None
        );
        assert!(physical_cores() >= 1);
    }
}
