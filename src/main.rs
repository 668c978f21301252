//! The `glowwatch` binary: everything lives in the library (`glowwatch::cli`).

fn main() -> std::process::ExitCode {
    // Rust ignores SIGPIPE, so `glowwatch ... | head` would panic in println!; restore the
    // default so the process ends quietly when its reader goes away, like other CLI tools.
    #[cfg(unix)]
    // SAFETY: called before any other thread exists; only changes the signal disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    keep_freed_memory();
    glowwatch::cli::main()
}

/// candle allocates a fresh buffer for every tensor op. glibc's malloc serves buffers above its
/// mmap threshold with fresh mappings and returns them to the kernel on free, so every op
/// page-faulted its output in again: a third of a CPU training step (measured with perf; see
/// README, "Training step"). Raising the thresholds keeps freed buffers in the heap for reuse.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before other threads exist.
    unsafe {
        // 32 MiB is the largest mmap threshold glibc accepts on 64-bit targets.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
