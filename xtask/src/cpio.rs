//! A writer for the `newc` cpio format, the one the Linux kernel unpacks as an initramfs.
//! Every entry is owned by root; inode numbers are assigned in order.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            written: 0,
            next_ino: 1,
        }
    }

    /// A directory (its parents must have been added before).
    pub fn dir(&mut self, path: &str, perm: u32) -> io::Result<()> {
        self.header(path, S_IFDIR | perm, 0, (0, 0))?;
        self.pad()
    }

    /// A regular file with `data`.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.header(path, S_IFREG | perm, data.len() as u64, (0, 0))?;
        self.write(data)?;
        self.pad()
    }

    /// A regular file copied from the host file `source`.
    pub fn file_from(&mut self, path: &str, perm: u32, source: &Path) -> io::Result<()> {
        let mut file = File::open(source)?;
        let size = file.metadata()?.len();
        self.header(path, S_IFREG | perm, size, (0, 0))?;
        let copied = io::copy(&mut file, &mut self.out)?;
        if copied != size {
            return Err(io::Error::other(format!(
                "{} changed size while being packed",
                source.display()
            )));
        }
        self.written += copied;
        self.pad()
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        self.header(path, S_IFLNK | 0o777, target.len() as u64, (0, 0))?;
        self.write(target.as_bytes())?;
        self.pad()
    }

    /// `/bin/busybox` from `binary`, with a `/bin/APPLET` link to it for each applet.
    pub fn busybox<A: AsRef<str>>(&mut self, binary: &Path, applets: &[A]) -> io::Result<()> {
        self.file_from("/bin/busybox", 0o755, binary)?;
        for applet in applets {
            self.symlink(&format!("/bin/{}", applet.as_ref()), "busybox")?;
        }
        Ok(())
    }

    /// A character device node.
    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.header(path, S_IFCHR | perm, 0, (major, minor))?;
        self.pad()
    }

    /// Writes the trailer and returns the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.next_ino = 0;
        self.header("TRAILER!!!", 0, 0, (0, 0))?;
        self.pad()?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn header(&mut self, path: &str, mode: u32, size: u64, rdev: (u32, u32)) -> io::Result<()> {
        let size = u32::try_from(size)
            .map_err(|_| io::Error::other(format!("{path} is too large for cpio (4 GiB)")))?;
        let name = path.trim_start_matches('/');
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            size,
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        let mut header = String::from("070701");
        for field in fields {
            header.push_str(&format!("{field:08x}"));
        }
        self.write(header.as_bytes())?;
        self.write(name.as_bytes())?;
        self.write(&[0])?;
        self.pad()
    }

    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.out.write_all(data)?;
        self.written += data.len() as u64;
        Ok(())
    }

    /// Pads to a multiple of 4 bytes.
    fn pad(&mut self) -> io::Result<()> {
        let pad = (4 - self.written % 4) % 4;
        self.write(&[0; 3][..pad as usize])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("/bin", 0o755).unwrap();
        w.file("/bin/hi", 0o755, b"hello").unwrap();
        w.symlink("/bin/sh", "busybox").unwrap();
        let bytes = w.finish().unwrap();
        assert_eq!(bytes.len() % 4, 0);
        assert!(bytes.starts_with(b"070701"));
        // First entry: "bin" (namesize 4), mode 040755.
        assert_eq!(&bytes[14..22], b"000041ed");
        assert_eq!(&bytes[94..102], b"00000004");
        assert_eq!(&bytes[110..114], b"bin\0");
        // The name is padded so that the next header starts at a multiple of 4 (116).
        assert_eq!(&bytes[114..116], b"\0\0");
        assert_eq!(&bytes[116..122], b"070701");
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("bin/hi\0"));
        assert!(text.contains("hello"));
        assert!(text.contains("TRAILER!!!\0"));
    }

    /// Cross-checks with GNU cpio when it is installed.
    #[test]
    fn gnu_cpio_lists_it() {
        if !crate::util::have_program("cpio") {
            return;
        }
        let mut w = CpioWriter::new(Vec::new());
        w.dir("/a", 0o755).unwrap();
        w.file("/a/f", 0o644, b"12345").unwrap();
        w.symlink("/a/l", "f").unwrap();
        w.char_dev("/a/console", 0o600, 5, 1).unwrap();
        let bytes = w.finish().unwrap();
        let mut child = std::process::Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&bytes).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "a\na/f\na/l\na/console\n"
        );
    }
}
