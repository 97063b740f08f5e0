//! Stored bytes (records and outcomes) that rot or come from a foreign writer: decoding is an
//! error, never a panic; whatever decodes re-encodes to bytes that decode to the same value.
#![no_main]

use idemgate_core::record::{Outcome, Record};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = Record::decode(data) {
        let again = Record::decode(&record.encode()).expect("re-encoded record decodes");
        assert_eq!(again, record);
    }
    if let Ok(outcome) = Outcome::decode(data) {
        let again = Outcome::decode(&outcome.encode()).expect("re-encoded outcome decodes");
        assert_eq!(again, outcome);
    }
});
