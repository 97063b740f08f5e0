//! Crash consistency: a child process under concurrent load is killed with SIGKILL; on reopen every
//! acknowledged operation is present and every stored record decodes. Also: the directory is exclusive
//! to one process. The checks live in `idemgate_core::testkit::crash`; the child is this very
//! test binary, re-executed.

use idemgate_core::testkit::crash;
use idemgate_store_fjall::FjallStore;

#[test]
fn acknowledged_operations_survive_sigkill() {
    crash::acknowledged_operations_survive_sigkill(
        "acknowledged_operations_survive_sigkill",
        |p| FjallStore::open(p),
    );
}

#[test]
fn a_second_process_gets_a_clear_error() {
    crash::a_second_process_gets_a_clear_error("a_second_process_gets_a_clear_error", |p| {
        FjallStore::open(p)
    });
}
