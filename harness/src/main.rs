//! The `hvbench` binary: the CLI's edge, where errors become one sentence and an exit code.

use clap::Parser;

fn main() {
    let cli = hvbench::cli::Cli::parse();
    match hvbench::cli::main(cli) {
        Ok(code) => std::process::exit(code),
        Err(error) => {
            // One clear sentence, with its causes.
            let mut message = error.to_string();
            for cause in error.chain().skip(1) {
                message.push_str(": ");
                message.push_str(&cause.to_string());
            }
            eprintln!("hvbench: error: {message}");
            std::process::exit(2);
        }
    }
}
