//! The phases a no-heap decoder goes through for each cluster, and what a
//! step does in those without decoding.

use super::{DecodeError, Step};

/// Where a no-heap decoder (`Inflate`, `Zstd`) is in the current cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// No cluster started.
    Idle,
    /// Decoding; less than a cluster out.
    Running,
    /// The cluster's bytes are decoded, the last one held back until the
    /// stream shows that the cluster ends validly there (each decoder
    /// says how).
    Held,
    /// The whole cluster is out; further input is ignored.
    Done,
    /// Failed; every further step repeats the error.
    Failed(DecodeError),
}

impl Phase {
    /// A step on `input` in a phase without decoding: `idle` (the error
    /// before [`super::Decoder::start`]), the failure again, or all input
    /// ignored once done; `None` while decoding.
    pub(super) fn quiet_step(
        self,
        input: &[u8],
        idle: &'static str,
    ) -> Option<Result<Step<'static>, DecodeError>> {
        match self {
            Phase::Idle => Some(Err(DecodeError::Unsupported(idle))),
            Phase::Failed(e) => Some(Err(e)),
            Phase::Done => Some(Ok(Step {
                consumed: input.len(),
                output: &[],
            })),
            Phase::Running | Phase::Held => None,
        }
    }
}
