//! Test data for the unit tests. The aids live in the dev-only `testutil` crate (the
//! fault-injecting wrapper too), outside this crate's API.

pub(crate) use testutil::pattern;
