//! `echo`: the result is the input. Measures the platform's own overhead.

use serde_json::Value;

use crate::context::JobFailure;

pub async fn run(input: Value) -> Result<Value, JobFailure> {
    Ok(input)
}
