//! The spectune command-line tool. The commands live in src/cli/ (declared here, so they are part
//! of the binary, not of the library): the application layer on top of the engine.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
