use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cdc_sink::cli::Cli::parse();
    cdc_sink::cli::run(cli)
}
