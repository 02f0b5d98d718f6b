//! The `hvbench` binary: the CLI's edge, where errors become one sentence and an exit code.

// Output goes through `say!`/`tell!` (panic-free on a closed stream), as in the library.
#![deny(clippy::print_stderr, clippy::print_stdout)]

mod cli;

use clap::Parser;

fn main() {
    let cli = cli::Cli::parse();
    match cli::main(cli) {
        Ok(code) => std::process::exit(code),
        Err(error) => {
            hvbench::say!("hvbench: error: {}", sentence(&error));
            std::process::exit(2);
        }
    }
}

/// One clear sentence: the error, then each of its causes once. Many errors already say
/// their source in their own text (`cannot read {path}: {source}`); a cause the sentence
/// already holds is not said again.
fn sentence(error: &anyhow::Error) -> String {
    let mut message = error.to_string();
    for cause in error.chain().skip(1) {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
    }
    message
}

#[cfg(test)]
mod tests {
    use super::sentence;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read x.elf: {source}")]
    struct Says {
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read x.elf")]
    struct Hides {
        source: std::io::Error,
    }

    fn missing() -> std::io::Error {
        std::io::Error::from(std::io::ErrorKind::NotFound)
    }

    #[test]
    fn each_cause_is_said_once() {
        let said = anyhow::Error::new(Says { source: missing() }).context("loading the guest");
        assert_eq!(
            sentence(&said),
            format!("loading the guest: cannot read x.elf: {}", missing())
        );
        let hidden = anyhow::Error::new(Hides { source: missing() });
        assert_eq!(
            sentence(&hidden),
            format!("cannot read x.elf: {}", missing())
        );
    }
}
