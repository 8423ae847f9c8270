//! Account naming.
//!
//! A transfer of `amount` from `debit` to `credit` does `balance[debit] -= amount` and
//! `balance[credit] += amount`, so the sum of all balances is always zero. Platform and
//! clearing accounts may go negative; user accounts may not (see [`no_overdraft`]).

/// Where spent credits end up.
pub const REVENUE: &str = "platform:revenue";
/// The source of granted credits.
pub const GRANTS: &str = "platform:grants";
/// The source of bonus credits.
pub const BONUSES: &str = "platform:bonuses";
/// The counter-account of manual adjustments.
pub const ADJUSTMENTS: &str = "platform:adjustments";

/// The platform's accounts. They exist from the start (a migration creates them), so a batch
/// never has to create one.
pub const PLATFORM: [&str; 4] = [REVENUE, GRANTS, BONUSES, ADJUSTMENTS];

/// A user's spendable balance: `user:{id}:available`.
pub fn available(user_id: &str) -> String {
    format!("user:{user_id}:available")
}

/// A user's credits reserved for running jobs: `user:{id}:held`.
pub fn held(user_id: &str) -> String {
    format!("user:{user_id}:held")
}

/// The clearing account of a payment rail: `clearing:{rail}`.
pub fn clearing(rail: &str) -> String {
    format!("clearing:{rail}")
}

/// Whether the balance of `account` must stay `>= 0`: true for `user:*:available` and
/// `user:*:held`; platform and clearing accounts may go negative.
pub fn no_overdraft(account: &str) -> bool {
    account
        .strip_prefix("user:")
        .is_some_and(|rest| rest.ends_with(":available") || rest.ends_with(":held"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_overdraft_rules() {
        assert_eq!(available("u1"), "user:u1:available");
        assert_eq!(held("u1"), "user:u1:held");
        assert_eq!(clearing("stripe"), "clearing:stripe");
        assert!(no_overdraft(&available("u1")));
        assert!(no_overdraft(&held("a:b")));
        for free in [
            REVENUE,
            GRANTS,
            BONUSES,
            ADJUSTMENTS,
            "clearing:stripe",
            "user:u1:other",
        ] {
            assert!(!no_overdraft(free), "{free}");
        }
        assert!(no_overdraft("user::held"));
        assert!(!no_overdraft("user:held"));
    }
}
