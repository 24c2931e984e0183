//! Commands and processes: what to run, signals, terminal sizes, and what is reported about
//! a guest's processes.

use std::fmt;
use std::time::SystemTime;

/// What to run: a shell script (`/bin/sh -c SCRIPT` in a Linux capsule; a verb line for the
/// probe) or a program with its arguments, run without a shell (Linux capsules).
///
/// `&str` and `String` convert to [`Command::Shell`], so `commands().run("echo hi")` works;
/// argv form:
///
/// ```
/// use capsule::Command;
/// let ls = Command::exec("ls", ["-l", "/tmp dir with spaces"]);
/// assert_eq!(ls.to_string(), "ls -l /tmp dir with spaces");
/// assert_eq!(Command::from("echo hi"), Command::shell("echo hi"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Command {
    /// A shell script.
    Shell(String),
    /// A program (looked up in `PATH` if it has no `/`) and its arguments (not including
    /// `argv[0]`), passed as they are: no quoting, no expansion.
    Exec {
        /// The program.
        program: String,
        /// Its arguments.
        args: Vec<String>,
    },
}

impl Command {
    /// A shell script.
    pub fn shell(script: impl Into<String>) -> Command {
        Command::Shell(script.into())
    }

    /// `program` with `args`, without a shell.
    pub fn exec<I, S>(program: impl Into<String>, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Command::Exec {
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
        }
    }
}

impl fmt::Display for Command {
    /// The script, or the program and its arguments joined by spaces (for people, not for a
    /// shell).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Shell(script) => f.write_str(script),
            Command::Exec { program, args } => {
                f.write_str(program)?;
                for a in args {
                    write!(f, " {a}")?;
                }
                Ok(())
            }
        }
    }
}

impl From<&str> for Command {
    fn from(script: &str) -> Self {
        Command::Shell(script.to_owned())
    }
}

impl From<String> for Command {
    fn from(script: String) -> Self {
        Command::Shell(script)
    }
}

impl From<&String> for Command {
    fn from(script: &String) -> Self {
        Command::Shell(script.clone())
    }
}

/// A signal, by its Linux number; the common ones are constants.
///
/// ```
/// use capsule::Signal;
/// assert_eq!(Signal::TERM.number(), 15);
/// assert_eq!(Signal::new(9), Some(Signal::KILL));
/// assert_eq!(Signal::new(0), None);
/// assert_eq!(Signal::INT.to_string(), "SIGINT");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Signal(i32);

impl Signal {
    /// Hangup (1).
    pub const HUP: Signal = Signal(1);
    /// Interrupt, as Ctrl-C (2).
    pub const INT: Signal = Signal(2);
    /// Quit (3).
    pub const QUIT: Signal = Signal(3);
    /// Abort (6).
    pub const ABRT: Signal = Signal(6);
    /// Kill, which cannot be caught (9).
    pub const KILL: Signal = Signal(9);
    /// User-defined signal 1 (10).
    pub const USR1: Signal = Signal(10);
    /// Segmentation fault (11).
    pub const SEGV: Signal = Signal(11);
    /// User-defined signal 2 (12).
    pub const USR2: Signal = Signal(12);
    /// Broken pipe (13).
    pub const PIPE: Signal = Signal(13);
    /// Alarm (14).
    pub const ALRM: Signal = Signal(14);
    /// Terminate, the polite stop (15).
    pub const TERM: Signal = Signal(15);
    /// Continue a stopped process (18).
    pub const CONT: Signal = Signal(18);
    /// Stop, which cannot be caught (19).
    pub const STOP: Signal = Signal(19);
    /// Terminal stop, as Ctrl-Z (20).
    pub const TSTP: Signal = Signal(20);
    /// Window size change (28).
    pub const WINCH: Signal = Signal(28);

    /// The signal numbered `number` (1 to 64, Linux numbering), or `None`.
    pub fn new(number: i32) -> Option<Signal> {
        (1..=64).contains(&number).then_some(Signal(number))
    }

    /// Its number.
    pub fn number(self) -> i32 {
        self.0
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.0 {
            1 => "HUP",
            2 => "INT",
            3 => "QUIT",
            6 => "ABRT",
            9 => "KILL",
            10 => "USR1",
            11 => "SEGV",
            12 => "USR2",
            13 => "PIPE",
            14 => "ALRM",
            15 => "TERM",
            18 => "CONT",
            19 => "STOP",
            20 => "TSTP",
            28 => "WINCH",
            n => return write!(f, "signal {n}"),
        };
        write!(f, "SIG{name}")
    }
}

/// The size of a terminal, in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PtySize {
    /// Rows (lines).
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

impl PtySize {
    /// `rows` by `cols`.
    pub fn new(rows: u16, cols: u16) -> PtySize {
        PtySize { rows, cols }
    }
}

impl Default for PtySize {
    /// 24 by 80.
    fn default() -> Self {
        PtySize { rows: 24, cols: 80 }
    }
}

/// A process the guest's agent started that it still tracks (see
/// [`crate::Commands::list`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProcessInfo {
    /// Its pid in the guest (also its process group id), for
    /// [`crate::Commands::connect`] and [`crate::Commands::kill`].
    pub pid: u32,
    /// What was run (see [`Command`]'s `Display`).
    pub command: String,
    /// When it started, by the guest's clock (which the engine sets to the host's at every
    /// start and resume).
    pub started_at: SystemTime,
}
