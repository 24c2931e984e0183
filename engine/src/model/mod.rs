//! The plain data of the API: ids, statuses, what is reported about capsules, templates and
//! commands, and the one record that describes a capsule. Nothing here runs anything; every
//! other module may import it, and it imports none of them.

pub(crate) mod entry;
pub(crate) mod id;
pub(crate) mod info;
pub(crate) mod output;
pub(crate) mod process;
pub(crate) mod record;
pub(crate) mod status;

pub use entry::{EntryInfo, EntryKind, FileErrorKind, WriteOptions};
pub use id::{CapsuleId, InvalidId};
pub use info::{CapsuleInfo, TemplateInfo};
pub use output::{CommandOutput, Output};
pub use process::{Command, ProcessInfo, PtySize, Signal};
pub(crate) use record::GuestKind;
pub use status::{ParseStatusError, Status};
