//! The `keyward` binary: the server (`dev`, `server`) and the command line,
//! which talks to a server only through `keyward::client`.

mod cli;

fn main() -> std::process::ExitCode {
    // ring is the one crypto provider in the tree; install it before any TLS.
    let _ = rustls::crypto::ring::default_provider().install_default();
    cli::main()
}
