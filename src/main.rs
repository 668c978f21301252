//! The `glowwatch` binary: everything lives in the library (`glowwatch::cli`).
fn main() -> std::process::ExitCode {
    glowwatch::cli::main()
}
