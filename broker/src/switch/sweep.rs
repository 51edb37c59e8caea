//! A cluster node's order sweep (`cluster_order_sweep_secs`): every few seconds, the job orders
//! and merged data its hub holds are compared with the open jobs in the database.
//!
//! The bus delivers at most once. A publication is lost with a server that dies while it holds
//! it, in a queue that overflows, at a subscriber the server finds too slow, or while a route
//! between servers is still forming; a node back on the bus says so ([`super::bus`]), but only
//! once it has noticed, and a route that forms later than that is missed. An order lost that
//! way would leave its job queued for good, with its device connected here and waiting. So
//! each node checks on its own: an order (or merged data) of an open job that the hub lacks is
//! delivered from the database, and one the hub still holds for a job that has ended is
//! cleared.
//!
//! A sweep reads only the open jobs' numbers and serials (their topics), from an index, on a
//! connection no batch uses; the records are read only for what it repairs. Only what was
//! wrong in two sweeps in a row is repaired: a publication on its way over the bus when the
//! database was read (a job filed or ended a moment before) arrives well within one interval,
//! so the sweep never races the bus.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::router_link::CoreOutlet;
use crate::core::{Core, OpenOrders, Outbound};

/// What one sweep found wrong; repaired if the next finds it wrong too.
#[derive(Debug, Default)]
pub struct OrderSweep {
    /// Topics of open jobs the hub lacked.
    missing: HashSet<String>,
    /// Topics the hub held for jobs that are not open.
    ended: HashSet<String>,
}

/// What a sweep repairs.
#[derive(Debug, Default, PartialEq)]
pub struct Repairs {
    /// Topics to deliver from the database, with their job's number.
    pub deliver: Vec<(String, u64)>,
    /// Topics to clear (an empty retained payload).
    pub clear: Vec<String>,
}

impl OrderSweep {
    /// Compares the open jobs' topics with those the hub `held`: the topics missing in this
    /// sweep and the last are to be delivered, those held in both for a job that is not open
    /// cleared. When some open job could not be read (`open.complete` false), nothing is
    /// cleared: its topics cannot be told apart from those of an ended job.
    pub fn step(&mut self, open: OpenOrders, held: &HashSet<String>) -> Repairs {
        let mut repairs = Repairs::default();
        let wanted: HashSet<&str> = open.topics.iter().map(|(t, _)| t.as_str()).collect();
        let mut ended = HashSet::new();
        if open.complete {
            for topic in held.iter().filter(|t| !wanted.contains(t.as_str())) {
                if self.ended.contains(topic) {
                    repairs.clear.push(topic.clone());
                } else {
                    ended.insert(topic.clone());
                }
            }
        }
        let mut missing = HashSet::new();
        for (topic, number) in open.topics {
            if held.contains(&topic) {
                continue;
            }
            if self.missing.contains(&topic) {
                repairs.deliver.push((topic, number));
            } else {
                missing.insert(topic);
            }
        }
        self.missing = missing;
        self.ended = ended;
        repairs
    }
}

/// Sweeps every `every` until `stop`: reads the open jobs' topics (off the async threads),
/// compares, reads the records of what is missing, and hands the repairs to this node's
/// sessions as the core's own publications.
pub async fn run(
    core: Arc<Core>,
    outlet: CoreOutlet,
    node: String,
    every: Duration,
    stop: CancellationToken,
) {
    let router = outlet.router_queue();
    let stats = core.shared_stats();
    let mut sweep = OrderSweep::default();
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let c = core.clone();
        let open = match tokio::task::spawn_blocking(move || c.open_order_topics()).await {
            Ok(Ok(open)) => open,
            Ok(Err(e)) => {
                // The store's own paths say it is unavailable; start over once it is back.
                debug!(node = %node, error = %e, "order sweep: could not read the open jobs");
                sweep = OrderSweep::default();
                continue;
            }
            Err(_) => return,
        };
        let repairs = sweep.step(open, &outlet.retained_device_topics());
        let publications = match publications(&core, repairs).await {
            Ok(p) => p,
            Err(e) => {
                debug!(node = %node, error = %e, "order sweep: could not read the jobs to repair");
                continue;
            }
        };
        if publications.is_empty() {
            continue;
        }
        for p in &publications {
            let what = if p.payload.is_empty() {
                "cleared (its job has ended)"
            } else {
                "delivered from the database"
            };
            info!(node = %node, topic = %p.topic, "order sweep: {what}");
        }
        warn!(node = %node, repaired = publications.len(), "order sweep: this node's orders differed from the database's open jobs in two sweeps in a row (publications lost on the cluster bus); repaired");
        stats
            .cluster_orders_repaired
            .fetch_add(publications.len() as u64, Ordering::Relaxed);
        if !super::bus::deliver(&outlet, &router, publications).await {
            return;
        }
    }
}

/// The publications that make `repairs`: the orders and merged data to deliver, read now (a
/// job that ended meanwhile has none), and an empty retained payload for each topic to clear.
async fn publications(
    core: &Arc<Core>,
    repairs: Repairs,
) -> Result<Vec<Outbound>, crate::store::StoreError> {
    let mut out = Vec::new();
    if !repairs.deliver.is_empty() {
        let wanted: HashMap<String, u64> = repairs.deliver.into_iter().collect();
        let mut numbers: Vec<u64> = wanted.values().copied().collect();
        numbers.sort_unstable();
        numbers.dedup();
        let c = core.clone();
        let read = tokio::task::spawn_blocking(move || c.orders_of(&numbers))
            .await
            .unwrap_or_else(|_| Ok(Vec::new()))?;
        // Only what was missing: an order the hub holds is not sent again for its merged data.
        out.extend(read.into_iter().filter(|o| wanted.contains_key(&o.topic)));
    }
    out.extend(repairs.clear.into_iter().map(|topic| Outbound {
        topic,
        payload: Vec::new(),
        retain: true,
    }));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(topics: &[(&str, u64)]) -> OpenOrders {
        OpenOrders {
            topics: topics.iter().map(|(t, n)| (t.to_string(), *n)).collect(),
            complete: true,
        }
    }

    fn held(topics: &[&str]) -> HashSet<String> {
        topics.iter().map(|t| t.to_string()).collect()
    }

    const A: &str = "dev/C1/jobs/J-000001";
    const A_MERGED: &str = "dev/C1/merged/J-000001";
    const B: &str = "dev/C2/jobs/J-000002";

    #[test]
    fn an_order_missing_in_two_sweeps_is_delivered_and_one_that_arrived_meanwhile_is_not() {
        let mut sweep = OrderSweep::default();
        let jobs = [(A, 1), (A_MERGED, 1), (B, 2)];
        assert_eq!(sweep.step(open(&jobs), &held(&[])), Repairs::default());
        // B's order came over the bus between the sweeps; A's order and merged data were lost.
        let mut repairs = sweep.step(open(&jobs), &held(&[B]));
        repairs.deliver.sort();
        assert_eq!(
            repairs,
            Repairs {
                deliver: vec![(A.into(), 1), (A_MERGED.into(), 1)],
                clear: vec![],
            }
        );
    }

    #[test]
    fn an_order_held_for_an_ended_job_in_two_sweeps_is_cleared() {
        let mut sweep = OrderSweep::default();
        assert_eq!(sweep.step(open(&[]), &held(&[A, B])), Repairs::default());
        // B's clear came over the bus between the sweeps; A's was lost.
        assert_eq!(
            sweep.step(open(&[]), &held(&[A])),
            Repairs {
                deliver: vec![],
                clear: vec![A.into()],
            }
        );
    }

    #[test]
    fn a_job_filed_between_the_read_and_the_look_at_the_hub_is_left_alone() {
        let mut sweep = OrderSweep::default();
        // The database was read before A was filed; its order reached the hub before the look.
        assert_eq!(sweep.step(open(&[]), &held(&[A])), Repairs::default());
        assert_eq!(sweep.step(open(&[(A, 1)]), &held(&[A])), Repairs::default());
        assert_eq!(sweep.step(open(&[(A, 1)]), &held(&[A])), Repairs::default());
    }

    #[test]
    fn nothing_is_cleared_while_an_open_job_cannot_be_read() {
        let mut sweep = OrderSweep::default();
        let unreadable = || OpenOrders {
            topics: Vec::new(),
            complete: false,
        };
        assert_eq!(sweep.step(unreadable(), &held(&[A])), Repairs::default());
        assert_eq!(sweep.step(unreadable(), &held(&[A])), Repairs::default());
    }
}
