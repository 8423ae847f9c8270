//! What the transfers say about the ledger's derived state. A reservation's row (its amount,
//! state and settled amount) and a job's shown cost are stored beside the transfers, and a
//! later settle trusts the row: the audit ([`super::log::verify`]) reads them page by page
//! from its snapshot and checks each here. No I/O.
//!
//! A reservation's transfers have ids derived from its own ([`ReservationStep`]):
//! - `<id>/hold` made it: its amount is the reservation's;
//! - `<id>/settle` and `<id>/refund` settled it: what they move adds up to the hold, and the
//!   settle's amount (0 without one) is the `settled` column;
//! - `<id>/release` released it (kind `release`) or expired it (kind `expire`): all of the hold;
//! - with none of those it is pending.

use std::fmt;

use tally_ledger::{Finding, accounts};

use super::{ResState, Reservation, ReservationStep, Transfer};

/// Checks a reservation against `made`: the stored transfers whose ids are its steps' (any
/// of [`ReservationStep::ALL`], in any order).
pub fn check_reservation(r: &Reservation, made: &[&Transfer]) -> Result<(), Finding> {
    let mismatch = |why: String| Finding::ReservationMismatch {
        reservation: r.id.clone(),
        why,
    };
    let mut steps: [Option<&Transfer>; 4] = [None; 4];
    for t in made {
        let Some(step) = ReservationStep::of(&t.id, &r.id) else {
            return Err(mismatch(format!("transfer {} is none of its steps", t.id)));
        };
        check_step(r, step, t).map_err(mismatch)?;
        steps[step as usize] = Some(t);
    }
    let [hold, settle, refund, release] = steps;
    let Some(hold) = hold else {
        return Err(Finding::ReservationWithoutHold {
            reservation: r.id.clone(),
        });
    };
    if r.amount != hold.amount {
        return Err(mismatch(format!(
            "its amount is {} but its hold {} moved {}",
            r.amount, hold.id, hold.amount
        )));
    }
    let (state, settled) = match (settle, refund, release) {
        (None, None, None) => (ResState::Pending, None),
        (None, None, Some(release)) => {
            if release.amount != hold.amount {
                return Err(mismatch(format!(
                    "its release {} returned {} of the {} held",
                    release.id, release.amount, hold.amount
                )));
            }
            match release.kind.as_str() {
                "expire" => (ResState::Expired, None),
                _ => (ResState::Released, None),
            }
        }
        (settle, refund, None) => {
            let charged = settle.map_or(0, |t| t.amount);
            let back = refund.map_or(0, |t| t.amount);
            if charged.checked_add(back) != Some(hold.amount) {
                return Err(mismatch(format!(
                    "its transfers settled {charged} and refunded {back} of the {} held",
                    hold.amount
                )));
            }
            (ResState::Settled, Some(charged))
        }
        (_, _, Some(release)) => {
            return Err(mismatch(format!(
                "it was both settled and released ({})",
                release.id
            )));
        }
    };
    if r.state != state.as_str() {
        return Err(mismatch(format!(
            "its state is {} but its transfers say {}",
            r.state,
            state.as_str()
        )));
    }
    if r.settled != settled {
        let show = |n: Option<i64>| n.map_or("none".to_owned(), |n| n.to_string());
        return Err(mismatch(format!(
            "its settled amount is {} but its transfers say {}",
            show(r.settled),
            show(settled)
        )));
    }
    match (state, r.closed_at) {
        (ResState::Pending, Some(_)) => Err(mismatch("it is pending but has a closed_at".into())),
        (ResState::Pending, None) | (_, Some(_)) => Ok(()),
        (_, None) => Err(mismatch(format!("it is {} but has no closed_at", r.state))),
    }
}

/// One of the reservation's transfers: its reservation, user and job are the reservation's,
/// and it moves credits between the accounts (and with the kind) its step does.
fn check_step(r: &Reservation, step: ReservationStep, t: &Transfer) -> Result<(), String> {
    if t.reservation_id.as_deref() != Some(r.id.as_str()) {
        return Err(format!(
            "transfer {} names reservation {}",
            t.id,
            t.reservation_id.as_deref().unwrap_or("none")
        ));
    }
    if t.user_id.as_deref() != Some(r.user_id.as_str()) {
        return Err(format!(
            "it is user {}'s but transfer {} is user {}'s",
            r.user_id,
            t.id,
            t.user_id.as_deref().unwrap_or("none")
        ));
    }
    if t.job_id != r.job_id {
        return Err(format!(
            "its job is {} but transfer {}'s is {}",
            r.job_id.as_deref().unwrap_or("none"),
            t.id,
            t.job_id.as_deref().unwrap_or("none")
        ));
    }
    let (available, held) = (accounts::available(&r.user_id), accounts::held(&r.user_id));
    let (kinds, debit, credit): (&[&str], &str, &str) = match step {
        ReservationStep::Hold => (&["reserve"], &available, &held),
        ReservationStep::Settle => (&["settle"], &held, accounts::REVENUE),
        ReservationStep::Refund => (&["refund"], &held, &available),
        ReservationStep::Release => (&["release", "expire"], &held, &available),
    };
    if !kinds.contains(&t.kind.as_str()) || t.debit != debit || t.credit != credit {
        return Err(format!(
            "transfer {} ({}, {} to {}) is not what its {} moves ({}, {debit} to {credit})",
            t.id,
            t.kind,
            t.debit,
            t.credit,
            step.name(),
            kinds.join(" or ")
        ));
    }
    Ok(())
}

/// Checks a transfer that names a reservation: its id must be one of that reservation's steps.
/// (That the reservation exists is checked by counting: see [`super::log::verify`].)
pub fn check_named_reservation(t: &Transfer) -> Result<(), Finding> {
    match &t.reservation_id {
        Some(r) if ReservationStep::of(&t.id, r).is_none() => Err(Finding::TransferReservation {
            id: t.id.clone(),
            reservation: r.clone(),
            why: "but its id is none of that reservation's steps".to_owned(),
        }),
        _ => Ok(()),
    }
}

/// What a job cost, as the API shows it (`{"reserved", "settled", "transfers"}`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JobCost {
    /// Credits still held for it.
    pub reserved: i64,
    /// Credits it was charged.
    pub settled: i64,
    /// The transfers that name it.
    pub transfers: usize,
}

impl JobCost {
    /// The cost shown from the job's reservations (`(amount, state, settled)` of each): the
    /// pending ones are reserved, and each closed one's settled amount was charged.
    pub fn of_reservations<'a>(
        reservations: impl IntoIterator<Item = (i64, &'a str, Option<i64>)>,
        transfers: usize,
    ) -> JobCost {
        let mut cost = JobCost {
            transfers,
            ..JobCost::default()
        };
        for (amount, state, settled) in reservations {
            if state == ResState::Pending.as_str() {
                cost.reserved = cost.reserved.saturating_add(amount);
            }
            cost.settled = cost.settled.saturating_add(settled.unwrap_or(0));
        }
        cost
    }

    /// The cost the job's transfers (`(kind, amount)` of each) say: holds less what settling,
    /// refunds and releases took out of them are reserved; settlements were charged.
    pub fn of_transfers<'a>(transfers: impl IntoIterator<Item = (&'a str, i64)>) -> JobCost {
        let mut cost = JobCost::default();
        for (kind, amount) in transfers {
            cost.transfers += 1;
            match kind {
                "reserve" => cost.reserved = cost.reserved.saturating_add(amount),
                "settle" => {
                    cost.reserved = cost.reserved.saturating_sub(amount);
                    cost.settled = cost.settled.saturating_add(amount);
                }
                "refund" | "release" | "expire" => {
                    cost.reserved = cost.reserved.saturating_sub(amount);
                }
                _ => {}
            }
        }
        cost
    }
}

impl fmt::Display for JobCost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} reserved, {} settled, {} transfers",
            self.reserved, self.settled, self.transfers
        )
    }
}

/// A job as the audit needs it: whether the API shows its cost, and the reservation its
/// outcome settles.
#[derive(Debug, Clone)]
pub struct JobRecord {
    pub shows_cost: bool,
    pub reservation_id: Option<String>,
}

/// Checks a job named by transfers: it exists, the cost the API shows for it (from `job` and
/// its `reservations`) is what its `transfers` (`(kind, amount)`) say, and the reservation its
/// outcome will settle is one of its own.
pub fn check_job(
    id: &str,
    job: Option<&JobRecord>,
    reservations: &[&Reservation],
    transfers: &[(&str, i64)],
) -> Result<(), Finding> {
    let wrong = |why: String| Finding::JobCost {
        job: id.to_owned(),
        why,
    };
    let said = JobCost::of_transfers(transfers.iter().copied());
    let Some(job) = job else {
        return Err(wrong(format!(
            "there is no such job, but its transfers say {said}"
        )));
    };
    let shown = if job.shows_cost {
        JobCost::of_reservations(
            reservations
                .iter()
                .map(|r| (r.amount, r.state.as_str(), r.settled)),
            transfers.len(),
        )
    } else {
        JobCost::default()
    };
    if shown != said {
        return Err(wrong(format!(
            "it shows {shown} but its transfers say {said}"
        )));
    }
    match &job.reservation_id {
        Some(rid) if !reservations.iter().any(|r| &r.id == rid) => Err(wrong(format!(
            "the reservation its outcome settles, {rid}, is not one of its own"
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const USER: &str = "u1";

    fn reservation(state: ResState, settled: Option<i64>) -> Reservation {
        Reservation {
            id: "job:j1".to_owned(),
            user_id: USER.to_owned(),
            amount: 10,
            settled,
            state: state.as_str().to_owned(),
            job_id: Some("j1".to_owned()),
            expires_at: None,
            created_at: 1,
            closed_at: (state != ResState::Pending).then_some(2),
        }
    }

    fn transfer(step: ReservationStep, kind: &str, amount: i64) -> Transfer {
        let (available, held) = (accounts::available(USER), accounts::held(USER));
        let (debit, credit) = match step {
            ReservationStep::Hold => (available, held),
            ReservationStep::Settle => (held, accounts::REVENUE.to_owned()),
            ReservationStep::Refund | ReservationStep::Release => (held, available),
        };
        Transfer {
            id: step.id("job:j1"),
            seq: None,
            debit,
            credit,
            amount,
            kind: kind.to_owned(),
            user_id: Some(USER.to_owned()),
            reservation_id: Some("job:j1".to_owned()),
            job_id: Some("j1".to_owned()),
            memo: None,
            created_at: 1,
        }
    }

    fn hold() -> Transfer {
        transfer(ReservationStep::Hold, "reserve", 10)
    }

    fn why(result: Result<(), Finding>) -> String {
        match result {
            Err(Finding::ReservationMismatch { why, .. }) => why,
            other => panic!("expected a mismatch, got {other:?}"),
        }
    }

    #[test]
    fn step_ids_derive_from_the_reservation() {
        assert_eq!(ReservationStep::Hold.id("job:a"), "job:a/hold");
        for step in ReservationStep::ALL {
            assert_eq!(ReservationStep::of(&step.id("job:a"), "job:a"), Some(step));
        }
        assert_eq!(ReservationStep::of("job:a/hold", "job:"), None);
        assert_eq!(ReservationStep::of("job:a:run-2/hold", "job:a"), None);
        assert_eq!(ReservationStep::of("job:a/expire", "job:a"), None);
    }

    #[test]
    fn consistent_reservations_pass() {
        let (h, pending) = (hold(), reservation(ResState::Pending, None));
        assert_eq!(check_reservation(&pending, &[&h]), Ok(()));

        let settle = transfer(ReservationStep::Settle, "settle", 4);
        let refund = transfer(ReservationStep::Refund, "refund", 6);
        let settled = reservation(ResState::Settled, Some(4));
        assert_eq!(check_reservation(&settled, &[&refund, &h, &settle]), Ok(()));

        // All charged: no refund. Nothing charged: no settle.
        let all = transfer(ReservationStep::Settle, "settle", 10);
        let r = reservation(ResState::Settled, Some(10));
        assert_eq!(check_reservation(&r, &[&h, &all]), Ok(()));
        let none = transfer(ReservationStep::Refund, "refund", 10);
        let r = reservation(ResState::Settled, Some(0));
        assert_eq!(check_reservation(&r, &[&h, &none]), Ok(()));

        let release = transfer(ReservationStep::Release, "release", 10);
        let r = reservation(ResState::Released, None);
        assert_eq!(check_reservation(&r, &[&h, &release]), Ok(()));
        let expire = transfer(ReservationStep::Release, "expire", 10);
        let r = reservation(ResState::Expired, None);
        assert_eq!(check_reservation(&r, &[&h, &expire]), Ok(()));
    }

    #[test]
    fn a_changed_row_is_named() {
        let h = hold();
        let mut r = reservation(ResState::Pending, None);
        r.amount = 11;
        assert_eq!(
            why(check_reservation(&r, &[&h])),
            "its amount is 11 but its hold job:j1/hold moved 10"
        );

        let settle = transfer(ReservationStep::Settle, "settle", 4);
        let refund = transfer(ReservationStep::Refund, "refund", 6);
        let r = reservation(ResState::Settled, Some(5));
        assert_eq!(
            why(check_reservation(&r, &[&h, &settle, &refund])),
            "its settled amount is 5 but its transfers say 4"
        );

        // Marked settled while only the hold exists: a later settle would be refused, and
        // the held credits never come back.
        let r = reservation(ResState::Settled, Some(10));
        assert_eq!(
            why(check_reservation(&r, &[&h])),
            "its state is settled but its transfers say pending"
        );
        let release = transfer(ReservationStep::Release, "release", 10);
        let r = reservation(ResState::Expired, None);
        assert_eq!(
            why(check_reservation(&r, &[&h, &release])),
            "its state is expired but its transfers say released"
        );
        let mut r = reservation(ResState::Pending, None);
        r.closed_at = Some(5);
        assert_eq!(
            why(check_reservation(&r, &[&h])),
            "it is pending but has a closed_at"
        );

        let mut r = reservation(ResState::Pending, None);
        r.user_id = "thief".to_owned();
        assert!(why(check_reservation(&r, &[&h])).contains("user thief's"));
        let mut r = reservation(ResState::Pending, None);
        r.job_id = Some("j2".to_owned());
        assert!(why(check_reservation(&r, &[&h])).contains("its job is j2"));
    }

    #[test]
    fn transfers_that_do_not_add_up_are_named() {
        let h = hold();
        let r = reservation(ResState::Settled, Some(4));
        let settle = transfer(ReservationStep::Settle, "settle", 4);
        assert_eq!(
            why(check_reservation(&r, &[&h, &settle])),
            "its transfers settled 4 and refunded 0 of the 10 held"
        );
        let release = transfer(ReservationStep::Release, "release", 10);
        assert!(why(check_reservation(&r, &[&h, &settle, &release])).contains("both"));
        let mut wrong = transfer(ReservationStep::Refund, "refund", 6);
        wrong.credit = accounts::REVENUE.to_owned();
        assert!(why(check_reservation(&r, &[&h, &settle, &wrong])).contains("is not what"));
        let stray = Transfer {
            id: "job:j1/bonus".to_owned(),
            ..hold()
        };
        assert!(why(check_reservation(&r, &[&h, &stray])).contains("none of its steps"));
    }

    #[test]
    fn a_reservation_without_its_hold_is_named() {
        let r = reservation(ResState::Pending, None);
        assert_eq!(
            check_reservation(&r, &[]),
            Err(Finding::ReservationWithoutHold {
                reservation: "job:j1".to_owned()
            })
        );
    }

    #[test]
    fn a_transfer_naming_a_reservation_must_be_one_of_its_steps() {
        assert_eq!(check_named_reservation(&hold()), Ok(()));
        let stray = Transfer {
            id: "grant-1".to_owned(),
            ..hold()
        };
        assert!(matches!(
            check_named_reservation(&stray),
            Err(Finding::TransferReservation { .. })
        ));
    }

    #[test]
    fn a_jobs_shown_cost_matches_its_transfers() {
        let h = hold();
        let settle = transfer(ReservationStep::Settle, "settle", 4);
        let refund = transfer(ReservationStep::Refund, "refund", 6);
        let first = reservation(ResState::Settled, Some(4));
        let mut retry = reservation(ResState::Pending, None);
        retry.id = "job:j1:run-2".to_owned();
        let ts = [
            (h.kind.as_str(), 10),
            (settle.kind.as_str(), 4),
            (refund.kind.as_str(), 6),
            ("reserve", 10),
        ];
        let job = JobRecord {
            shows_cost: true,
            reservation_id: Some(retry.id.clone()),
        };
        let rs = [&first, &retry];
        assert_eq!(
            JobCost::of_transfers(ts.iter().copied()),
            JobCost {
                reserved: 10,
                settled: 4,
                transfers: 4
            }
        );
        assert_eq!(check_job("j1", Some(&job), &rs, &ts), Ok(()));

        let reason = |r: Result<(), Finding>| match r {
            Err(Finding::JobCost { why, .. }) => why,
            other => panic!("expected a job cost finding, got {other:?}"),
        };
        // Its cost hidden, its reservation taken away, or its settle pointed elsewhere.
        let hidden = JobRecord {
            shows_cost: false,
            reservation_id: None,
        };
        assert_eq!(
            reason(check_job("j1", Some(&hidden), &rs, &ts)),
            "it shows 0 reserved, 0 settled, 0 transfers but its transfers say 10 reserved, 4 settled, 4 transfers"
        );
        assert!(
            reason(check_job("j1", Some(&job), &[&first], &ts)).contains("it shows 0 reserved")
        );
        let elsewhere = JobRecord {
            shows_cost: true,
            reservation_id: Some("job:j9".to_owned()),
        };
        assert!(reason(check_job("j1", Some(&elsewhere), &rs, &ts)).contains("job:j9"));
        assert!(reason(check_job("j1", None, &rs, &ts)).contains("no such job"));
    }
}
