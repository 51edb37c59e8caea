//! Rollouts: one job to a whole group of devices, in waves, at a rate, inside maintenance
//! windows, stopped by itself when too many fail. Built on ordinary jobs: each device gets its
//! own job (id, status, timeline, retries) and a rollout only decides when each is filed.
//!
//! [`plan`] checks a `rollouts create` and cuts the waves; [`step`] is what the relay's tick does
//! with each rollout that has not ended; [`view`] is what people and integrators read;
//! [`window`] parses and answers maintenance windows.

pub mod plan;
pub mod step;
pub mod view;
pub mod window;
