//! Keeps the vendored protoc in the build graph. etcd-client's build script compiles its
//! protobuf files with the program named by `PROTOC`, which `.cargo/config.toml` sets to
//! `tools/protoc`; that script runs the binary of the `protoc-bin-vendored` crate. Depending on
//! the crate here is what makes `cargo fetch` and `cargo build` bring it (for this platform)
//! before any build script runs, so building routemesh needs no system package.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if let Err(e) = protoc_bin_vendored::protoc_bin_path() {
        println!("cargo:warning=no vendored protoc for this platform ({e}); set PROTOC");
    }
}
