//! What a vCPU was executing, for reports on a guest that is stuck or gone: the code at its
//! instruction pointer and the words on top of its stack, read from guest memory through
//! the guest's own page tables (`KVM_TRANSLATE`). With them a hang can be placed (a loop's
//! instructions, the return addresses of its callers) without symbols or a debugger.

use vm_memory::{Bytes, GuestAddress};

use super::Vcpu;
use crate::error::{Error, Result};
use crate::memory::{GuestMemory, PAGE_SIZE};

/// Bytes of code read from the instruction pointer on.
const CODE_BYTES: u64 = 16;
/// Words read from the stack pointer on.
const STACK_WORDS: u64 = 8;

/// What a vCPU was executing ([`Vcpu::context`]). Displays as
/// `code at rip (gpa 0x..): 0f 1f 44 ..; stack (gpa 0x..): 0x.. 0x..`, saying `not mapped`
/// where an address does not translate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuContext {
    /// Instruction pointer.
    pub rip: u64,
    /// Where `rip` is in guest memory, and up to 16 bytes from there (to the end of its page).
    pub code: Option<(u64, Vec<u8>)>,
    /// Stack pointer.
    pub rsp: u64,
    /// Where `rsp` is in guest memory, and up to 8 words from there (to the end of its page).
    pub stack: Option<(u64, Vec<u64>)>,
}

impl std::fmt::Display for VcpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.code {
            Some((gpa, bytes)) => {
                write!(f, "code at rip (gpa {gpa:#x}):")?;
                for b in bytes {
                    write!(f, " {b:02x}")?;
                }
            }
            None => write!(f, "code at rip: not mapped")?,
        }
        match &self.stack {
            Some((gpa, words)) => {
                write!(f, "; stack (gpa {gpa:#x}):")?;
                for w in words {
                    write!(f, " {w:#x}")?;
                }
                Ok(())
            }
            None => write!(f, "; stack: not mapped"),
        }
    }
}

impl Vcpu {
    /// What the vCPU was executing: see [`VcpuContext`]. Call it while the vCPU is not
    /// running (from its own thread, between runs).
    pub fn context(&self, memory: &GuestMemory) -> Result<VcpuContext> {
        let regs = self.regs()?;
        let code = self.read_at(memory, regs.rip, CODE_BYTES)?;
        let stack = self
            .read_at(memory, regs.rsp, STACK_WORDS * 8)?
            .map(|(gpa, bytes)| {
                let words = bytes
                    .chunks_exact(8)
                    .map(|w| u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]))
                    .collect();
                (gpa, words)
            });
        Ok(VcpuContext {
            rip: regs.rip,
            code,
            rsp: regs.rsp,
            stack,
        })
    }

    /// Up to `len` bytes at guest virtual address `gva`, to the end of its page, with its
    /// physical address; `None` where it does not translate or is outside guest memory.
    fn read_at(&self, memory: &GuestMemory, gva: u64, len: u64) -> Result<Option<(u64, Vec<u8>)>> {
        let translation = self
            .fd()
            .translate_gva(gva)
            .map_err(|e| Error::kvm("KVM_TRANSLATE", e))?;
        if translation.valid == 0 {
            return Ok(None);
        }
        let gpa = translation.physical_address;
        // To the end of the page: the next one may map elsewhere.
        let page = PAGE_SIZE as u64;
        let len = len.min(page - gpa % page);
        let mut bytes = vec![0u8; len as usize];
        match memory.read_slice(&mut bytes, GuestAddress(gpa)) {
            Ok(()) => Ok(Some((gpa, bytes))),
            Err(_) => Ok(None),
        }
    }
}
