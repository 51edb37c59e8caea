//! The switch: every route a message can take between the relay's sessions and its core.
//!
//! The gateway owns sockets, TLS, WebSocket, identity, the ACL and limits; the core decides what
//! is stored and what is sent. Between them, the switch owns the routes:
//!
//! - **device sessions** ([`hub`]): every device's session is a place in the hub, by serial. A
//!   device's publishes go straight into the core's queue; what the core sends devices (job
//!   orders, acks, merged data, firmware chunks, all on `dev/…`) goes straight to that device's
//!   session. Devices never touch the router.
//! - **hosts and integrators** (`crate::router`): each has a local link of its own into the
//!   embedded rumqttd router, made by the gateway; the core is one more router client
//!   ([`router_link`]), subscribed to host requests, publishing replies and the retained views.
//! - **the core's queue** (`core::Inbound`): one queue, fed by the hub and the router link; the
//!   core takes whatever is queued as one batch (group commit). On a store with a second writer
//!   (a cluster's database), devices' alarms take a queue of their own, the alarm lane's
//!   (`core::spawn_alarm_lane`), which commits beside the core's batches.
//! - **the core's output** ([`router_link::CoreOutlet`], the core's `Outlet`): after a commit,
//!   what is for devices goes to the hub, the rest to the router, in order.
//! - **presence** ([`presence`]): the gateway reports device sessions opening and closing to the
//!   core on a channel of its own, so a session never waits on the core.
//!
//! - **the cluster bus** ([`bus`], with `--cluster-bus`): what the core publishes that another
//!   node's sessions may need (orders, merged data, views) goes to the other nodes too, which
//!   hand it to their hub and router. The bus may lose a publication: [`sweep`] compares the
//!   hub's job orders with the database's open jobs every few seconds and repairs the difference.
//!
//! An uplink to a parent relay (`relays::uplink`) is one more source of `Inbound` and one more
//! destination: what the parent sends this child's devices goes to the hub.

pub mod bus;
pub mod hub;
pub mod presence;
pub mod router_link;
pub mod sweep;
