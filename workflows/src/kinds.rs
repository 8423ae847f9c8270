//! Job kinds as plug-ins. A capability describes each of its kinds with a [`Kind`]: its name,
//! its queue, the typed input it accepts (parsed at submission, so a job that can never run is
//! refused with a 422 naming the field, not stored), whether users may submit it through
//! `POST /v1/jobs`, and its price rule. [`REGISTRY`] lists them all; nothing else in the engine
//! or the API matches on kind names. (A worker runs a kind through its runner, registered with
//! the same [`Kind`] in `tally-workers`.)

use serde::{Deserialize, de::DeserializeOwned};
use serde_json::Value;

/// How a kind's credits are held at submission and settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PriceRule {
    /// The configuration's `[pricing]` table by kind name (0 when it names none), settled in
    /// full on success.
    Table,
    /// Held at an estimate by the endpoint that makes the job, settled at what the job
    /// actually used (AI jobs).
    Usage,
}

/// A kind's description.
#[derive(Debug)]
pub struct Kind {
    pub name: &'static str,
    pub queue: &'static str,
    /// Submittable through `POST /v1/jobs`. Other kinds are made by their own endpoints, which
    /// validate and price them (a chat reply through its conversation), or by the platform.
    pub public: bool,
    /// Where `POST /v1/jobs` points a caller for a kind that is not public.
    pub made_by: &'static str,
    pub price: PriceRule,
    /// Parses an input; the error names the field that is wrong and why.
    check: fn(&Value) -> Result<(), String>,
}

impl Kind {
    /// A kind whose input is `I`.
    pub const fn new<I: Input>(name: &'static str, queue: &'static str) -> Kind {
        Kind {
            name,
            queue,
            public: false,
            made_by: "the platform",
            price: PriceRule::Table,
            check: check::<I>,
        }
    }

    /// Users may submit it through `POST /v1/jobs`.
    pub const fn public(self) -> Kind {
        Kind {
            public: true,
            ..self
        }
    }

    /// Made only by `endpoint` (named in the refusal of a `POST /v1/jobs`).
    pub const fn made_by(self, endpoint: &'static str) -> Kind {
        Kind {
            made_by: endpoint,
            ..self
        }
    }

    pub const fn priced(self, price: PriceRule) -> Kind {
        Kind { price, ..self }
    }

    /// Checks an input of this kind.
    pub fn check(&self, input: &Value) -> Result<(), String> {
        (self.check)(input)
    }
}

/// A kind's typed input: parsed with serde (unknown fields refused), then checked for what
/// types alone cannot say.
pub trait Input: DeserializeOwned {
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}

/// Parses `input` as `I`; the error names the field (`input.ms: ...`).
pub fn parse<I: Input>(input: &Value) -> Result<I, String> {
    let parsed: I = serde_path_to_error::deserialize(input).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path.is_empty() || path == "." {
            format!("input: {inner}")
        } else {
            format!("input.{path}: {inner}")
        }
    })?;
    parsed.validate()?;
    Ok(parsed)
}

fn check<I: Input>(input: &Value) -> Result<(), String> {
    parse::<I>(input).map(drop)
}

/// Every kind Tally knows, from every capability.
pub static REGISTRY: &[&Kind] = &[
    &ECHO,
    &SLEEP,
    &FAIL,
    &CHAIN,
    &crate::chat::KIND,
    &crate::images::KIND,
    &crate::agents::KIND,
    &crate::ledger::log::EXPIRE,
];

/// Every kind's name.
pub fn names() -> Vec<&'static str> {
    REGISTRY.iter().map(|k| k.name).collect()
}

pub fn lookup(kind: &str) -> Option<&'static Kind> {
    REGISTRY.iter().copied().find(|k| k.name == kind)
}

/// Every queue some kind runs on, sorted.
pub fn queues() -> Vec<&'static str> {
    let mut qs: Vec<&'static str> = REGISTRY.iter().map(|k| k.queue).collect();
    qs.sort_unstable();
    qs.dedup();
    qs
}

/// Checks a kind's input; the error says which field is wrong and why (or that the kind is
/// unknown).
pub fn validate_input(kind: &str, input: &Value) -> Result<(), String> {
    match lookup(kind) {
        Some(k) => k.check(input),
        None => Err(format!(
            "unknown job kind {kind:?}; known kinds: {}",
            names().join(", ")
        )),
    }
}

// ---- the diagnostic kinds: used by tests, benchmarks and operators, on the `system` queue ----

/// `echo`: the result is the input, whatever it is.
pub static ECHO: Kind = Kind::new::<EchoInput>("echo", "system").public();
/// `sleep {"ms"}`: waits, reporting progress.
pub static SLEEP: Kind = Kind::new::<SleepInput>("sleep", "system").public();
/// `fail {"times"}`: fails that many attempts, then succeeds.
pub static FAIL: Kind = Kind::new::<FailInput>("fail", "system").public();

/// Any JSON value.
#[derive(Debug, Deserialize)]
#[serde(transparent)]
pub struct EchoInput(pub Value);
impl Input for EchoInput {}

/// The longest a `sleep` job may ask for.
pub const MAX_SLEEP_MS: u64 = 3_600_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SleepInput {
    pub ms: u64,
}
impl Input for SleepInput {
    fn validate(&self) -> Result<(), String> {
        if self.ms > MAX_SLEEP_MS {
            return Err(format!("input.ms must be at most {MAX_SLEEP_MS}"));
        }
        Ok(())
    }
}

/// The most failures a `fail` job may plan.
pub const MAX_FAILURES: u64 = 1000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailInput {
    /// Attempts that fail before one succeeds.
    pub times: u64,
}
impl Input for FailInput {
    fn validate(&self) -> Result<(), String> {
        if self.times > MAX_FAILURES {
            return Err(format!("input.times must be at most {MAX_FAILURES}"));
        }
        Ok(())
    }
}

/// `chain {"then", "if_dead", "fail_times"}`: fails `fail_times` attempts, then succeeds;
/// its success enqueues the jobs `then` lists, and its death (no attempts left) the jobs
/// `if_dead` lists, as follow-ups committed with the outcome (see [`crate::effects`]).
pub static CHAIN: Kind = Kind::new::<ChainInput>("chain", "system").public();

/// The most follow-ups a `chain` job may list.
pub const MAX_FOLLOW_UPS: usize = 100;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainInput {
    #[serde(default)]
    pub then: Vec<Step>,
    #[serde(default)]
    pub if_dead: Vec<Step>,
    #[serde(default)]
    pub fail_times: u64,
}

/// A follow-up job: a kind users may submit, and its input.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    pub kind: String,
    #[serde(default)]
    pub input: Value,
}

impl Input for ChainInput {
    fn validate(&self) -> Result<(), String> {
        if self.fail_times > MAX_FAILURES {
            return Err(format!("input.fail_times must be at most {MAX_FAILURES}"));
        }
        for (field, steps) in [("then", &self.then), ("if_dead", &self.if_dead)] {
            if steps.len() > MAX_FOLLOW_UPS {
                return Err(format!("input.{field} lists at most {MAX_FOLLOW_UPS} jobs"));
            }
            for (i, step) in steps.iter().enumerate() {
                match lookup(&step.kind) {
                    Some(k) if k.public => k
                        .check(&step.input)
                        .map_err(|e| format!("input.{field}[{i}].{e}"))?,
                    _ => {
                        return Err(format!(
                            "input.{field}[{i}].kind: {:?} is not a kind users may submit",
                            step.kind
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn validates_diagnostic_inputs() {
        assert!(validate_input("echo", &json!([1, 2])).is_ok());
        assert!(validate_input("sleep", &json!({"ms": 10})).is_ok());
        let neg = validate_input("sleep", &json!({"ms": -1})).unwrap_err();
        assert!(neg.starts_with("input.ms:"), "{neg}");
        let extra = validate_input("sleep", &json!({"ms": 1, "x": 2})).unwrap_err();
        assert!(extra.contains("unknown field `x`"), "{extra}");
        let missing = validate_input("sleep", &json!({})).unwrap_err();
        assert!(missing.contains("missing field `ms`"), "{missing}");
        assert!(validate_input("sleep", &json!({"ms": MAX_SLEEP_MS + 1})).is_err());
        let typed = validate_input("fail", &json!({"times": "2"})).unwrap_err();
        assert!(typed.starts_with("input.times:"), "{typed}");
        let nested = validate_input("chain", &json!({"then": [{"kind": "sleep", "input": {}}]}))
            .unwrap_err();
        assert!(
            nested.contains("input.then[0].input: missing field `ms`"),
            "{nested}"
        );
        let private = validate_input("chain", &json!({"if_dead": [{"kind": "chat"}]})).unwrap_err();
        assert!(private.starts_with("input.if_dead[0].kind:"), "{private}");
        assert!(
            validate_input("nope", &json!({}))
                .unwrap_err()
                .contains("unknown job kind")
        );
    }

    #[test]
    fn every_kind_has_one_name_and_a_queue() {
        let mut names = names();
        names.sort_unstable();
        let n = names.len();
        names.dedup();
        assert_eq!(names.len(), n, "two kinds share a name");
        assert!(REGISTRY.iter().all(|k| !k.queue.is_empty()));
        assert_eq!(queues(), vec!["ai", "system"]);
    }
}
