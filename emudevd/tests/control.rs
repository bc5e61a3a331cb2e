//! The control socket and emudevctl against a running emudevd.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::process::Command;

use common::*;
use emudev_vfio_user::Client;
use serde_json::json;

fn start(d: &TempDir) -> Daemon {
    let argv = vec![
        "--device".into(),
        format!("testdev,id=td,socket={}", d.s("td.sock")),
        "--control".into(),
        d.s("ctl.sock"),
    ];
    let mut daemon = Daemon::spawn(d, &argv);
    wait_listening(&mut daemon, &d.path("ctl.sock"));
    daemon
}

#[test]
fn devices_are_added_and_removed_at_runtime() {
    let d = TempDir::new("ctl");
    let mut daemon = start(&d);
    let mut ctl = Ctl::connect(&d.path("ctl.sock"));
    assert_eq!(ctl.greeting["emudevd"]["devices"], 1);
    let v = ctl.call(json!({"execute": "query-devices", "id": 1}));
    assert_eq!(v["id"], 1);
    assert_eq!(v["return"][0]["name"], "td");
    assert_eq!(v["return"][0]["socket"], d.s("td.sock"));

    // device-add with JSON fields; a client connects to the new device and negotiates.
    let blk = d.path("vdb.sock");
    let v = ctl.call(json!({"execute": "device-add", "arguments": {
        "type": "virtio-blk", "id": "vdb", "socket": blk.display().to_string(),
        "backend": "null", "size": "16M", "num-queues": 2
    }}));
    assert_eq!(v, json!({"return": {"name": "vdb"}}));
    let mut c = Client::connect(&blk).unwrap();
    c.negotiate().unwrap();
    let info = c.get_info().unwrap();
    assert!(info.num_regions >= 9);
    let vendor = c.region_read(7, 0, 4).unwrap();
    assert_eq!(vendor, [0xf4, 0x1a, 0x42, 0x10], "virtio-blk 1af4:1042");

    // The same name again is refused with the cause.
    let v = ctl.call(json!({"execute": "device-add", "arguments": {
        "spec": format!("testdev,id=vdb,socket={}", d.s("other.sock"))}}));
    assert_eq!(v["error"]["class"], "GenericError");
    assert_eq!(
        v["error"]["desc"],
        "device vdb: a device with this name exists"
    );
    assert!(!d.path("other.sock").exists());

    let v = ctl.call(json!({"execute": "query-stats", "arguments": {"device": "vdb"}}));
    let queues = v["return"]["devices"][0]["queues"].as_array().unwrap();
    assert_eq!(queues.len(), 2);

    // set-link on a device without a link: a clean error.
    let v = ctl.call(json!({"execute": "set-link", "arguments": {"name": "vdb", "up": false}}));
    assert_eq!(v["error"]["desc"], "device vdb (virtio-blk) has no link");

    // device-del: the socket is gone and the connected client is dropped.
    let v = ctl.call(json!({"execute": "device-del", "arguments": {"id": "vdb"}}));
    assert_eq!(v, json!({"return": {}}));
    assert!(!blk.exists());
    assert!(
        c.get_info().is_err(),
        "client of a deleted device still served"
    );
    let v = ctl.call(json!({"execute": "device-del", "arguments": {"id": "vdb"}}));
    assert_eq!(v["error"]["class"], "DeviceNotFound");
    let v = ctl.call(json!({"execute": "query-devices"}));
    assert_eq!(v["return"].as_array().unwrap().len(), 1);
    drop(ctl);
    assert!(daemon.stop().success(), "log:\n{}", daemon.log());
}

#[test]
fn bad_requests_get_errors_and_several_clients_are_served() {
    let d = TempDir::new("ctlbad");
    let mut daemon = start(&d);
    let path = d.path("ctl.sock");
    let mut a = Ctl::connect(&path);
    let mut b = Ctl::connect(&path);
    a.send_raw(b"{\"execute\": \n");
    let v = a.recv().unwrap();
    assert_eq!(v["error"]["class"], "GenericError");
    assert!(v["error"]["desc"]
        .as_str()
        .unwrap()
        .starts_with("invalid JSON"));
    a.send_raw(b"\xff\xfe\x00\n");
    assert_eq!(a.recv().unwrap()["error"]["class"], "GenericError");
    let v = a.call(json!({"execute": "no-such-thing"}));
    assert_eq!(v["error"]["class"], "CommandNotFound");
    // Both connections still work.
    assert_eq!(
        b.call(json!({"execute": "query-devices"}))["return"][0]["name"],
        "td"
    );
    assert_eq!(
        a.call(json!({"execute": "query-devices"}))["return"][0]["name"],
        "td"
    );

    // An endless line: an error, then the connection is closed; the daemon goes on.
    let mut w = a.w.try_clone().unwrap();
    let chunk = vec![b'x'; 16 * 1024];
    for _ in 0..8 {
        if w.write_all(&chunk).is_err() {
            break;
        }
    }
    let v = a.recv().unwrap();
    assert!(
        v["error"]["desc"].as_str().unwrap().contains("longer than"),
        "{v}"
    );
    assert!(
        a.recv().is_none(),
        "connection not closed after an overlong line"
    );
    assert_eq!(
        b.call(json!({"execute": "query-devices"}))["return"][0]["name"],
        "td"
    );

    // A client that disconnects mid-line does no harm.
    let mut s = UnixStream::connect(&path).unwrap();
    s.write_all(b"{\"execute\":\"query-").unwrap();
    drop(s);
    let _c = Ctl::connect(&path);
    assert!(daemon.stop().success(), "log:\n{}", daemon.log());
    assert!(!path.exists());
}

#[test]
fn emudevctl_commands() {
    let d = TempDir::new("ctlcli");
    let mut daemon = start(&d);
    let ctl = d.s("ctl.sock");
    let run = |a: &[&str]| {
        let out = Command::new(EMUDEVCTL)
            .arg("--control")
            .arg(&ctl)
            .args(a)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, _) = run(&["query-devices"]);
    assert_eq!(code, Some(0));
    assert!(
        out.lines()
            .any(|l| l.starts_with("td ") && l.contains("testdev")),
        "{out}"
    );

    let spec = format!(
        "virtio-blk,id=vdc,socket={},backend=null,size=1M",
        d.s("vdc.sock")
    );
    let (code, out, _) = run(&["device-add", &spec]);
    assert_eq!((code, out.trim()), (Some(0), "added vdc"));
    assert!(d.path("vdc.sock").exists());

    let (code, out, _) = run(&["query-stats"]);
    assert_eq!(code, Some(0));
    assert!(
        out.lines()
            .any(|l| l.starts_with("vdc ") && l.contains("virtio-blk")),
        "{out}"
    );
    assert!(out.contains("poller 0:"), "{out}");
    let (code, out, _) = run(&["query-stats", "--prometheus"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains(
            "emudev_queue_requests_total{device=\"vdc\",type=\"virtio-blk\",queue=\"0\"} 0"
        ),
        "{out}"
    );
    let (code, out, _) = run(&["query-stats", "--json", "--device", "td"]);
    assert_eq!(code, Some(0));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["devices"][0]["name"], "td");

    let (code, _, err) = run(&["set-link", "vdc", "down"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("GenericError: device vdc (virtio-blk) has no link"),
        "{err}"
    );
    let (code, out, _) = run(&["raw", r#"{"execute":"query-devices","id":"x"}"#]);
    assert_eq!(code, Some(0));
    assert!(out.contains("\"id\":\"x\""), "{out}");
    let (code, _, err) = run(&["raw", "{nope"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("invalid JSON"), "{err}");

    let (code, out, _) = run(&["device-del", "vdc"]);
    assert_eq!((code, out.trim()), (Some(0), "removed vdc"));
    assert!(!d.path("vdc.sock").exists());
    let (code, _, err) = run(&["device-del", "vdc"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("DeviceNotFound"), "{err}");
    let (code, _, _) = run(&["frobnicate"]);
    assert_eq!(code, Some(2));
    assert!(daemon.stop().success());
}
