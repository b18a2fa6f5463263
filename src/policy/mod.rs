//! Policy tags (SPEC 8): pick the newest tag of a repository that matches a policy.

pub mod range;
