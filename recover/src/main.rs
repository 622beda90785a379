//! `walvault-recover`: restore, restore_command, audit and drills. Not implemented yet: this
//! binary only says so (see the README's status). Exit code 2 so no script mistakes it for a
//! working restore.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "walvault-recover: not implemented yet (list, restore, wal-fetch, audit and verify are planned; see README.md, \"Status\")"
    );
    ExitCode::from(2)
}
