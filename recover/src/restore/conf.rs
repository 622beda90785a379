//! The recovery settings a restore writes: `recovery.signal` and lines appended to
//! `postgresql.auto.conf`, whose `restore_command` runs this binary's `wal-fetch`.
//!
//! Quoting, twice: `restore_command` is a shell command line (PostgreSQL runs it with
//! `/bin/sh -c`), so every argument is single-quoted for the shell (`'` becomes `'\''`); the
//! whole line is then a quoted string in the configuration file, where PostgreSQL's parser
//! treats `''` as a quote and `\` as an escape, so both are doubled (as `ALTER SYSTEM` writes
//! them). Control characters cannot be quoted for the configuration file at all and are
//! refused. No secret is ever written: wal-fetch takes credentials from the server's
//! environment, and signature checking needs only the public verify key.

use std::path::Path;

use anyhow::{bail, Result};
use walvault_shared::lsn::TimelineId;

use super::plan::Target;

/// What recovery does at its target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetAction {
    Promote,
    Pause,
    Shutdown,
}

impl TargetAction {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "promote" => TargetAction::Promote,
            "pause" => TargetAction::Pause,
            "shutdown" => TargetAction::Shutdown,
            _ => bail!("invalid --target-action {s:?}\nHINT: use promote, pause or shutdown"),
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            TargetAction::Promote => "promote",
            TargetAction::Pause => "pause",
            TargetAction::Shutdown => "shutdown",
        }
    }
}

/// One argument, quoted for `/bin/sh`.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_=:/.,@+".contains(&b)) {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A value as a quoted string in postgresql.conf syntax.
pub fn conf_quote(s: &str) -> String {
    format!("'{}'", s.replace('\\', r"\\").replace('\'', "''"))
}

/// `restore_command`'s text: the program and its arguments, each shell-quoted (and `%`
/// doubled, since PostgreSQL replaces `%f`, `%p`, `%r` and `%%` in it), then `%f %p`. Refuses
/// what cannot be written into the configuration file.
pub fn restore_command(program: &str, args: &[String]) -> Result<String> {
    for a in std::iter::once(program).chain(args.iter().map(String::as_str)) {
        if a.chars().any(|c| c.is_control()) {
            bail!("{a:?} contains a control character, which restore_command cannot hold\nHINT: use an archive path, bucket or endpoint without newlines or control characters");
        }
    }
    let mut cmd = shell_quote(program).replace('%', "%%");
    for a in args {
        cmd.push(' ');
        cmd.push_str(&shell_quote(a).replace('%', "%%"));
    }
    cmd.push_str(" %f %p");
    Ok(cmd)
}

/// The recovery settings.
pub struct Recovery<'a> {
    pub restore_command: &'a str,
    pub target: &'a Target,
    pub action: TargetAction,
    pub inclusive: bool,
    pub target_timeline: Option<TimelineId>,
}

impl Recovery<'_> {
    /// The lines appended to postgresql.auto.conf.
    pub fn lines(&self) -> String {
        let mut conf = String::from(
            "\n# Added by walvault-recover restore. No secrets here: wal-fetch takes credentials\n# from the server's environment (AWS_* variables, ~/.aws/credentials of this user).\n",
        );
        conf.push_str(&format!("restore_command = {}\n", conf_quote(self.restore_command)));
        match self.target {
            Target::Time(t) => conf.push_str(&format!("recovery_target_time = {}\n", conf_quote(&t.to_rfc3339()))),
            Target::Lsn(l) => conf.push_str(&format!("recovery_target_lsn = {}\n", conf_quote(&l.to_string()))),
            Target::Xid(x) => conf.push_str(&format!("recovery_target_xid = {}\n", conf_quote(&x.to_string()))),
            Target::Name(n) => conf.push_str(&format!("recovery_target_name = {}\n", conf_quote(n))),
            Target::Latest => {}
        }
        if *self.target != Target::Latest {
            conf.push_str(&format!("recovery_target_action = {}\n", conf_quote(self.action.as_str())));
            conf.push_str(&format!("recovery_target_inclusive = {}\n", self.inclusive));
        }
        let tli = self.target_timeline.map(|t| t.0.to_string()).unwrap_or_else(|| "latest".into());
        conf.push_str(&format!("recovery_target_timeline = {}\n", conf_quote(&tli)));
        conf
    }

    /// Write `recovery.signal` and append the settings to `postgresql.auto.conf`.
    ///
    /// A backup taken from a standby carries that standby's `standby.signal` (BASE_BACKUP does
    /// not exclude it); left in place the restored server would enter standby mode, follow the
    /// old primary through `primary_conninfo` and never finish recovery. A restore is a
    /// point-in-time recovery, so the file is removed (pg_verifybackup is told to ignore it).
    pub fn write(&self, pgdata: &Path) -> Result<()> {
        match std::fs::remove_file(pgdata.join("standby.signal")) {
            Ok(()) => eprintln!(
                "restore: removed standby.signal (the backup was taken from a standby); the restored server recovers to its target and does not follow a primary"
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        std::fs::write(pgdata.join("recovery.signal"), b"")?;
        let auto = pgdata.join("postgresql.auto.conf");
        let mut text = std::fs::read_to_string(&auto).unwrap_or_default();
        text.push_str(&self.lines());
        std::fs::write(&auto, text)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run a command line through /bin/sh the way PostgreSQL runs restore_command.
    fn sh_argv(cmd: &str) -> Vec<String> {
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(format!("for a in {cmd}; do printf '%s\\0' \"$a\"; done"))
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().split('\0').filter(|s| !s.is_empty()).map(String::from).collect()
    }

    #[test]
    fn hostile_values_stay_single_arguments() {
        let args: Vec<String> =
            ["wal-fetch", "--archive", "file:///tmp/a'$(id)'b; rm -rf x", "--s3-endpoint", "http://h/`id`"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        let cmd = restore_command("/usr/local/bin/walvault-recover", &args).unwrap();
        let cmd = cmd.trim_end_matches(" %f %p");
        let mut want = vec!["/usr/local/bin/walvault-recover".to_string()];
        want.extend(args.clone());
        // `for a in …` word-splits unquoted words only; each quoted argument stays whole.
        assert_eq!(sh_argv(cmd), want);
        let bad = vec!["--archive".to_string(), "/tmp/a\nrecovery_end_command='id'".to_string()];
        assert!(restore_command("/x", &bad).is_err());
    }

    #[test]
    fn config_quoting_doubles_quotes_and_backslashes() {
        assert_eq!(conf_quote(r"a'b\c"), r"'a''b\\c'");
        let target = Target::Name("it's".into());
        let r = Recovery {
            restore_command: "'/x' wal-fetch %f %p",
            target: &target,
            action: TargetAction::Pause,
            inclusive: false,
            target_timeline: None,
        };
        let l = r.lines();
        assert!(l.contains("restore_command = '''/x'' wal-fetch %f %p'\n"), "{l}");
        assert!(l.contains("recovery_target_name = 'it''s'\n"));
        assert!(l.contains("recovery_target_action = 'pause'\nrecovery_target_inclusive = false\n"));
        assert!(l.contains("recovery_target_timeline = 'latest'"));
    }
}
