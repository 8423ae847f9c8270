//! A queue's worker that starts again after it failed. Its backend never fails for a database
//! that went away (`crate::queue` waits it out); whatever else ends an apalis worker, the
//! [`Monitor`]'s restart policy ([`should_restart`]) builds it again, unless the process is
//! stopping.
//!
//! [`Monitor`]: apalis::prelude::Monitor

use apalis::prelude::{WorkerContext, WorkerError};
use tally_workflows::outage;

/// The monitor's restart policy: a worker that failed starts again unless the process is
/// stopping. The failure is logged once per outage.
pub fn should_restart(worker: &WorkerContext, error: &WorkerError) -> bool {
    if worker.is_shutting_down() {
        return false;
    }
    outage::lost(&format!("worker {}", worker.name()), error);
    true
}
