//! `ledger.expire`: releases the reservations whose time is up. Made by the platform's cron
//! schedule of the same name, one job per tick (see `tally_workflows::cron`).

use serde_json::json;
use tally_workflows::{
    kinds::Kind,
    ledger::log::{EXPIRE, ExpireInput, expire_due},
    now_ms,
};

use super::{Prefetched, Ran, Runner};
use crate::{
    ai::Services,
    context::{JobContext, JobFailure},
};

/// Reservations released per statement batch.
const BATCH: usize = 1000;
/// Batches one job releases at most; what is left waits for the next tick.
const MAX_BATCHES: usize = 100;

pub struct LedgerExpire;

impl Runner for LedgerExpire {
    type Input = ExpireInput;

    fn kind(&self) -> &'static Kind {
        &EXPIRE
    }

    async fn run(
        &self,
        _: ExpireInput,
        ctx: &mut JobContext,
        _: &Services,
        _: Prefetched,
    ) -> Result<Ran, JobFailure> {
        let now = now_ms();
        let mut expired = 0;
        for _ in 0..MAX_BATCHES {
            let n = expire_due(ctx.db(), now, BATCH)
                .await
                .map_err(JobFailure::Db)?;
            expired += n;
            if n < BATCH {
                break;
            }
        }
        Ok(Ran::plain(json!({ "expired": expired })))
    }
}
