//! `echo`: the result is the input. Measures the platform's own overhead.

use tally_workflows::kinds::{ECHO, EchoInput, Kind};

use super::{Prefetched, Ran, Runner};
use crate::{
    ai::Services,
    context::{JobContext, JobFailure},
};

pub struct Echo;

impl Runner for Echo {
    type Input = EchoInput;

    fn kind(&self) -> &'static Kind {
        &ECHO
    }

    async fn run(
        &self,
        EchoInput(input): EchoInput,
        _: &mut JobContext,
        _: &Services,
        _: Prefetched,
    ) -> Result<Ran, JobFailure> {
        Ok(Ran::plain(input))
    }
}
