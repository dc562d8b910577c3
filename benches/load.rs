//! The load comparison harness against HAProxy and nginx (being written).

fn main() {
    eprintln!("benches/load.rs: not implemented yet");
}
