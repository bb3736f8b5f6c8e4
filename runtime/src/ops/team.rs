//! The threads that help the calling thread through one operator: a job is handed to helpers
//! that spin between jobs for a while instead of sleeping, and the calling thread works on it
//! too. A rayon pool (what tract's own operators run on) wakes a sleeping thread for every
//! operator and leaves the caller waiting: the second core gained `deit-tiny` 1.35× that way,
//! and about 1.65× with these helpers (docs/performance.md).

use std::cell::UnsafeCell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, OnceLock, TryLockError};
use std::time::{Duration, Instant};

/// How long a helper spins for the next job before it sleeps: longer than the gaps between
/// operators in one inference, far shorter than the gap between camera frames.
const SPIN: Duration = Duration::from_micros(500);

/// A job as the helpers see it: its lifetime erased, since [`Team::run`] does not return
/// while a helper may still call it.
type Job = *const (dyn Fn() + Sync);

struct Shared {
    /// Incremented for every job.
    epoch: AtomicU64,
    /// The epoch of the job helpers may still join, 0 once the caller has closed it.
    open: AtomicU64,
    /// Helpers inside a job.
    active: AtomicUsize,
    job: UnsafeCell<Job>,
    /// A helper's job panicked.
    panicked: AtomicBool,
    /// The team is gone: helpers end.
    stop: AtomicBool,
    sleepers: AtomicUsize,
    sleep: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written by the caller only while no helper reads it (before the epoch that
// publishes it, and after every helper has left the previous one); the job itself is `Sync`.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

pub(crate) struct Team {
    shared: Arc<Shared>,
    helpers: usize,
}

impl Team {
    fn new(helpers: usize) -> Team {
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            open: AtomicU64::new(0),
            active: AtomicUsize::new(0),
            job: UnsafeCell::new(&(|| {}) as &(dyn Fn() + Sync) as Job),
            panicked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
        });
        for index in 0..helpers {
            let shared = shared.clone();
            // A helper that cannot start leaves its share to the others.
            let _ = std::thread::Builder::new()
                .name(format!("runtime-helper-{index}"))
                .spawn(move || help(&shared));
        }
        Team { shared, helpers }
    }

    /// `work` on the calling thread and on every helper that joins before the caller is done
    /// with it; `work` takes its parts of the job from a shared source until none is left.
    fn run(&self, work: &(dyn Fn() + Sync)) {
        let shared = &*self.shared;
        // SAFETY: no helper is inside a job (the last `run` waited for them all), so none
        // reads `job`; the pointer is only called while this `run` has not returned.
        unsafe { *shared.job.get() = std::mem::transmute::<&(dyn Fn() + Sync), Job>(work) };
        // Open the job before announcing it: a helper that sees the new epoch must find it
        // open (announced first, a fast helper found it still closed and skipped it). Only
        // the caller holding the team writes the epoch.
        let epoch = shared.epoch.load(SeqCst) + 1;
        shared.open.store(epoch, SeqCst);
        shared.epoch.store(epoch, SeqCst);
        if shared.sleepers.load(SeqCst) > 0 {
            let _guard = shared.sleep.lock().unwrap_or_else(|e| e.into_inner());
            shared.wake.notify_all();
        }
        // Closes the job and waits for the helpers inside it, even if `work` panics here.
        struct Close<'a>(&'a Shared);
        impl Drop for Close<'_> {
            fn drop(&mut self) {
                self.0.open.store(0, SeqCst);
                while self.0.active.load(SeqCst) != 0 {
                    std::hint::spin_loop();
                }
            }
        }
        let close = Close(shared);
        work();
        drop(close);
        if shared.panicked.swap(false, SeqCst) {
            panic!("an inference helper thread panicked");
        }
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        let shared = &*self.shared;
        shared.stop.store(true, SeqCst);
        shared.epoch.fetch_add(1, SeqCst);
        let _guard = shared.sleep.lock().unwrap_or_else(|e| e.into_inner());
        shared.wake.notify_all();
    }
}

/// A helper's life: wait for a job (spinning, then asleep), join it if it is still open.
fn help(shared: &Shared) {
    // The epoch the team was made with, not the current one: the first job may be announced
    // before this thread starts.
    let mut seen = 0;
    loop {
        let started = Instant::now();
        let mut spins = 0u32;
        while shared.epoch.load(SeqCst) == seen {
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(64) || started.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            let mut guard = shared.sleep.lock().unwrap_or_else(|e| e.into_inner());
            shared.sleepers.fetch_add(1, SeqCst);
            while shared.epoch.load(SeqCst) == seen {
                guard = shared.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
            }
            shared.sleepers.fetch_sub(1, SeqCst);
        }
        if shared.stop.load(SeqCst) {
            return;
        }
        seen = shared.epoch.load(SeqCst);
        shared.active.fetch_add(1, SeqCst);
        // Either the caller sees this helper active and waits for it, or it closed the job
        // first and the helper sees that here.
        if shared.open.load(SeqCst) == seen {
            // SAFETY: the job is open, so the caller's `run` has not returned.
            let job = unsafe { &**shared.job.get() };
            if catch_unwind(AssertUnwindSafe(job)).is_err() {
                shared.panicked.store(true, SeqCst);
            }
        }
        shared.active.fetch_sub(1, SeqCst);
    }
}

/// The process's team, remade when the thread count changes.
static TEAM: OnceLock<Mutex<Option<Team>>> = OnceLock::new();

/// `work` on `threads` threads (the calling one and `threads - 1` helpers); on the calling
/// thread alone while another operator holds the team (two models run from two threads).
pub(crate) fn run_on(threads: usize, work: &(dyn Fn() + Sync)) {
    let team = TEAM.get_or_init(|| Mutex::new(None));
    let mut team = match team.try_lock() {
        Ok(team) => team,
        // A panic inside an earlier job (reported to its caller) leaves the team usable.
        Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
        Err(TryLockError::WouldBlock) => return work(),
    };
    if team.as_ref().is_none_or(|t| t.helpers != threads - 1) {
        // Dropping the old team ends its helpers: thread counts change at start-up and in
        // tests, not per frame.
        *team = Some(Team::new(threads - 1));
    }
    team.as_ref().unwrap().run(work);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Many small jobs back to back (the helper spinning between them) and some after a sleep
    /// (the helper asleep): every part is done exactly once, whoever takes it. (Which thread
    /// takes parts is `the_helper_joins_every_job`'s business: parts this small are often all
    /// gone before the helper sees the job.)
    #[test]
    fn every_part_of_every_job_is_done_once() {
        // A team of its own: the process's is shared with the other tests.
        let team = Team::new(1);
        for round in 0..2000 {
            if round % 500 == 499 {
                std::thread::sleep(SPIN * 2);
            }
            let parts: Vec<AtomicUsize> = (0..7).map(|_| AtomicUsize::new(0)).collect();
            let next = AtomicUsize::new(0);
            let work = || {
                while let Some(count) = parts.get(next.fetch_add(1, SeqCst)) {
                    count.fetch_add(1, SeqCst);
                }
            };
            team.run(&work);
            assert!(
                parts.iter().all(|count| count.load(SeqCst) == 1),
                "round {round}"
            );
        }
    }

    /// The helper joins every job it is handed, however fast it sees it: the first part
    /// waits (up to seconds) for another thread to take the second, so the two parts are done
    /// by the caller and the helper. (When the epoch was announced before the job was opened,
    /// a quick helper found it closed and skipped it; a helper that started after the first
    /// job was announced waited for the next.)
    #[test]
    fn the_helper_joins_every_job() {
        let team = Team::new(1);
        for round in 0..300 {
            let next = AtomicUsize::new(0);
            let takers = Mutex::new(Vec::new());
            let work = || {
                loop {
                    let part = next.fetch_add(1, SeqCst);
                    if part >= 2 {
                        break;
                    }
                    takers.lock().unwrap().push(std::thread::current().id());
                    let started = Instant::now();
                    while next.load(SeqCst) < 2 && started.elapsed() < Duration::from_secs(5) {
                        std::hint::spin_loop();
                    }
                }
            };
            team.run(&work);
            let takers = takers.into_inner().unwrap();
            assert!(
                takers[0] != takers[1],
                "round {round}: the helper skipped the job"
            );
        }
    }

    /// A panic in a helper's part reaches the caller, and the team works on afterwards.
    #[test]
    fn a_helpers_panic_reaches_the_caller() {
        let team = Team::new(1);
        let next = AtomicUsize::new(0);
        let caller = std::thread::current().id();
        let work = || {
            while next.fetch_add(1, SeqCst) < 2 {
                if std::thread::current().id() != caller {
                    panic!("a helper's part fails");
                }
                // The caller's part waits for the helper to take the other.
                let started = Instant::now();
                while next.load(SeqCst) < 2 && started.elapsed() < Duration::from_secs(5) {
                    std::hint::spin_loop();
                }
            }
        };
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| team.run(&work)));
        let message = outcome.unwrap_err();
        let message = message.downcast_ref::<&str>().copied().unwrap_or_default();
        assert_eq!(message, "an inference helper thread panicked");
        let done = AtomicUsize::new(0);
        team.run(&|| {
            done.fetch_add(1, SeqCst);
        });
        assert!(done.load(SeqCst) >= 1);
    }

    /// A second caller while the team is busy runs its job alone, and a nested one too.
    #[test]
    fn a_busy_team_leaves_the_job_to_its_caller() {
        let inner_ran = AtomicBool::new(false);
        let outer = || {
            if std::thread::current().name() != Some("runtime-helper-0") {
                run_on(2, &|| inner_ran.store(true, SeqCst));
            }
        };
        run_on(2, &outer);
        assert!(inner_ran.load(SeqCst));
    }
}
