//! Who may subscribe and publish where: a pure function the gateway calls for every SUBSCRIBE,
//! UNSUBSCRIBE and PUBLISH a client sends. rumqttd has no authorization of its own
//! (docs/decisions.md, D1).
//!
//! - A device touches nothing outside `dev/{its serial}/`, and publishes only `dev/{serial}/up/{kind}`.
//! - A host publishes only `host/{its id}/req`; it subscribes to `host/{its id}/…` and the read-only
//!   views `fleet/…` and `json/fleet/…`.
//! - An integrator only subscribes to the read-only views.
//! - A child relay publishes only `relay/{its id}/up/{kind}` and subscribes under `relay/{its id}/`;
//!   which devices it may speak for is the parent's `[[relays]]` assignment, checked per message.
//!
//! A wildcard may never stand in for the level that names the owner: `dev/+/jobs/+` is refused
//! even though it would match the device's own jobs.

use crate::ids::{Identity, Role};
use crate::topic::{Topic, is_valid_filter, is_valid_topic_name};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Subscribe,
    Unsubscribe,
    Publish,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Why, in words the log and the operator can act on.
    Deny(&'static str),
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow)
    }
}

/// Decides whether `who` may perform `action` on `topic` (a filter for (un)subscribe).
pub fn check(who: &Identity, action: Action, topic: &str) -> Decision {
    match action {
        Action::Publish => check_publish(who, topic),
        Action::Subscribe | Action::Unsubscribe => check_filter(who, topic),
    }
}

/// The CONNECT check: the MQTT client id must be the certificate's CN.
///
/// Hosts and integrators may also add a session suffix, `{cn}:{suffix}`, because one service desk
/// runs several sessions at once (a `watch` beside a `jobs submit`) and MQTT would otherwise kick
/// the older one off. `:` is not allowed in ids, so the suffix can never make one identity's client
/// id collide with another's. A device has one session: its serial, exactly.
pub fn check_client_id(who: &Identity, client_id: &str) -> Decision {
    if client_id == who.id() {
        return Decision::Allow;
    }
    let suffixed = client_id
        .strip_prefix(who.id())
        .and_then(|rest| rest.strip_prefix(':'))
        .is_some_and(|suffix| crate::ids::Serial::parse(suffix).is_ok());
    match who.role() {
        Role::Host | Role::Integrator if suffixed => Decision::Allow,
        Role::Device => {
            Decision::Deny("a device's client id must be its serial (the certificate's CN)")
        }
        _ => Decision::Deny("client id must be the certificate's CN, or CN:SUFFIX"),
    }
}

fn check_publish(who: &Identity, topic: &str) -> Decision {
    if !is_valid_topic_name(topic) {
        return Decision::Deny("not a valid topic name");
    }
    let Ok(parsed) = Topic::parse(topic) else {
        return Decision::Deny("topic is not in chukei's topic tree");
    };
    match (who.role(), parsed) {
        (Role::Device, Topic::DevUp { serial, .. }) if serial.as_str() == who.id() => {
            Decision::Allow
        }
        (Role::Device, _) => {
            Decision::Deny("a device publishes only on dev/{own serial}/up/{kind}")
        }
        (Role::Host, Topic::HostReq { host }) if host.as_str() == who.id() => Decision::Allow,
        (Role::Host, _) => Decision::Deny("a host publishes only on host/{own id}/req"),
        (Role::Integrator, _) => Decision::Deny("integrators are read-only"),
        (Role::Relay, Topic::RelayUp { relay } | Topic::RelayPresence { relay })
            if relay.as_str() == who.id() =>
        {
            Decision::Allow
        }
        (Role::Relay, _) => {
            Decision::Deny("a relay publishes only on relay/{own id}/up/batch and …/up/presence")
        }
    }
}

fn check_filter(who: &Identity, filter: &str) -> Decision {
    if !is_valid_filter(filter) {
        return Decision::Deny("not a valid topic filter");
    }
    let levels: Vec<&str> = filter.split('/').collect();
    let owned_prefix =
        |first: &str| levels.len() >= 3 && levels[0] == first && levels[1] == who.id();
    let is_view = match levels.as_slice() {
        ["fleet", next, ..] => !next.is_empty(),
        ["json", "fleet", next, ..] => !next.is_empty(),
        _ => false,
    };
    match who.role() {
        Role::Device if owned_prefix("dev") => Decision::Allow,
        Role::Device => Decision::Deny("a device subscribes only under dev/{own serial}/"),
        Role::Host if owned_prefix("host") || is_view => Decision::Allow,
        Role::Host => {
            Decision::Deny("a host subscribes only under host/{own id}/, fleet/ and json/fleet/")
        }
        Role::Integrator if is_view => Decision::Allow,
        Role::Integrator => {
            Decision::Deny("an integrator subscribes only under fleet/ and json/fleet/")
        }
        Role::Relay if owned_prefix("relay") => Decision::Allow,
        Role::Relay => Decision::Deny("a relay subscribes only under relay/{own id}/"),
    }
}

#[cfg(test)]
mod tests {
    use super::Action::*;
    use super::*;

    fn dev(id: &str) -> Identity {
        Identity::new(Role::Device, id).unwrap()
    }
    fn host(id: &str) -> Identity {
        Identity::new(Role::Host, id).unwrap()
    }
    fn integrator() -> Identity {
        Identity::new(Role::Integrator, "crm").unwrap()
    }
    fn relay(id: &str) -> Identity {
        Identity::new(Role::Relay, id).unwrap()
    }

    #[test]
    fn acl_table() {
        let cases = [
            // device: its own subtree only
            (dev("A1"), Subscribe, "dev/A1/jobs/+", true),
            (dev("A1"), Subscribe, "dev/A1/ack", true),
            (dev("A1"), Subscribe, "dev/A1/#", true),
            (dev("A1"), Unsubscribe, "dev/A1/jobs/+", true),
            (dev("A1"), Subscribe, "dev/B2/jobs/+", false),
            (dev("A1"), Subscribe, "dev/B2/#", false),
            (dev("A1"), Subscribe, "dev/+/jobs/+", false),
            (dev("A1"), Subscribe, "#", false),
            (dev("A1"), Subscribe, "+/A1/#", false),
            (dev("A1"), Subscribe, "dev/A1", false),
            (dev("A1"), Subscribe, "fleet/#", false),
            (dev("A1"), Subscribe, "$SYS/#", false),
            (dev("A1"), Publish, "dev/A1/up/job", true),
            (dev("A1"), Publish, "dev/A1/up/state", true),
            (dev("A1"), Publish, "dev/A1/up/merge", true),
            (dev("A1"), Publish, "dev/A1/up/fetch", true),
            (dev("A1"), Publish, "dev/A1/up/bogus", false),
            (dev("A1"), Publish, "dev/A1/up/alarm", true),
            (dev("A1"), Publish, "dev/A1/up/counters", true),
            (dev("A1"), Publish, "dev/B2/up/alarm", false),
            (dev("A1"), Publish, "fleet/A1/alarm", false),
            (dev("A1"), Subscribe, "fleet/+/alarm", false),
            (dev("A1"), Publish, "dev/A1/merged/J1", false),
            (dev("A1"), Subscribe, "dev/A1/merged/+", true),
            (dev("A1"), Subscribe, "dev/A1/blob/+", true),
            (dev("A1"), Subscribe, "dev/B2/blob/+", false),
            (dev("A1"), Publish, "dev/B2/up/job", false),
            (dev("A1"), Publish, "dev/A1/jobs/J1", false),
            (dev("A1"), Publish, "dev/A1/ack", false),
            (dev("A1"), Publish, "fleet/A1/state", false),
            (dev("A1"), Publish, "host/A1/req", false),
            // host: its own requests and the views
            (host("svc"), Publish, "host/svc/req", true),
            (host("svc"), Publish, "host/other/req", false),
            (host("svc"), Publish, "host/svc/resp", false),
            (host("svc"), Publish, "dev/A1/up/job", false),
            (host("svc"), Publish, "fleet/A1/jobs/J1", false),
            (host("svc"), Subscribe, "host/svc/resp", true),
            (host("svc"), Subscribe, "host/other/resp", false),
            (host("svc"), Subscribe, "host/+/resp", false),
            (host("svc"), Subscribe, "fleet/#", true),
            (host("svc"), Subscribe, "fleet/+/jobs/+", true),
            (host("svc"), Subscribe, "json/fleet/#", true),
            (host("svc"), Subscribe, "dev/A1/jobs/+", false),
            (host("svc"), Subscribe, "#", false),
            (host("svc"), Subscribe, "json/#", false),
            (host("svc"), Subscribe, "fleet/+/alarm", true),
            (host("svc"), Subscribe, "json/fleet/+/alarm", true),
            (host("svc"), Publish, "fleet/A1/alarm", false),
            (host("svc"), Publish, "json/fleet/A1/alarm", false),
            // integrator: read-only views
            (integrator(), Subscribe, "json/fleet/#", true),
            (integrator(), Subscribe, "fleet/A1/state", true),
            (integrator(), Subscribe, "host/crm/resp", false),
            (integrator(), Subscribe, "dev/A1/ack", false),
            (integrator(), Subscribe, "#", false),
            (integrator(), Subscribe, "+/fleet/#", false),
            (integrator(), Publish, "json/fleet/A1/state", false),
            (integrator(), Publish, "host/crm/req", false),
            (integrator(), Subscribe, "json/fleet/+/alarm", true),
            (integrator(), Publish, "json/fleet/A1/alarm", false),
            // relay: its own batches up, its own acks and orders down; never a device's topics
            (relay("R1"), Publish, "relay/R1/up/batch", true),
            (relay("R1"), Publish, "relay/R2/up/batch", false),
            (relay("R1"), Publish, "relay/R1/up/presence", true),
            (relay("R1"), Publish, "relay/R2/up/presence", false),
            (relay("R1"), Publish, "relay/R1/up/bogus", false),
            (relay("R1"), Publish, "relay/R1/ack", false),
            (relay("R1"), Publish, "dev/A1/up/state", false),
            (relay("R1"), Publish, "host/R1/req", false),
            (relay("R1"), Subscribe, "relay/R1/ack", true),
            (relay("R1"), Subscribe, "relay/R1/#", true),
            (relay("R1"), Subscribe, "relay/R2/ack", false),
            (relay("R1"), Subscribe, "relay/+/ack", false),
            (relay("R1"), Subscribe, "dev/A1/jobs/+", false),
            (relay("R1"), Subscribe, "fleet/#", false),
            (dev("R1"), Publish, "relay/R1/up/batch", false),
            (host("R1"), Publish, "relay/R1/up/batch", false),
            // malformed filters and names
            (dev("A1"), Subscribe, "dev/A1/#/x", false),
            (dev("A1"), Publish, "dev/A1/up/+", false),
            (host("svc"), Subscribe, "", false),
        ];
        for (who, action, topic, want) in cases {
            let got = check(&who, action, topic);
            assert_eq!(got.is_allowed(), want, "{who} {action:?} {topic}: {got:?}");
        }
    }

    #[test]
    fn client_id_must_match_certificate() {
        assert!(check_client_id(&dev("A1"), "A1").is_allowed());
        assert!(!check_client_id(&dev("A1"), "B2").is_allowed());
        assert!(!check_client_id(&dev("A1"), "").is_allowed());
        assert!(!check_client_id(&dev("A1"), "A1:x").is_allowed());
        assert!(check_client_id(&host("svc"), "svc:watch-1").is_allowed());
        assert!(check_client_id(&integrator(), "crm:a").is_allowed());
        assert!(!check_client_id(&host("svc"), "svc:").is_allowed());
        assert!(!check_client_id(&host("svc"), "svc-2").is_allowed());
        assert!(!check_client_id(&host("svc"), "svcx:1").is_allowed());
        assert!(!check_client_id(&host("svc"), "svc:a/b").is_allowed());
        assert!(check_client_id(&relay("R1"), "R1").is_allowed());
        assert!(!check_client_id(&relay("R1"), "R1:x").is_allowed());
    }
}
