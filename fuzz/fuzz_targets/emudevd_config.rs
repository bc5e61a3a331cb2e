//! emudevd's untrusted text inputs: the `--device` spec parser (command line and
//! `device-add`) and the control socket's JSON lines.
//!
//! Input: byte 0 selects the mode, the rest is the text.
//! - even: `config::parse_devices` on the text split at '\n' (one `--device` each), plus
//!   `parse_size` on each comma-separated piece;
//! - odd: `control::handle_line` against an empty device registry. `device-add` would bind
//!   sockets and open images wherever the fuzzer's paths point, so for that command only the
//!   parsing half runs (`spec_from_fields` and `parse_device`); every other command runs for
//!   real. The reply must always be a JSON object with `return` or `error`.

#![no_main]

use std::sync::OnceLock;

use emudevd::config;
use emudevd::control;
use emudevd::devices::Registry;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fn registry() -> &'static Registry {
    static REG: OnceLock<Registry> = OnceLock::new();
    REG.get_or_init(|| Registry::new(1, None, 0).expect("registry"))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, text)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        let s = String::from_utf8_lossy(text);
        let args: Vec<String> = s.split('\n').map(str::to_string).collect();
        let _ = config::parse_devices(&args);
        for piece in s.split(',') {
            let _ = config::parse_size(piece);
        }
        return;
    }
    if let Ok(Value::Object(req)) = serde_json::from_slice::<Value>(text) {
        if req.get("execute").and_then(Value::as_str) == Some("device-add") {
            if let Some(Value::Object(args)) = req.get("arguments") {
                let spec = match args.get("spec") {
                    Some(Value::String(s)) => Ok(s.clone()),
                    _ => control::spec_from_fields(args).map_err(|_| ()),
                };
                if let Ok(spec) = spec {
                    let _ = config::parse_device(0, &spec);
                }
            }
            return;
        }
    }
    let reply = control::handle_line(registry(), text);
    let Value::Object(m) = reply else {
        panic!("reply is not an object: {reply}");
    };
    assert!(
        m.contains_key("return") ^ m.contains_key("error"),
        "reply has neither or both of return/error: {m:?}"
    );
});
