//! The `routemesh` binary: parse the command line and hand over to the library.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = routemesh::cli::Cli::parse();
    routemesh::cli::main(cli)
}
