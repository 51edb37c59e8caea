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
//! Only what was wrong in two sweeps in a row is repaired. A publication on its way over the
//! bus when the database was read (a job filed or ended a moment before) arrives well within
//! one interval, so the sweep never races the bus.

use std::collections::HashSet;
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

impl OrderSweep {
    /// Compares the database's open orders with the topics the hub `held` and returns what to
    /// deliver: the orders missing in this sweep and the last, and an empty retained payload
    /// (which clears it) for each topic held in both for a job that is not open. When some
    /// open job's record did not decode (`open.complete` false), nothing is cleared: its order
    /// cannot be told apart from one of an ended job.
    pub fn step(&mut self, open: OpenOrders, held: &HashSet<String>) -> Vec<Outbound> {
        let mut repairs = Vec::new();
        let wanted: HashSet<&str> = open.orders.iter().map(|o| o.topic.as_str()).collect();
        let mut ended = HashSet::new();
        if open.complete {
            for topic in held.iter().filter(|t| !wanted.contains(t.as_str())) {
                if self.ended.contains(topic) {
                    repairs.push(Outbound {
                        topic: topic.clone(),
                        payload: Vec::new(),
                        retain: true,
                    });
                } else {
                    ended.insert(topic.clone());
                }
            }
        }
        let mut missing = HashSet::new();
        for order in open.orders {
            if held.contains(&order.topic) {
                continue;
            }
            if self.missing.contains(&order.topic) {
                repairs.push(order);
            } else {
                missing.insert(order.topic);
            }
        }
        self.missing = missing;
        self.ended = ended;
        repairs
    }
}

/// Sweeps every `every` until `stop`: reads the open orders (off the async threads), compares,
/// and hands the repairs to this node's sessions as the core's own publications.
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
        let open = match tokio::task::spawn_blocking(move || c.open_orders()).await {
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
        if repairs.is_empty() {
            continue;
        }
        for r in &repairs {
            let what = if r.payload.is_empty() {
                "cleared (its job has ended)"
            } else {
                "delivered from the database"
            };
            info!(node = %node, topic = %r.topic, "order sweep: {what}");
        }
        warn!(node = %node, repaired = repairs.len(), "order sweep: this node's orders differed from the database's open jobs in two sweeps in a row (publications lost on the cluster bus); repaired");
        stats
            .cluster_orders_repaired
            .fetch_add(repairs.len() as u64, Ordering::Relaxed);
        if !super::bus::deliver(&outlet, &router, repairs).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(topic: &str) -> Outbound {
        Outbound {
            topic: topic.into(),
            payload: b"order".to_vec(),
            retain: true,
        }
    }

    fn open(topics: &[&str]) -> OpenOrders {
        OpenOrders {
            orders: topics.iter().map(|t| order(t)).collect(),
            complete: true,
        }
    }

    fn held(topics: &[&str]) -> HashSet<String> {
        topics.iter().map(|t| t.to_string()).collect()
    }

    fn topics(repairs: &[Outbound]) -> Vec<(&str, bool)> {
        let mut t: Vec<_> = repairs
            .iter()
            .map(|r| (r.topic.as_str(), r.payload.is_empty()))
            .collect();
        t.sort();
        t
    }

    #[test]
    fn an_order_missing_in_two_sweeps_is_delivered_and_one_that_arrived_meanwhile_is_not() {
        let mut sweep = OrderSweep::default();
        let a = "dev/C1/jobs/J-000001";
        let b = "dev/C2/jobs/J-000002";
        assert!(sweep.step(open(&[a, b]), &held(&[])).is_empty());
        // B's order came over the bus between the sweeps; A's was lost.
        let repairs = sweep.step(open(&[a, b]), &held(&[b]));
        assert_eq!(topics(&repairs), [(a, false)]);
        assert_eq!(repairs[0].payload, b"order");
    }

    #[test]
    fn an_order_held_for_an_ended_job_in_two_sweeps_is_cleared() {
        let mut sweep = OrderSweep::default();
        let a = "dev/C1/jobs/J-000001";
        let b = "dev/C2/merged/J-000002";
        assert!(sweep.step(open(&[]), &held(&[a, b])).is_empty());
        // B's clear came over the bus between the sweeps; A's was lost.
        let repairs = sweep.step(open(&[]), &held(&[a]));
        assert_eq!(topics(&repairs), [(a, true)]);
    }

    #[test]
    fn a_job_filed_between_the_read_and_the_look_at_the_hub_is_left_alone() {
        let mut sweep = OrderSweep::default();
        let a = "dev/C1/jobs/J-000001";
        // The database was read before A was filed; its order reached the hub before the look.
        assert!(sweep.step(open(&[]), &held(&[a])).is_empty());
        assert!(sweep.step(open(&[a]), &held(&[a])).is_empty());
        assert!(sweep.step(open(&[a]), &held(&[a])).is_empty());
    }

    #[test]
    fn nothing_is_cleared_while_an_open_job_does_not_decode() {
        let mut sweep = OrderSweep::default();
        let a = "dev/C1/jobs/J-000001";
        let unreadable = || OpenOrders {
            orders: Vec::new(),
            complete: false,
        };
        assert!(sweep.step(unreadable(), &held(&[a])).is_empty());
        assert!(sweep.step(unreadable(), &held(&[a])).is_empty());
    }
}
