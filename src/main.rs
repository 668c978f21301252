//! The `glowwatch` binary: everything lives in the library (`glowwatch::cli`).
fn main() -> std::process::ExitCode {
    // Rust ignores SIGPIPE, so `glowwatch ... | head` would panic in println!; restore the
    // default so the process ends quietly when its reader goes away, like other CLI tools.
    #[cfg(unix)]
    // SAFETY: called before any other thread exists; only changes the signal disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    glowwatch::cli::main()
}
