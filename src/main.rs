//! The `keyward` binary: the server (`dev`, `server`) and the command line,
//! which talks to a server only through `keyward::client`.

mod cli;

/// jemalloc, not the system's malloc: glibc's free lists fragment on a
/// long-running server and every allocation then walks them (Cargo.toml and
/// the README's "Fifth round" say what was measured).
#[cfg(unix)]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    // ring is the one crypto provider in the tree; install it before any TLS.
    let _ = rustls::crypto::ring::default_provider().install_default();
    cli::main()
}
