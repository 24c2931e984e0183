//! File requests: `ReadFile`, `WriteFile`, `ListDir`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};

use capsule_agent_protocol::{
    DirEntry, ErrorCode, FileType, Message, WriteFile, MAX_CHUNK_LEN, MAX_PAYLOAD_LEN,
};

/// Answers one file request; anything else gets an `UNEXPECTED` error.
pub fn handle(request: Message) -> Message {
    let result = match request {
        Message::ReadFile { path, offset, len } => read_file(&path, offset, len),
        Message::WriteFile(w) => write_file(&w),
        Message::ListDir { path } => list_dir(&path),
        other => {
            return Message::error(
                ErrorCode::UNEXPECTED,
                format!("{:?} is not a file request", other.kind()),
            )
        }
    };
    result.unwrap_or_else(|e| Message::error(ErrorCode::IO, e.to_string()))
}

fn read_file(path: &str, offset: u64, len: u32) -> io::Result<Message> {
    let want = usize::try_from(len)
        .unwrap_or(usize::MAX)
        .min(MAX_CHUNK_LEN);
    let mut f = File::open(path)?;
    if offset > 0 {
        f.seek(SeekFrom::Start(offset))?;
    }
    let mut data = Vec::with_capacity(want.min(64 * 1024));
    let got = Read::by_ref(&mut f)
        .take(want as u64)
        .read_to_end(&mut data)?;
    // Fewer bytes than asked means EOF; exactly as many: probe one more.
    let eof = got < want || f.read(&mut [0u8; 1])? == 0;
    Ok(Message::FileData { data, eof })
}

fn write_file(w: &WriteFile) -> io::Result<Message> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(w.truncate && !w.append)
        .append(w.append)
        .mode(w.mode)
        .open(&w.path)?;
    f.write_all(&w.data)?;
    Ok(Message::Ack)
}

fn list_dir(path: &str) -> io::Result<Message> {
    let mut entries = Vec::new();
    // 4 (count) + 1 (truncated) + slack for the frame around it.
    let mut size = 4 + 1 + 64;
    let mut truncated = false;
    for entry in fs::read_dir(path)? {
        let entry = entry?;
        let md = entry.metadata()?;
        let ft = md.file_type();
        let file_type = if ft.is_file() {
            FileType::File
        } else if ft.is_dir() {
            FileType::Dir
        } else if ft.is_symlink() {
            FileType::Symlink
        } else {
            FileType::Other
        };
        let name = entry.file_name().to_string_lossy().into_owned();
        let item = 4 + name.len() + 1 + 8 + 4;
        if size + item > MAX_PAYLOAD_LEN {
            truncated = true;
            break;
        }
        size += item;
        entries.push(DirEntry {
            name,
            file_type,
            size: md.len(),
            mode: md.mode(),
        });
    }
    Ok(Message::DirListing { entries, truncated })
}
