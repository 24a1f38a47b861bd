//! Control-socket requests as the socket reads them (one line of JSON): parsed into a
//! `Request` or refused with an error answer; a parsed request survives a round trip; every
//! answer serializes to one line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::reconcile::protocol::{Answer, Request};

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    match serde_json::from_str::<Request>(line) {
        Ok(req) => {
            let again = serde_json::to_string(&req).expect("a request serializes");
            let back: Request = serde_json::from_str(&again).expect("and parses back");
            assert_eq!(back, req);
        }
        Err(e) => {
            let a = Answer::error(format!("bad request: {e}"));
            assert!(!a.to_line().contains('\n'));
        }
    }
    if let Ok(a) = serde_json::from_str::<Answer>(line) {
        assert!(!a.to_line().contains('\n'));
    }
});
