//! What a run does when saves fail: count consecutive failures, stop at the configured limit.
//!
//! RELIABILITY.md: a failed save (disk full, I/O error) keeps the previous checkpoint and the
//! run goes on; after `checkpoint.max_failures` consecutive failures it stops with exit code 66.
//! One success resets the count, since a transient error (a full disk someone cleaned up) should
//! not accumulate over a multi-day run. A failed final or preemption save has nothing to go
//! on to: the caller maps it to 66 directly.

use super::error::CheckpointError;
use std::path::PathBuf;

/// Exit code for "checkpoint writes failing" (RELIABILITY.md).
pub const EXIT_CODE_CHECKPOINT_FAILING: i32 = 66;

#[derive(Clone, Debug)]
pub struct FailureCounter {
    max_failures: usize,
    consecutive: usize,
    total: u64,
}

impl FailureCounter {
    /// `max_failures` below 1 is treated as 1 (stop at the first failure).
    pub fn new(max_failures: usize) -> Self {
        FailureCounter {
            max_failures: max_failures.max(1),
            consecutive: 0,
            total: 0,
        }
    }

    /// Feeds the outcome of a [`save`](super::save). Success → `Ok(Some(dir))`; a tolerated
    /// failure is logged and gives `Ok(None)` (train on); the failure that reaches the limit
    /// gives [`CheckpointError::TooManyFailures`], which the binary maps to exit code 66.
    pub fn record(
        &mut self,
        outcome: Result<PathBuf, CheckpointError>,
    ) -> Result<Option<PathBuf>, CheckpointError> {
        match outcome {
            Ok(dir) => {
                self.consecutive = 0;
                Ok(Some(dir))
            }
            Err(e) => {
                self.consecutive += 1;
                self.total += 1;
                if self.consecutive >= self.max_failures {
                    return Err(CheckpointError::TooManyFailures {
                        consecutive: self.consecutive,
                        max: self.max_failures,
                        last: Box::new(e),
                    });
                }
                tracing::warn!(
                    "checkpoint save failed ({} of {} tolerated in a row), training goes on: {e}",
                    self.consecutive,
                    self.max_failures
                );
                Ok(None)
            }
        }
    }

    /// Failures since the last successful save.
    pub fn consecutive(&self) -> usize {
        self.consecutive
    }

    /// Failures over the whole run, for the metrics.
    pub fn total(&self) -> u64 {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure() -> Result<PathBuf, CheckpointError> {
        Err(CheckpointError::io(
            "write",
            "/x/step-000001.tmp-1",
            std::io::Error::other("No space left on device"),
        ))
    }

    #[test]
    fn stops_after_max_consecutive_failures_and_resets_on_success() {
        let mut c = FailureCounter::new(3);
        assert_eq!(c.record(failure()).unwrap(), None);
        assert_eq!(c.record(failure()).unwrap(), None);
        let ok = c.record(Ok(PathBuf::from("/x/step-000003"))).unwrap();
        assert_eq!(ok, Some(PathBuf::from("/x/step-000003")));
        assert_eq!(c.consecutive(), 0);
        assert_eq!(c.record(failure()).unwrap(), None);
        assert_eq!(c.record(failure()).unwrap(), None);
        let err = c.record(failure()).unwrap_err();
        assert!(matches!(
            err,
            CheckpointError::TooManyFailures {
                consecutive: 3,
                max: 3,
                ..
            }
        ));
        let msg = err.to_string();
        assert!(
            msg.contains("exit code 66") && msg.contains("No space left"),
            "{msg}"
        );
        assert_eq!(c.total(), 5);
        assert!(FailureCounter::new(0).record(failure()).is_err());
    }
}
