//! Emergencies (the seed's Fig. 5, claims 10–11) and presence (claim 42), end to end: real
//! broker, real device agents, the real `host-agent watch --alarms` and the real `mosquitto_sub`
//! of an integrator.

mod emergency;

use std::time::Instant;

use emergency::{fault, mosquitto_sub, payloads, retained_now, watch_alarms};
use harness::{TestEnv, deadline, log_time, secs};
use protocol::Role;
use serde_json::Value;

/// `alarms list [--all] --json`, parsed.
async fn alarms_json(host: &harness::Host, all: bool) -> Vec<Value> {
    let mut args = vec!["alarms", "list", "--json"];
    if all {
        args.push("--all");
    }
    let out = host.run_ok(&args).await;
    match serde_json::from_str::<Value>(&out) {
        Ok(Value::Array(a)) => a,
        other => panic!("`alarms list --json` must print an array, got {other:?}:\n{out}"),
    }
}

#[tokio::test]
async fn a_fatal_fault_reaches_watch_and_mosquitto_sub_and_a_jam_does_not() {
    let env = TestEnv::new("a_fatal_fault_reaches_watch_and_mosquitto_sub_and_a_jam_does_not");
    let broker = env.broker().start().await;
    let c1 = env.device("C1").site("Kobe 2F").start(&broker).await;
    let watch = watch_alarms(&env, &broker, "watch-alarms", false).await;
    let sub = mosquitto_sub(&env, &broker, "mosquitto-alarms", "json/fleet/+/alarm").await;

    // A paper jam first: transient, counted on the device, never an alarm (S304).
    fault(&c1, &["jam", "tray 2 feed"]).await;
    c1.wait_for_log("transient fault; counted, not reported", deadline())
        .await;

    // Then a motor failure: fatal, reported at once (S306).
    let injected = Instant::now();
    fault(&c1, &["raise", "SC-541"]).await;
    let seen = watch
        .wait_for_line("the raised SC-541 alarm", deadline(), |l| {
            l.contains("raised") && l.contains("SC-541") && l.contains("C1 (Kobe 2F)")
        })
        .await;
    let to_watch = injected.elapsed();
    sub.wait_for_log("json/fleet/C1/alarm {", deadline()).await;
    let to_mosquitto = injected.elapsed();
    assert!(seen.contains("main motor failure"), "{seen}");

    // The alarm as the integrator reads it: JSON, the device id, the code, the detail.
    let mirrored = payloads(&sub, "json/fleet/C1/alarm");
    let first = &mirrored[0]["alarms"][0];
    assert_eq!(first["serial"], "C1", "{first:#}");
    assert_eq!(first["code"], "SC-541", "{first:#}");
    assert_eq!(first["kind"], "fault", "{first:#}");
    assert_eq!(first["site"], "Kobe 2F", "{first:#}");
    assert!(first["total"].as_i64().is_some_and(|t| t > 0), "{first:#}");

    // S309: once the relay has it, the device says the fault is in progress.
    watch
        .wait_for_line("the alarm in progress", deadline(), |l| {
            l.contains("in-progress") && l.contains("SC-541")
        })
        .await;
    // Nobody ever saw the jam.
    for (who, log) in [("watch", watch.log()), ("mosquitto_sub", sub.log())] {
        assert!(
            !log.contains("JAM") && !log.contains("tray 2 feed"),
            "a transient jam must not become an alarm ({who}):\n{log}"
        );
    }
    let alarms = alarms_json(&env.host("svc", &broker), true).await;
    assert_eq!(
        alarms.len(),
        1,
        "only the fatal fault is an alarm: {alarms:#?}"
    );

    // The relay takes jobs again (S311), and the device's JAM/SC data counts both faults.
    let data = env.host("svc", &broker).get_data("C1", "jams").await;
    let jams = &data["jams"];
    assert_eq!(jams["last_jam_location"], "tray 2 feed", "{jams:#}");
    assert_eq!(jams["active_faults"], "SC-541", "{jams:#}");

    // Latency, device to relay commit (both logs on this machine's clock), and injection to
    // the two watchers (including starting the `device-agent fault` command).
    let sent = c1
        .lines_matching(|l| l.contains("fatal fault; alarm sent"))
        .first()
        .and_then(|l| log_time(l))
        .expect("the device logged the alarm");
    let stored = broker
        .lines_matching(|l| l.contains("alarm raised"))
        .first()
        .and_then(|l| log_time(l))
        .expect("the broker logged the alarm");
    eprintln!(
        "alarm latency: device → relay commit {} ms; injection → watch {} ms, → mosquitto_sub {} ms",
        (stored - sent).num_milliseconds(),
        to_watch.as_millis(),
        to_mosquitto.as_millis()
    );
}

#[tokio::test]
async fn an_alarm_raised_while_the_broker_is_down_arrives_once_it_is_back() {
    let env = TestEnv::new("an_alarm_raised_while_the_broker_is_down_arrives_once_it_is_back");
    let mut first = env.broker().start().await;
    let addr = first.addr();
    let c1 = env.device("C1").start(&first).await;
    assert!(first.stop().await.success());

    // The fault happens with no relay: the alarm waits in the device's durable outbox.
    fault(&c1, &["raise", "SC-541"]).await;
    c1.wait_for_log("fatal fault; alarm sent", deadline()).await;

    let broker = env.broker().listen(addr).start().await;
    let watch = watch_alarms(&env, &broker, "watch-alarms", true).await;
    // Retained, so a watch started after the fact sees it too; and it reaches the relay on the
    // device's reconnect (its backoff is at most 30 s).
    let line = watch
        .wait_for_line("the SC-541 alarm", secs(60), |l| l.contains("\"SC-541\""))
        .await;
    let alarm: Value = serde_json::from_str(&line).expect("watch --json prints JSON lines");
    assert_eq!(alarm["serial"], "C1");
    // The device learns it arrived and says the fault is in progress: after that, nothing of
    // this alarm is left to resend.
    broker.wait_for_log("alarm in progress", deadline()).await;
    c1.wait_for_log("alarm acknowledged by the relay", deadline())
        .await;

    let all = alarms_json(&env.host("svc", &broker), true).await;
    assert_eq!(all.len(), 1, "exactly one alarm: {all:#?}");
    assert_eq!(all[0]["status"], "in-progress", "{all:#?}");
    let raised = broker.lines_matching(|l| l.contains("alarm raised"));
    assert_eq!(raised.len(), 1, "stored once: {raised:#?}");
    let watched = watch.lines_matching(|l| l.contains("\"status\":\"raised\""));
    assert!(
        watched.len() <= 1,
        "shown raised at most once: {watched:#?}"
    );
}

#[tokio::test]
async fn a_dashboard_connecting_later_sees_the_alarm_and_a_clear_removes_it() {
    let env = TestEnv::new("a_dashboard_connecting_later_sees_the_alarm_and_a_clear_removes_it");
    let mut first = env.broker().start().await;
    let addr = first.addr();
    let c1 = env.device("C1").site("Osaka").start(&first).await;
    fault(&c1, &["fatal", "SC-901", "drum", "motor", "locked"]).await;
    first.wait_for_log("alarm in progress", deadline()).await;

    // Connecting afterwards: the retained view holds every active emergency at once.
    let later = retained_now(&env, &first, "json/fleet/C1/alarm", secs(5)).await;
    let state: Value = serde_json::from_str(&later)
        .unwrap_or_else(|e| panic!("a dashboard connecting later got no alarm ({e}): {later:?}"));
    assert_eq!(state["alarms"][0]["code"], "SC-901", "{state:#}");
    assert_eq!(
        state["alarms"][0]["detail"], "drum motor locked",
        "{state:#}"
    );

    // It survives a restart of the relay (redb first; retained republished at startup).
    assert!(first.stop().await.success());
    let broker = env.broker().listen(addr).start().await;
    let after_restart = retained_now(&env, &broker, "json/fleet/C1/alarm", secs(5)).await;
    assert!(after_restart.contains("SC-901"), "{after_restart:?}");

    // The desk acknowledges it: still active, now with who saw it.
    let host = env.host("svc", &broker);
    let id = state["alarms"][0]["id"]
        .as_str()
        .expect("an alarm id")
        .to_owned();
    let acked = host.run_ok(["alarms", "ack", &id]).await;
    assert!(acked.contains("acked by svc"), "{acked}");
    let active = alarms_json(&host, false).await;
    assert_eq!(active.len(), 1, "{active:#?}");
    assert_eq!(active[0]["acked_by"], "svc", "{active:#?}");
    let unknown = host.run(["alarms", "ack", "A-999999"]).await;
    assert_eq!(unknown.status.code(), Some(1), "{unknown}");

    // The technician fixes it: the retained view is deleted and a watcher sees it clear.
    let watch = watch_alarms(&env, &broker, "watch-alarms", false).await;
    watch.wait_for_log("SC-901", deadline()).await;
    fault(&c1, &["clear", "SC-901"]).await;
    watch
        .wait_for_line("the alarm cleared", deadline(), |l| {
            l.contains("cleared") && l.contains("SC-901")
        })
        .await;
    let gone = retained_now(&env, &broker, "json/fleet/C1/alarm", secs(2)).await;
    assert!(
        gone.is_empty(),
        "a cleared alarm must not be retained: {gone:?}"
    );
    assert!(alarms_json(&host, false).await.is_empty());
    let all = alarms_json(&host, true).await;
    assert_eq!(all[0]["status"], "cleared", "{all:#?}");
    assert!(all[0]["cleared_at"].is_string(), "{all:#?}");
}

/// The `presence` of the JSON state views of `serial` seen so far by `client`, in order.
async fn next_presence(client: &mut harness::MqttClient, serial: &str, want: &str) -> Value {
    let topic = format!("json/fleet/{serial}/state");
    let within = secs(30);
    tokio::time::timeout(within, async {
        loop {
            let p = client.next_publish_on(&topic, within).await;
            let json: Value = serde_json::from_slice(&p.payload)
                .unwrap_or_else(|e| panic!("{topic} is not JSON: {e}"));
            if json["presence"] == want {
                return json;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{serial} never showed as {want} within {within:?}"))
}

#[tokio::test]
async fn a_killed_device_shows_offline_and_a_late_periodic_device_raises_overdue() {
    let env =
        TestEnv::new("a_killed_device_shows_offline_and_a_late_periodic_device_raises_overdue");
    let broker = env
        .broker()
        .args(["--overdue-margin-secs", "1"])
        .start()
        .await;
    let mut crm = env
        .mqtt(Role::Integrator, "crm")
        .connect(&broker)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    crm.subscribe_and_wait("json/fleet/+/state").await;
    crm.subscribe_and_wait("json/fleet/+/alarm").await;

    // A persistent device, killed: offline, by the relay's own observation; never overdue.
    let mut c1 = env.device("C1").start(&broker).await;
    next_presence(&mut crm, "C1", "online").await;
    c1.kill9().await;
    let offline = next_presence(&mut crm, "C1", "offline").await;
    assert!(offline["last_seen"].is_string(), "{offline:#}");
    assert!(offline.get("due_by").is_none(), "{offline:#}");

    // A periodic device (every 2 s) that stops checking in: overdue after 2 s + the 1 s margin.
    let mut p1 = env
        .device("P1")
        .arg("--session")
        .arg("periodic")
        .arg("--interval-secs")
        .arg("2")
        .start(&broker)
        .await;
    broker
        .wait_for_log(
            "device schedule learned serial=P1 mode=periodic",
            deadline(),
        )
        .await;
    p1.kill9().await;
    let overdue = next_presence(&mut crm, "P1", "overdue").await;
    assert_eq!(overdue["mode"], "periodic", "{overdue:#}");
    let alarm = crm.next_publish_on("json/fleet/P1/alarm", secs(30)).await;
    let alarm: Value = serde_json::from_slice(&alarm.payload).expect("JSON alarm view");
    assert_eq!(alarm["alarms"][0]["kind"], "overdue", "{alarm:#}");
    assert_eq!(alarm["alarms"][0]["code"], "overdue", "{alarm:#}");

    // It checks in again: online, and the overdue alarm clears (its retained view is deleted).
    let _p1 = env
        .device("P1")
        .arg("--session")
        .arg("periodic")
        .arg("--interval-secs")
        .arg("2")
        .start(&broker)
        .await;
    next_presence(&mut crm, "P1", "online").await;
    let cleared = crm.next_publish_on("json/fleet/P1/alarm", secs(30)).await;
    assert!(
        cleared.payload.is_empty(),
        "the overdue alarm must clear on check-in"
    );
    broker
        .wait_for_log("alarm cleared serial=P1", deadline())
        .await;
    let c1_alarms = broker.lines_matching(|l| l.contains("alarm raised serial=C1"));
    assert!(
        c1_alarms.is_empty(),
        "a persistent device is never overdue: {c1_alarms:#?}"
    );
}

#[tokio::test]
async fn a_device_flooding_distinct_codes_is_capped_and_every_host_can_still_list_alarms() {
    let env = TestEnv::new(
        "a_device_flooding_distinct_codes_is_capped_and_every_host_can_still_list_alarms",
    );
    let broker = env.broker().start().await;
    // A 60 KB site and 300 distinct codes: unbounded, an 18 MB alarm view.
    let acks = emergency::flood_alarms(&env, &broker, "C9", 60_000, 300).await;
    assert!(acks.stored <= 64, "stored {} of 300", acks.stored);
    assert_eq!(acks.stored + acks.rejected.len(), 300);
    assert!(
        acks.rejected.iter().all(|r| r.contains("overflow alarm")),
        "each refusal says where the alarm went: {:?}",
        acks.rejected.first()
    );

    // Every host can still list the alarms; the device's are bounded.
    let host = env.host("svc", &broker);
    let listed = alarms_json(&host, false).await;
    assert!(listed.len() <= 65, "{} alarms listed", listed.len());
    let overflow = listed
        .iter()
        .find(|a| a["code"] == "overflow")
        .expect("an overflow alarm says that more were refused");
    assert_eq!(overflow["serial"], "C9", "{overflow:#}");
    let view = retained_now(&env, &broker, "json/fleet/C9/alarm", secs(5)).await;
    assert!(
        !view.is_empty() && view.len() < 128 * 1024,
        "the retained view is {} bytes",
        view.len()
    );

    // A real device's alarm still gets through, and the refusals were logged once, not 280 times.
    let c1 = env.device("C1").site("Kobe").start(&broker).await;
    fault(&c1, &["raise", "SC-541"]).await;
    broker.wait_for_log("alarm in progress", deadline()).await;
    let refusals = broker.lines_matching(|l| l.contains("alarm limit reached"));
    assert!(
        (1..=3).contains(&refusals.len()),
        "refusals are logged once per burst: {refusals:#?}"
    );
}
