//! A parent's view of its children's devices: presence told in parts, a child lost and back, and
//! the routes that follow a device to the child it is on.

use protocol::relay::ChildPresence;
use protocol::{Envelope, RelayId};

use super::*;
use crate::core::relay::RelaySettings;
use crate::relays::{Assignments, RelayAssignment};

fn parent(dir: &tempfile::TempDir) -> Core {
    let core = open(dir);
    let assignments = Assignments::new(&[RelayAssignment {
        id: RelayId::parse("R1").unwrap(),
        serials: vec!["C*".into()],
    }])
    .unwrap();
    core.configure_relays(RelaySettings {
        forward_to_parent: false,
        assignments,
    });
    core
}

fn told(core: &Core, msg: &ChildPresence) {
    let payload = Envelope::new(0, t(9, 0), msg).to_cbor().unwrap();
    core.child_presence_recorded(&RelayId::parse("R1").unwrap(), &payload, t(9, 0))
        .unwrap();
}

#[test]
fn a_whole_set_in_parts_counts_once_it_is_complete_and_a_lost_child_makes_its_devices_unreachable()
{
    let dir = tempfile::tempdir().unwrap();
    let core = parent(&dir);
    let r1 = RelayId::parse("R1").unwrap();
    core.session_events(
        vec![SessionEvent::Relay {
            relay: r1.clone(),
            online: true,
        }],
        t(9, 0),
    )
    .unwrap();
    // 4,500 devices (and one the child may not speak for) in three parts.
    let mut serials: Vec<Serial> = (0..4500).map(|i| serial(&format!("C{i}"))).collect();
    serials.push(serial("X9"));
    let parts = ChildPresence::whole(serials);
    told(&core, &parts[0]);
    told(&core, &parts[1]);
    assert!(!core.is_online(&serial("C1")), "not before the last part");
    told(&core, &parts[2]);
    assert!(core.is_online(&serial("C1")) && core.is_online(&serial("C4499")));
    assert!(!core.is_online(&serial("X9")), "not R1's to speak for");
    assert_eq!(core.child_routes().get("C42"), Some(r1.clone()));
    assert_eq!(core.child_of(&serial("C42")), Some((r1.clone(), true)));

    // A reconnect whose new session opens before the old one's end is seen: still connected,
    // nothing lost.
    let session = |online| SessionEvent::Relay {
        relay: r1.clone(),
        online,
    };
    core.session_events(vec![session(true), session(false)], t(9, 1))
        .unwrap();
    assert!(
        core.is_online(&serial("C1")),
        "the newer session still holds R1's devices"
    );

    // R1's own session is lost: its devices are unreachable, not online.
    core.session_events(
        vec![SessionEvent::Relay {
            relay: r1.clone(),
            online: false,
        }],
        t(9, 1),
    )
    .unwrap();
    assert!(!core.is_online(&serial("C1")));
    assert_eq!(core.child_of(&serial("C1")), Some((r1.clone(), false)));
    let views = core.relay_views();
    assert_eq!(
        (
            views[0].connected,
            views[0].devices_online,
            views[0].devices_unreachable
        ),
        (false, 0, 4500)
    );

    // Back with only C1: C1 online again, the rest offline (no longer unreachable).
    told(&core, &ChildPresence::whole(vec![serial("C1")])[0]);
    assert!(core.is_online(&serial("C1")) && !core.is_online(&serial("C2")));
    assert_eq!(core.child_of(&serial("C2")), None);
}
