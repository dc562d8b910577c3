//! A child process a bench starts (backend, proxy, broker), with its log file. Each bench
//! adds its own start checks and its own `Drop` (they stop their processes differently).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// A child process started by a bench; stopped by PID in the bench's `Drop`.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> Proc {
        let file = std::fs::File::create(&log).expect("create log file");
        let file2 = file.try_clone().expect("clone log handle");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(file2)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            name: name.to_string(),
            child,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}
