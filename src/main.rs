//! The `istream` binary: parse the command line, run, map the outcome to an exit code
//! (0 success, 1 the operation failed, 2 bad usage).

fn main() -> std::process::ExitCode {
    istream::cli::main()
}
