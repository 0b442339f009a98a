//! The `mergec` binary: parse the command line, hand it to `cli`.

mod cli;
mod progress;

use clap::Parser;

fn main() -> std::process::ExitCode {
    quiet_gpu_probe();
    cli::run(cli::Cli::parse())
}

/// Mesa's device-selection layer, an implicit Vulkan layer, connects to the desktop's
/// Wayland and X11 displays to find its GPU; without a desktop (servers, containers, ssh)
/// libwayland prints `error: XDG_RUNTIME_DIR is invalid` from inside the GPU probe of an
/// ordinary CPU run. mergec ranks adapters itself (and `--adapter` names one), so the layer
/// is switched off through the variable its manifest names, unless the user set it. Set
/// here, before any thread starts.
fn quiet_gpu_probe() {
    if std::env::var_os("NODEVICE_SELECT").is_none() {
        std::env::set_var("NODEVICE_SELECT", "1");
    }
}
