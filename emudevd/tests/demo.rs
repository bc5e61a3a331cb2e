//! The client demo as an integration test: emudevd serves a virtio-blk on an image file and
//! a test device; the demo client drives both; the data is on the image after SIGTERM.

mod common;

use common::*;
use emudev_examples::demo::{self, blk, testdev};
use serde_json::json;

#[test]
fn demo_client_drives_the_daemon_and_the_data_reaches_the_image() {
    let d = TempDir::new("demo");
    let img = d.path("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let argv = vec![
        "--device".into(),
        format!("testdev,socket={}", d.s("testdev.sock")),
        "--device".into(),
        format!(
            "virtio-blk,id=vda,socket={},path={}",
            d.s("vda.sock"),
            img.display()
        ),
        "--control".into(),
        d.s("ctl.sock"),
    ];
    let mut daemon = Daemon::spawn(&d, &argv);
    wait_listening(&mut daemon, &d.path("ctl.sock"));

    let t = testdev::run(&d.path("testdev.sock"), false)
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", daemon.log()));
    assert!(t.irq_count >= 3, "{t:?}");

    let opts = blk::BlkOptions {
        sectors: 4096,
        first_sector: 100,
        sectors_per_request: 16,
        depth: 8,
        seed: 42,
        verbose: false,
    };
    let r = blk::run(&d.path("vda.sock"), &opts)
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", daemon.log()));
    assert_eq!(r.capacity_sectors, (8 << 20) / 512);
    assert_eq!(r.write.requests, 4096 / 16);
    assert_eq!(r.read.requests, 4096 / 16);
    assert_eq!(r.read.bytes, 4096 * 512);
    assert!(r.flushed);

    // The counters saw it.
    let mut ctl = Ctl::connect(&d.path("ctl.sock"));
    let v = ctl.call(json!({"execute": "query-stats", "arguments": {"device": "vda"}}));
    let q = &v["return"]["devices"][0]["queues"][0];
    assert_eq!(q["requests"], 2 * 256 + 1, "{v}");
    assert_eq!(q["write_bytes"], 4096 * 512);
    assert_eq!(q["read_bytes"], 4096 * 512);
    assert_eq!(q["errors"], 0);
    assert!(
        q["kicks"].as_u64().unwrap() >= 1 && q["interrupts"].as_u64().unwrap() >= 1,
        "{v}"
    );
    drop(ctl);

    assert!(daemon.stop().success(), "log:\n{}", daemon.log());
    // The pattern is on the image, exactly where it was written, and nothing around it.
    let bytes = std::fs::read(&img).unwrap();
    let mut want = vec![0u8; 4096 * 512];
    demo::pattern(42, 100, &mut want);
    assert!(bytes[..100 * 512].iter().all(|&b| b == 0));
    assert!(
        bytes[100 * 512..(100 + 4096) * 512] == want[..],
        "pattern not on the image"
    );
    assert!(bytes[(100 + 4096) * 512..].iter().all(|&b| b == 0));
}

#[test]
fn a_wrong_device_type_is_reported_not_driven() {
    let d = TempDir::new("demo-wrong");
    let argv = vec![
        "--device".into(),
        format!("testdev,socket={}", d.s("t.sock")),
    ];
    let mut daemon = Daemon::spawn(&d, &argv);
    wait_listening(&mut daemon, &d.path("t.sock"));
    let e = blk::run(&d.path("t.sock"), &blk::BlkOptions::default()).unwrap_err();
    assert!(e.to_string().contains("is not a modern virtio-blk"), "{e}");
    assert!(daemon.stop().success());
}

#[test]
fn hot_add_and_remove_do_not_disturb_io_on_another_device() {
    let d = TempDir::new("demo-hot");
    let img = d.path("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let argv = vec![
        "--device".into(),
        format!(
            "virtio-blk,id=vda,socket={},path={}",
            d.s("vda.sock"),
            img.display()
        ),
        "--control".into(),
        d.s("ctl.sock"),
    ];
    let mut daemon = Daemon::spawn(&d, &argv);
    wait_listening(&mut daemon, &d.path("ctl.sock"));
    let vda = d.path("vda.sock");
    let io = std::thread::spawn(move || {
        let opts = blk::BlkOptions {
            sectors: 16384,
            sectors_per_request: 8,
            depth: 8,
            seed: 7,
            verbose: false,
            ..Default::default()
        };
        blk::run(&vda, &opts)
    });
    let mut ctl = Ctl::connect(&d.path("ctl.sock"));
    let mut rounds = 0;
    while rounds < 3 || !io.is_finished() {
        let (t, b) = (
            d.path(&format!("t{rounds}.sock")),
            d.path(&format!("b{rounds}.sock")),
        );
        let v = ctl.call(json!({"execute": "device-add", "arguments": {
            "spec": format!("testdev,id=t{rounds},socket={}", t.display())}}));
        assert!(v.get("return").is_some(), "{v}");
        let v = ctl.call(json!({"execute": "device-add", "arguments": {
            "spec": format!("virtio-blk,id=b{rounds},socket={},backend=null,size=1M", b.display())}}));
        assert!(v.get("return").is_some(), "{v}");
        let mut c = emudev_vfio_user::Client::connect(&t).unwrap();
        c.negotiate().unwrap();
        let mut c2 = emudev_vfio_user::Client::connect(&b).unwrap();
        c2.negotiate().unwrap();
        for name in [format!("t{rounds}"), format!("b{rounds}")] {
            let v = ctl.call(json!({"execute": "device-del", "arguments": {"id": name}}));
            assert_eq!(v, json!({"return": {}}));
        }
        assert!(!t.exists() && !b.exists());
        rounds += 1;
    }
    let r = io
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("I/O disturbed: {e}; log:\n{}", daemon.log()));
    assert_eq!(r.read.requests, 16384 / 8);
    let v = ctl.call(json!({"execute": "query-devices"}));
    assert_eq!(v["return"].as_array().unwrap().len(), 1, "{v}");
    assert!(daemon.stop().success(), "log:\n{}", daemon.log());
}

#[test]
fn two_nics_pass_frames_through_the_switch_and_the_daemon_counts_them() {
    let d = TempDir::new("demo-net");
    let argv = vec![
        "--device".into(),
        format!("virtio-net,id=n0,socket={}", d.s("n0.sock")),
        "--device".into(),
        format!("virtio-net,id=n1,socket={}", d.s("n1.sock")),
        "--device".into(),
        format!("avf,id=vf0,socket={}", d.s("vf0.sock")),
        "--control".into(),
        d.s("ctl.sock"),
    ];
    let mut daemon = Daemon::spawn(&d, &argv);
    wait_listening(&mut daemon, &d.path("ctl.sock"));
    let opts = demo::net::NetOptions {
        frames: 500,
        frame_len: 300,
        window: 16,
        verbose: false,
    };
    let r = demo::net::run(&d.path("n0.sock"), &d.path("n1.sock"), &opts)
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", daemon.log()));
    assert_eq!((r.a_to_b.received, r.b_to_a.received), (500, 500));
    assert_ne!(r.mac_a, r.mac_b);

    // The daemon counted the same frames: 500 each way plus one "hello" each way.
    let mut ctl = Ctl::connect(&d.path("ctl.sock"));
    let v = ctl.call(json!({"execute": "query-stats"}));
    for n in ["n0", "n1"] {
        let dev = v["return"]["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == n)
            .unwrap_or_else(|| panic!("{n} missing: {v}"));
        assert_eq!(dev["counters"]["tx_frames"], 501, "{v}");
        assert_eq!(dev["counters"]["rx_frames"], 501, "{v}");
        assert_eq!(dev["counters"]["tx_bytes"], 501 * 300, "{v}");
    }
    drop(ctl);
    assert!(daemon.stop().success(), "log:\n{}", daemon.log());
}
