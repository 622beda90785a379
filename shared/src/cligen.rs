//! Man pages and shell completions generated from a binary's clap definition, for packages:
//! `<dir>/man/<name>.1` (one page; subcommands in its body) and `<dir>/completions/` for bash,
//! zsh and fish. Both binaries expose it as a hidden `generate-docs DIR` subcommand.

use std::path::Path;

use anyhow::Context;

pub fn generate_docs(cmd: clap::Command, dir: &Path) -> anyhow::Result<()> {
    let name = cmd.get_name().to_string();
    let man_dir = dir.join("man");
    let comp_dir = dir.join("completions");
    std::fs::create_dir_all(&man_dir)?;
    std::fs::create_dir_all(&comp_dir)?;
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut page).context("render the man page")?;
    std::fs::write(man_dir.join(format!("{name}.1")), page)?;
    for shell in [clap_complete::Shell::Bash, clap_complete::Shell::Zsh, clap_complete::Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd.clone(), &name, &comp_dir).context("write completions")?;
    }
    Ok(())
}
