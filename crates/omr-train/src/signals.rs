//! Preemption requests: SIGTERM and SIGUSR1 (what SLURM sends before killing a job, see
//! `scripts/slurm/sft.sbatch`) and a first Ctrl-C set a flag that the training loop checks
//! after every micro-batch; the loop then commits a checkpoint and exits 75 ("requeue me").
//! A second Ctrl-C terminates at once, for a user who does not want to wait.

use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Clone)]
pub struct StopFlag {
    flag: Arc<AtomicBool>,
}

impl StopFlag {
    /// A flag no signal sets (library use, tests).
    pub fn new() -> StopFlag {
        StopFlag {
            flag: Arc::new(AtomicBool::new(false)),
        }
    }

    /// A flag set by SIGTERM, SIGUSR1 and the first SIGINT.
    pub fn from_signals() -> std::io::Result<StopFlag> {
        let s = StopFlag::new();
        signal_hook::flag::register_conditional_shutdown(SIGINT, 130, s.flag.clone())?;
        for sig in [SIGTERM, SIGUSR1, SIGINT] {
            signal_hook::flag::register(sig, s.flag.clone())?;
        }
        Ok(s)
    }

    pub fn request(&self) {
        self.flag.store(true, Ordering::SeqCst);
    }

    pub fn requested(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
}

impl Default for StopFlag {
    fn default() -> Self {
        StopFlag::new()
    }
}
