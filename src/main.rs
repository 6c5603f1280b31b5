//! `pipe`: the command line of `pipe::cli`.

fn main() -> std::process::ExitCode {
    pipe::cli::main()
}
