//! The job kinds Tally knows: which queue runs each, and what input each accepts. Input is
//! checked at submission so a job that can never run is refused with a 422, not stored.

use serde_json::Value;

/// A kind's static description.
#[derive(Debug, Clone, Copy)]
pub struct KindSpec {
    pub name: &'static str,
    pub queue: &'static str,
    /// Submittable through `POST /v1/jobs`. Other kinds are made by their own endpoints, which
    /// validate and price them (a chat reply through its conversation).
    pub public: bool,
}

/// Diagnostic kinds, used by tests, benchmarks and operators. They run on the `system` queue.
pub const KINDS: &[KindSpec] = &[
    KindSpec {
        name: "echo",
        queue: "system",
        public: true,
    },
    KindSpec {
        name: "sleep",
        queue: "system",
        public: true,
    },
    KindSpec {
        name: "fail",
        queue: "system",
        public: true,
    },
    KindSpec {
        name: "chat",
        queue: "ai",
        public: false,
    },
    KindSpec {
        name: "image",
        queue: "ai",
        public: false,
    },
    KindSpec {
        name: "agent",
        queue: "ai",
        public: false,
    },
];

/// The longest a `sleep` job may ask for.
pub const MAX_SLEEP_MS: u64 = 3_600_000;

/// Every kind's name.
pub fn names() -> Vec<&'static str> {
    KINDS.iter().map(|k| k.name).collect()
}

pub fn lookup(kind: &str) -> Option<&'static KindSpec> {
    KINDS.iter().find(|k| k.name == kind)
}

/// Checks a kind's input; the error says which field is wrong and why.
pub fn validate_input(kind: &str, input: &Value) -> Result<(), String> {
    match kind {
        "echo" => Ok(()),
        "sleep" => {
            let obj = input
                .as_object()
                .ok_or("sleep takes an object: {\"ms\": <milliseconds>}")?;
            only_fields(obj, &["ms"])?;
            match obj.get("ms").and_then(Value::as_u64) {
                Some(ms) if ms <= MAX_SLEEP_MS => Ok(()),
                Some(_) => Err(format!("input.ms must be at most {MAX_SLEEP_MS}")),
                None => Err("input.ms is required and must be a non-negative integer".into()),
            }
        }
        "chat" => {
            let obj = input.as_object().ok_or("chat takes an object")?;
            only_fields(
                obj,
                &["conversation_id", "model", "max_tokens", "temperature"],
            )?;
            if !obj.get("conversation_id").is_some_and(Value::is_string)
                || !obj.get("model").is_some_and(Value::is_string)
                || !obj.get("max_tokens").is_some_and(Value::is_u64)
            {
                return Err("chat needs conversation_id, model and max_tokens".into());
            }
            Ok(())
        }
        "image" => {
            let obj = input.as_object().ok_or("image takes an object")?;
            only_fields(obj, &["prompt", "model", "size", "n", "user_id"])?;
            if !obj.get("prompt").is_some_and(Value::is_string)
                || !obj.get("model").is_some_and(Value::is_string)
                || !obj.get("size").is_some_and(Value::is_string)
                || !obj.get("n").is_some_and(Value::is_u64)
            {
                return Err("image needs prompt, model, size and n".into());
            }
            Ok(())
        }
        "agent" => {
            let obj = input.as_object().ok_or("agent takes an object")?;
            only_fields(obj, &["max_tokens"])?;
            Ok(())
        }
        "fail" => {
            let obj = input
                .as_object()
                .ok_or("fail takes an object: {\"times\": <failures before success>}")?;
            only_fields(obj, &["times"])?;
            match obj.get("times").and_then(Value::as_u64) {
                Some(t) if t <= 1000 => Ok(()),
                Some(_) => Err("input.times must be at most 1000".into()),
                None => Err("input.times is required and must be a non-negative integer".into()),
            }
        }
        other => Err(format!(
            "unknown job kind {other:?}; known kinds: {}",
            names().join(", ")
        )),
    }
}

fn only_fields(obj: &serde_json::Map<String, Value>, allowed: &[&str]) -> Result<(), String> {
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(format!("input.{k} is not a field of this kind")),
        None => Ok(()),
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
        assert!(validate_input("sleep", &json!({"ms": -1})).is_err());
        assert!(validate_input("sleep", &json!({"ms": 1, "x": 2})).is_err());
        assert!(validate_input("fail", &json!({"times": "2"})).is_err());
        assert!(
            validate_input("nope", &json!({}))
                .unwrap_err()
                .contains("unknown job kind")
        );
    }
}
