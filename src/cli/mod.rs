//! Command-line interface: one file per subcommand; `main.rs` only calls [`main`].

mod bench;
mod doctor;
mod model;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// glowwatch: out-of-distribution detection for image feeds with hierarchical Glow likelihoods.
#[derive(Debug, Parser)]
#[command(name = "glowwatch", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Measure scoring throughput (images/s, TFLOP/s) of Glow configurations.
    Bench(bench::BenchArgs),
    /// Check a device's scores against the CPU reference in every precision.
    Doctor(doctor::DoctorArgs),
    /// Create and inspect model files.
    #[command(subcommand)]
    Model(model::ModelCommand),
}

/// Parses the command line and runs the chosen subcommand.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(a) => bench::run(a),
        Command::Doctor(a) => doctor::run(a),
        Command::Model(c) => model::run(c),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
